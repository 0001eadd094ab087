//! compressed-tensors' `pack-quantized` format (the checkpoints llm-compressor writes and
//! vLLM loads natively): `layer` converts one uniform layer code for code, `export` a
//! whole bitsmith GPTQ-layout model.

mod export;
mod layer;

pub use export::{export_compressed_tensors, quantization_config, CompressedTensorsReport};
pub use layer::{PackQuantized, Scheme, Strategy};
