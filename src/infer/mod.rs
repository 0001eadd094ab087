//! Serving from Rust: load a float or packed model onto a device, run batched forwards
//! over a KV cache, sample and stream generated text.
//!
//! ```no_run
//! use bitsmith::{Engine, GenerateOptions, LoadOptions, Message, Prompt};
//! use std::io::Write;
//!
//! let engine = Engine::load("HuggingFaceTB/SmolLM2-135M-Instruct", &LoadOptions::default())?;
//! let prompt = Prompt::Chat(vec![Message::user("What is the capital of France?")]);
//! let done = engine.generate(&prompt, &GenerateOptions::default(), |ev| {
//!     print!("{}", ev.text);
//!     let _ = std::io::stdout().flush();
//!     std::ops::ControlFlow::Continue(())
//! })?;
//! eprintln!("{:?}, {:.1} tok/s", done.finish, done.decode_tokens_per_second());
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Errors are [`ServeError`]s: [`ServeError::is_caller_error`] tells a request to fix (an
//! empty or ragged batch, a token outside the vocabulary, a prompt longer than the
//! context, bad sampling options) from a model that does not load and internal failures.
//!
//! Pieces: [`Engine`] (load, tokenize, [`Engine::forward`] of a batch over a
//! [`KvCache`](crate::model::KvCache)), [`Sampler`] (temperature, top-k, top-p,
//! repetition penalty, seed), [`ChatTemplate`], [`TextStream`] (UTF-8-correct incremental
//! detokenization) and [`StopStrings`], [`Engine::generate`] tying them together, and
//! [`bench`] for throughput and memory figures.
//!
//! Packed weights: quantized linear layers that keep their codes packed in
//! memory and multiply with them directly (the [`PackedMatmul`] seam of
//! [`crate::model::layers`]).
//!
//! Two routes, picked per layer by [`packed_linear`]:
//! - [`ggml`]: layouts that map exactly onto a GGML block type (Q4_0, Q8_0, Q4_1) run on
//!   candle's `QMatMul`, which quantizes activations to 8 bits;
//! - [`kernels`]: bitsmith's own kernels on the [`layout::PackedLayout`] repacking, for
//!   every width (2/3/4/8 and mixed 1..8), group size, act-order and the mixed-width
//!   layout, with f32 activations (exact up to accumulation order). CUDA and Metal twins
//!   of these kernels live in `kernels/*.cu` and `kernels/*.metal`.

pub mod bench;
pub mod chat;
pub mod engine;
pub mod error;
pub mod generate;
pub mod ggml;
pub mod kernels;
pub mod layout;
pub mod load;
pub mod sampler;
pub mod stream;

pub use bench::{bench, peak_rss_bytes, BenchOptions, BenchReport};
pub use chat::{ChatTemplate, Message};
pub use engine::{Engine, LoadOptions, Prompt};
pub use error::{ServeError, ServeResult};
pub use generate::{FinishReason, GenerateOptions, Generation, TokenEvent};
pub use load::{attach_host_kernels, keep_head_in_bf16, load_model, load_model_with, WeightMode};
pub use sampler::{Sampler, SamplingParams};
pub use stream::{StopStrings, TextStream};

use crate::model::PackedMatmul;
use crate::quant::{MixedQuantizedLinear, QuantizedLinear};
use anyhow::{Context, Result};
use std::sync::Arc;

/// Which kernels run a packed layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// bitsmith's kernels: they are exact (f32 activations) and, measured in
    /// `benches/kernels.rs`, not slower than the GGML route at batch 1 (see the README);
    /// GGML only when asked, since it quantizes activations.
    #[default]
    Auto,
    /// Always bitsmith's kernels.
    Bitsmith,
    /// GGML blocks via candle; an error for a layer with no exact block type.
    Ggml,
    /// bitsmith's kernels with int8 activations above batch 8 (prefill, `ppl`): integer
    /// dot products (AVX-512 VNNI or AVX-VNNI where the CPU has it), as llama.cpp
    /// computes; decode stays exact. CPU only, uniform and mixed-width layers.
    Int8,
}

impl std::str::FromStr for Route {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "bitsmith" => Self::Bitsmith,
            "ggml" => Self::Ggml,
            "int8" => Self::Int8,
            other => {
                anyhow::bail!("unknown kernel route `{other}` (use auto, bitsmith, int8 or ggml)")
            }
        })
    }
}

/// A packed kernel for a GPTQ-layout layer.
pub fn packed_linear(q: &QuantizedLinear, route: Route) -> Result<Arc<dyn PackedMatmul>> {
    Ok(match route {
        Route::Ggml => Arc::new(ggml::GgmlLinear::from_quantized(q)?),
        Route::Auto | Route::Bitsmith => Arc::new(kernels::BitsmithLinear::from_quantized(q)?),
        Route::Int8 => {
            Arc::new(kernels::BitsmithLinear::from_quantized(q)?.with_int8_activations())
        }
    })
}

/// A packed kernel for a mixed-width layer (bitsmith's kernels only: no GGML block type
/// has a width per column).
pub fn packed_mixed(q: &MixedQuantizedLinear, route: Route) -> Result<Arc<dyn PackedMatmul>> {
    anyhow::ensure!(
        route != Route::Ggml,
        "mixed-width layers have no GGML block type; use the bitsmith or auto route"
    );
    let kernel = kernels::BitsmithLinear::from_mixed(q).context("repacking a mixed-width layer")?;
    Ok(Arc::new(if route == Route::Int8 {
        kernel.with_int8_activations()
    } else {
        kernel
    }))
}
