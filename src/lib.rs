//! bitsmith: post-training quantization of Llama-family LLMs.
//!
//! The data flows through the modules in this order: [`loader`] (resolve a folder or hub
//! id, open safetensors, config, tokenizer) → [`model`] (a decoder runnable block by block)
//! → [`quant`] (grids and rounding methods) → [`pack`] (on-disk formats) → [`eval`]
//! (perplexity); [`infer`] serves a model (KV-cached generation). The CLI in [`cli`] only
//! parses arguments and calls these. [`util`] holds the few helpers below all of them (the
//! random number generator, corpus text joining).

pub mod calibration;
pub mod cli;
pub mod eval;
pub mod infer;
pub mod loader;
pub mod model;
pub mod pack;
pub mod quant;
pub mod signals;
pub mod util;

pub use infer::{load_model, load_model_with, WeightMode};

use anyhow::{bail, Result};
use candle_core::DType;

/// Parse a compute dtype name (`f32`, `bf16`, `f16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("unknown dtype `{other}` (use f32, bf16 or f16)"),
    })
}
