//! Serving from Rust: load a float or packed model onto a device, run batched forwards
//! over a KV cache, sample and stream generated text.
//!
//! ```no_run
//! use bitsmith::infer::{Engine, GenerateOptions, LoadOptions, Message, Prompt};
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
//! Pieces: [`Engine`] (load, tokenize, [`Engine::forward`] of a batch over a
//! [`KvCache`](crate::model::KvCache)), [`Sampler`] (temperature, top-k, top-p,
//! repetition penalty, seed), [`ChatTemplate`], [`TextStream`] (UTF-8-correct incremental
//! detokenization) and [`StopStrings`], [`Engine::generate`] tying them together, and
//! [`bench`] for throughput and memory figures.

pub mod bench;
pub mod chat;
pub mod engine;
pub mod generate;
pub mod sampler;
pub mod stream;

pub use bench::{bench, peak_rss_bytes, BenchOptions, BenchReport};
pub use chat::{ChatTemplate, Message};
pub use engine::{Engine, LoadOptions, Prompt};
pub use generate::{FinishReason, GenerateOptions, Generation, TokenEvent};
pub use sampler::{Sampler, SamplingParams};
pub use stream::{StopStrings, TextStream};
