//! Bit packing and on-disk formats. `bits` is the LSB-first bitstream shared by every
//! width; `gptq` maps a [`QuantizedLinear`](crate::quant::QuantizedLinear) to and from the
//! GPTQ tensor layout; `output` writes a model folder atomically; `model` ties them
//! together for whole models.

pub mod bits;
pub mod codebook;
pub mod compat;
pub mod compressed_tensors;
pub mod config;
pub mod gguf;
pub mod gptq;
pub mod lock;
pub mod mixed;
pub mod mixed_codebook;
pub mod model;
pub mod output;
pub mod storage;
pub mod validate;
pub mod write;

pub use codebook::{read_codebook_linear, CodebookConfig, CODEBOOK_METHOD};
pub use config::quantization_config;
pub use gptq::{GptqConfig, ZeroConvention};
pub use mixed::{MixedConfig, MixedTensors, MIXED_CODEBOOK_LAYOUT, MIXED_METHOD};
pub use mixed_codebook::read_mixed_codebook_linear;
pub use model::{
    check_gptq_shapes, codes_refs, column_losses_beside, read_mixed_linear, read_quantized_linear,
    write_column_losses, write_column_losses_file,
    write_gptq_model, write_quantized_model, CodesRef, PackReport,
};
pub use output::OutputFolder;
pub use write::{quantize_to, GgufWritten, WriteOptions, Written};
