//! bitsmith: post-training quantization of Llama-family LLMs.
//!
//! The API is what this page lists:
//! - **load**: [`resolve_model`] (a folder or Hugging Face repo id) or
//!   [`resolve_model_or_gguf`] (those or a `.gguf` file, decoded once into a cache),
//!   [`load_tokenizer`],
//!   [`load_model`] / [`load_model_with`] (float or packed) → a [`CausalLm`] that runs
//!   whole ([`CausalLm::forward`], [`CausalLm::forward_cached`] over a [`KvCache`]) or block
//!   by block ([`model`]);
//! - **quantize**: [`SourceModel::open`], a [`Recipe`] (its parts in [`recipe`]),
//!   [`quantize_to`] (what `bitsmith quantize` does: quantize and write a packed folder or
//!   a GGUF file) or [`quantize`] (the result in memory);
//! - **evaluate**: [`perplexity()`], [`kl_divergence`];
//! - **serve**: [`Engine`] (load, batched cached forwards, [`Engine::generate`] with
//!   sampling, stop strings and streamed text), with its own request errors
//!   ([`ServeError`]).
//!
//! Errors are [`Error`]s: [`Error::kind`] tells a model that does not resolve or load, an
//! unreadable input, an option out of range and an output that cannot be written from a
//! failure inside bitsmith ([`ErrorKind`]).
//!
//! Inside, the data flows one way: loader → model → calibration → quant → pack → infer →
//! cli, with eval reading the model only; those modules are internal.

// Without `internals`, what only bitsmith's own tests and benches reach is unused here.
#![cfg_attr(not(feature = "internals"), allow(dead_code, unused_imports))]

/// Declares bitsmith's internal modules: `pub(crate)` in a normal build, `pub` with the
/// `internals` feature, which only bitsmith's own tests, benches and examples turn on (a
/// dev-dependency of the crate on itself). Callers get the API re-exported below; the
/// internals can change in any release.
macro_rules! internal_modules {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub mod $name;
        #[cfg(not(feature = "internals"))]
        pub(crate) mod $name;
    )*};
}

mod error;
pub use error::{Error, ErrorKind, Result};

internal_modules!(
    calibration,
    cli,
    eval,
    infer,
    loader,
    pack,
    quant,
    signals,
    util
);
pub mod model;

// Loading a model: resolve a folder or hub id, read its config and tokenizer, load it
// (float or packed) as a runnable decoder.
pub use infer::{load_model, load_model_with, Route, WeightMode};
pub use loader::{load_tokenizer, resolve_model, ModelConfig, ModelFiles};
pub use model::{CausalLm, KvCache, LogitsFor};
pub use pack::gguf::resolve_model_or_gguf;

// Quantizing: a recipe of stages run over a source model, written as a packed folder or
// a GGUF file (`quantize_to`, what `bitsmith quantize` calls), or kept in memory
// (`quantize`).
pub use calibration::{CalibrationSet, CalibrationSource};
pub use pack::{quantize_to, GgufWritten, WriteOptions, Written, ZeroConvention};
pub use quant::{quantize, QuantizeOutput, Recipe, RunOptions, SourceModel};

/// A quantization recipe and the values it is made of: transforms, then an allocation of
/// grids, then a rounding, with the calibration the data-driven stages read. Written as
/// JSON in a packed model's `bitsmith.json`; [`Recipe::from_file`] reads it back.
pub mod recipe {
    pub use crate::quant::flexround::{FlexInit, FlexRoundSpec, Reconstruct};
    pub use crate::quant::grid::{GgmlType, GgufFileType, GridSpec, GroupSize, PowerLevels};
    pub use crate::quant::grid::{LlamaMix, RangeFit};
    pub use crate::quant::recipe::*;
    pub use crate::quant::transform::OstQuantSpec;
}

// Evaluating: perplexity and the KL divergence against a reference model.
pub use eval::{kl_divergence, perplexity, KlBase, KlOptions, KlResult, PplOptions, PplResult};

// Serving: load, batch forwards over a KV cache, sample, stream text.
pub use infer::{
    Engine, FinishReason, GenerateOptions, Generation, LoadOptions, Message, Prompt, Sampler,
    SamplingParams, ServeError, ServeResult, TextStream, TokenEvent,
};

/// The `bitsmith` command line (the binary's `main`): parses `std::env::args`, runs the
/// subcommand, returns the process exit code.
#[doc(hidden)]
pub fn run_cli() -> i32 {
    cli::main()
}

use anyhow::Context;
use candle_core::{DType, Device};
use error::{fail, tagged, ResultExt};

/// A device named on the command line, before it is opened.
enum DeviceName {
    Cpu,
    Cuda(usize),
    Metal(usize),
}

/// `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N` (N the device's ordinal); a GPU needs the
/// matching cargo feature (`cuda`, `metal`) in this build.
fn device_name(s: &str) -> Result<DeviceName> {
    let (kind, ordinal) = match s.split_once(':') {
        Some((kind, n)) => {
            let n = n.parse::<usize>().map_err(|_| {
                tagged(
                    ErrorKind::InvalidOption,
                    format!("device `{s}`: `{n}` is not a device number"),
                )
            })?;
            (kind, Some(n))
        }
        None => (s, None),
    };
    let rebuild = |feature: &str| {
        Error::from(tagged(
            ErrorKind::InvalidOption,
            format!(
                "device `{s}`: this bitsmith was built without the `{feature}` feature \
                 (rebuild with `cargo build --release --features {feature}`)"
            ),
        ))
    };
    match kind {
        "cpu" if ordinal.is_none() => Ok(DeviceName::Cpu),
        "cuda" if !cfg!(feature = "cuda") => Err(rebuild("cuda")),
        "metal" if !cfg!(feature = "metal") => Err(rebuild("metal")),
        "cuda" => Ok(DeviceName::Cuda(ordinal.unwrap_or(0))),
        "metal" => Ok(DeviceName::Metal(ordinal.unwrap_or(0))),
        _ => fail!(
            InvalidOption,
            "unknown device `{s}` (use cpu, cuda, cuda:N, metal or metal:N)"
        ),
    }
}

/// Checks a device name (as [`parse_device`]) without opening the device.
pub fn check_device(s: &str) -> Result<()> {
    device_name(s).map(|_| ())
}

/// Opens the device `s` names: `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match device_name(s)? {
        DeviceName::Cpu => Device::Cpu,
        DeviceName::Cuda(n) => Device::new_cuda(n)
            .with_context(|| format!("opening CUDA device {n}"))
            .kind(ErrorKind::InvalidOption)?,
        DeviceName::Metal(n) => Device::new_metal(n)
            .with_context(|| format!("opening Metal device {n}"))
            .kind(ErrorKind::InvalidOption)?,
    })
}

/// Parse a compute dtype name (`f32`, `bf16`, `f16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => fail!(
            InvalidOption,
            "unknown dtype `{other}` (use f32, bf16 or f16)"
        ),
    })
}
