//! GGUF, the file format of llama.cpp and the runtimes built on it (Ollama, LM Studio):
//! `container` writes the GGUF v3 file, `blocks` (in `quant::grid::ggml`) encodes and
//! decodes GGML tensor types,
//! `exact` converts quantized layers whose grid is a block type code for code,
//! `tokenizer` lays out the vocabulary, `export` writes a whole model; `reader` reads a
//! file's header, `import` a whole file back into a Hugging Face folder, `hf_tokenizer`
//! rebuilding its tokenizer files; `source` takes a `.gguf` file wherever a model is
//! expected, through a cached import.

pub mod container;
pub mod exact;
pub mod export;
pub mod hf_tokenizer;
pub mod hf_tokenizer_spm;
pub mod import;
pub mod reader;
pub mod rope_freqs;
pub mod source;
pub mod tokenizer;
pub mod tokenizer_spm;

/// The block types live with the grids (a GGML type is a grid a rounding method solves on).
pub use crate::quant::grid::ggml::{
    blocks, dequantize_row, kquants, quantize_row, GgmlType, GgufFileType, LlamaMix, QK,
};
pub use container::{GgufWriter, MetaValue, TensorInfo, ValueType};
pub use export::{
    export_gguf, export_gguf_solved, vocab_metadata, GgufExportOptions, GgufExportReport,
};
pub use import::{import_gguf, ImportOptions, StoredDtype};
pub use source::resolve_model_or_gguf;
