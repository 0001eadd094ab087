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

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};

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
            let n = n
                .parse::<usize>()
                .map_err(|_| anyhow!("device `{s}`: `{n}` is not a device number"))?;
            (kind, Some(n))
        }
        None => (s, None),
    };
    let rebuild = |feature: &str| {
        anyhow!(
            "device `{s}`: this bitsmith was built without the `{feature}` feature \
             (rebuild with `cargo build --release --features {feature}`)"
        )
    };
    match kind {
        "cpu" if ordinal.is_none() => Ok(DeviceName::Cpu),
        "cuda" if !cfg!(feature = "cuda") => Err(rebuild("cuda")),
        "metal" if !cfg!(feature = "metal") => Err(rebuild("metal")),
        "cuda" => Ok(DeviceName::Cuda(ordinal.unwrap_or(0))),
        "metal" => Ok(DeviceName::Metal(ordinal.unwrap_or(0))),
        _ => bail!("unknown device `{s}` (use cpu, cuda, cuda:N, metal or metal:N)"),
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
        DeviceName::Cuda(n) => {
            Device::new_cuda(n).with_context(|| format!("opening CUDA device {n}"))?
        }
        DeviceName::Metal(n) => {
            Device::new_metal(n).with_context(|| format!("opening Metal device {n}"))?
        }
    })
}

/// Parse a compute dtype name (`f32`, `bf16`, `f16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("unknown dtype `{other}` (use f32, bf16 or f16)"),
    })
}
