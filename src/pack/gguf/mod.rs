//! GGUF, the file format of llama.cpp and the runtimes built on it (Ollama, LM Studio):
//! `container` writes the GGUF v3 file, `blocks` encodes and decodes GGML tensor types
//! (`kquants` the K-quants and IQ4_NL),
//! `exact` converts quantized layers whose grid is a block type code for code,
//! `tokenizer` lays out the vocabulary, `export` writes a whole model; `import` reads one
//! back into a Hugging Face folder, `hf_tokenizer` rebuilding its tokenizer files.

pub mod blocks;
pub mod container;
pub mod exact;
pub mod export;
pub mod hf_tokenizer;
pub mod import;
pub mod kquants;
pub mod tokenizer;

pub use blocks::{dequantize_row, quantize_row, GgmlType, QK};
pub use container::{GgufWriter, MetaValue, TensorInfo, ValueType};
pub use export::{export_gguf, GgufExportOptions, GgufExportReport};
pub use import::{import_gguf, ImportOptions, StoredDtype};
