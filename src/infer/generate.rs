//! Streaming generation for one sequence: prefill the prompt into a KV cache, then sample
//! and decode one token at a time until a stop condition.

use super::engine::{Engine, Prompt};
use super::error::{ServeError, ServeResult};
use super::sampler::{Sampler, SamplingParams};
use super::stream::{StopStrings, TextStream};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// Options of [`Engine::generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these; it is not part of the output.
    pub stop_strings: Vec<String>,
    /// Token ids that end generation besides the model's end-of-sequence tokens.
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at the model's end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// What the streaming callback receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEvent {
    /// The generated token; `None` for the final event carrying held-back text (an
    /// unfinished character or a possible start of a stop string) when generation ends.
    pub token: Option<u32>,
    /// New text, possibly empty (a token inside a multi-byte character). The texts of all
    /// events concatenate to [`Generation::text`].
    pub text: String,
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced this end-of-sequence or stop token (not part of the output).
    StopToken(u32),
    /// The text reached this stop string (cut from the output).
    StopString(String),
    /// `max_tokens` were generated.
    MaxTokens,
    /// The model's context (`max_position_embeddings`) is full.
    ContextFull,
    /// The callback returned `ControlFlow::Break`.
    Cancelled,
}

/// The result of [`Engine::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated tokens, without a final stop token.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt forward and the first token's sampling.
    pub prefill_time: Duration,
    /// One-token forwards after the prefill and their sampling.
    pub decode_time: Duration,
    pub decode_steps: usize,
}

impl Generation {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64()
    }

    pub fn decode_tokens_per_second(&self) -> f64 {
        self.decode_steps as f64 / self.decode_time.as_secs_f64()
    }
}

impl Engine {
    /// Generate from `prompt`, calling `on_token` for every generated token with the text
    /// it completes; the callback stops generation by returning `ControlFlow::Break`.
    pub fn generate(
        &self,
        prompt: &Prompt,
        opts: &GenerateOptions,
        mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> ServeResult<Generation> {
        let prompt_ids = self.encode(prompt)?;
        if prompt_ids.is_empty() {
            return Err(ServeError::EmptyPrompt);
        }
        let max_positions = self.model().config.max_position_embeddings;
        if prompt_ids.len() >= max_positions {
            return Err(ServeError::PromptTooLong {
                tokens: prompt_ids.len(),
                context: max_positions,
            });
        }
        let mut sampler =
            Sampler::new(opts.sampling.clone()).map_err(|e| ServeError::InvalidSampling {
                reason: format!("{e:#}"),
            })?;
        let mut stop_ids = opts.stop_token_ids.clone();
        if !opts.ignore_eos {
            stop_ids.extend_from_slice(self.eos_token_ids());
        }
        let mut stream = TextStream::new(self.tokenizer());
        let mut stops = StopStrings::new(&opts.stop_strings);
        let reserve = (prompt_ids.len() + opts.max_tokens).min(max_positions);
        let mut cache = self.new_cache(reserve);
        let mut context = prompt_ids.clone();
        let mut out = Generation {
            tokens: Vec::new(),
            text: String::new(),
            finish: FinishReason::MaxTokens,
            prompt_tokens: prompt_ids.len(),
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
            decode_steps: 0,
        };
        let mut cancelled = false;
        // the running decode step: its forward and the sampling from its logits
        let mut step: Option<Instant> = None;
        let t0 = Instant::now();
        let mut logits = self.forward(&[prompt_ids], &mut cache)?;
        loop {
            if out.tokens.len() == opts.max_tokens {
                break;
            }
            let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
            let token = sampler.sample(&row, &context)?;
            match step.take() {
                None => out.prefill_time = t0.elapsed(),
                Some(s) => {
                    out.decode_time += s.elapsed();
                    out.decode_steps += 1;
                }
            }
            if stop_ids.contains(&token) {
                out.finish = FinishReason::StopToken(token);
                break;
            }
            out.tokens.push(token);
            context.push(token);
            let (text, hit) = stops.push(&stream.push(token)?);
            out.text.push_str(&text);
            let flow = on_token(&TokenEvent {
                token: Some(token),
                text,
            });
            if let Some(i) = hit {
                out.finish = FinishReason::StopString(opts.stop_strings[i].clone());
                break;
            }
            if flow.is_break() {
                out.finish = FinishReason::Cancelled;
                cancelled = true;
                break;
            }
            if out.tokens.len() == opts.max_tokens {
                break;
            }
            if cache.len() >= max_positions {
                out.finish = FinishReason::ContextFull;
                break;
            }
            step = Some(Instant::now());
            logits = self.forward(&[vec![token]], &mut cache)?;
        }
        if out.prefill_time.is_zero() {
            out.prefill_time = t0.elapsed(); // max_tokens 0: the prompt forward only
        }
        if !matches!(out.finish, FinishReason::StopString(_)) {
            let (text, hit) = stops.push(&stream.finish()?);
            let mut rest = text;
            match hit {
                Some(i) => out.finish = FinishReason::StopString(opts.stop_strings[i].clone()),
                None => rest.push_str(&stops.finish()),
            }
            if !rest.is_empty() {
                out.text.push_str(&rest);
                if !cancelled {
                    let _ = on_token(&TokenEvent {
                        token: None,
                        text: rest,
                    });
                }
            }
        }
        Ok(out)
    }
}
