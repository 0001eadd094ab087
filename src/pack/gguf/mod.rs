//! GGUF, the file format of llama.cpp and the runtimes built on it (Ollama, LM Studio):
//! `container` writes the GGUF v3 file, `blocks` encodes and decodes GGML tensor types.

pub mod blocks;
pub mod container;
pub mod tokenizer;

pub use blocks::{dequantize_row, quantize_row, GgmlType, QK};
pub use container::{GgufWriter, MetaValue, TensorInfo, ValueType};
