//! Serving throughput and memory: prefill tokens/s of a prompt, decode tokens/s after it
//! (batch 1 by default), peak resident memory. The same measurement for f32, bf16 and packed models
//! makes them comparable.

use super::engine::Engine;
use super::sampler::argmax;
use crate::calibration::data::DEFAULT_TEXT;
use anyhow::{anyhow, ensure, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Prompt tokens (taken from the embedded WikiText-2 validation text).
    pub prompt_len: usize,
    /// Tokens decoded one at a time after the prompt (greedy; end-of-sequence ignored).
    pub gen: usize,
    /// Sequences run together (the same prompt in each row): decode reads the weights once
    /// per step for all of them.
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub batch: usize,
    /// Per sequence.
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    /// All sequences together.
    pub prefill_tokens_per_second: f64,
    /// Per sequence.
    pub decode_tokens: usize,
    pub decode_seconds: f64,
    /// All sequences together.
    pub decode_tokens_per_second: f64,
    /// Bytes the KV cache buffers hold at the end.
    pub kv_cache_bytes: usize,
    /// Peak resident set of the process (VmHWM; memory-mapped weights count once read).
    pub peak_rss_bytes: Option<u64>,
    /// The bf16 GEMM of a model computed in bf16 on the CPU (`dot` or `widen`: see
    /// `BITSMITH_BF16_GEMM`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bf16_gemm: Option<&'static str>,
    /// How the first packed linear runs (its kernel's description, e.g. the route and the
    /// instruction set); absent for a model without packed linears.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packed_kernel: Option<String>,
}

/// Prefill a `prompt_len`-token prompt in each of `batch` rows, then decode `gen` tokens
/// one step at a time.
pub fn bench(engine: &Engine, opts: &BenchOptions) -> Result<BenchReport> {
    ensure!(
        opts.prompt_len > 0 && opts.gen > 0 && opts.batch > 0,
        "prompt length, generated tokens and batch must be positive"
    );
    let max = engine.model().config.max_position_embeddings;
    ensure!(
        opts.prompt_len + opts.gen <= max,
        "prompt length {} + generated {} exceeds the model's context {max}",
        opts.prompt_len,
        opts.gen
    );
    let prompt = prompt_tokens(engine, opts.prompt_len)?;
    let greedy = |logits: &Tensor| -> Result<Vec<Vec<u32>>> {
        Ok(logits
            .to_vec2::<f32>()?
            .iter()
            .map(|row| vec![argmax(row) as u32])
            .collect())
    };
    // warm-up outside the timings, as llama-bench does before its own: one prefill of the
    // same shape and one decode step, so the thread pool is up and the allocator already
    // holds the activation buffers (a cold first prefill spent ~20 % of its time faulting
    // in fresh pages)
    let mut warm = engine.new_cache(opts.prompt_len + 1);
    let logits = engine.forward(&vec![prompt.clone(); opts.batch], &mut warm)?;
    engine.forward(&greedy(&logits)?, &mut warm)?;
    drop(warm);

    let mut cache = engine.new_cache(opts.prompt_len + opts.gen);
    let t0 = Instant::now();
    let mut logits = engine.forward(&vec![prompt; opts.batch], &mut cache)?;
    let mut next = greedy(&logits)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..opts.gen {
        logits = engine.forward(&next, &mut cache)?;
        next = greedy(&logits)?;
    }
    let decode_seconds = t1.elapsed().as_secs_f64();
    let rows = opts.batch as f64;
    Ok(BenchReport {
        batch: opts.batch,
        prompt_tokens: opts.prompt_len,
        prefill_seconds,
        prefill_tokens_per_second: rows * opts.prompt_len as f64 / prefill_seconds,
        decode_tokens: opts.gen,
        decode_seconds,
        decode_tokens_per_second: rows * opts.gen as f64 / decode_seconds,
        kv_cache_bytes: cache.allocated_bytes(),
        peak_rss_bytes: peak_rss_bytes(),
        bf16_gemm: (engine.model().device().is_cpu() && engine.model().dtype() == DType::BF16)
            .then(|| crate::infer::kernels::bf16_gemm::chosen().name()),
        packed_kernel: first_packed_kernel(engine),
    })
}

fn first_packed_kernel(engine: &Engine) -> Option<String> {
    use crate::model::LinearWeight;
    engine
        .model()
        .blocks
        .iter()
        .flat_map(|b| b.linears())
        .find_map(|l| match l.weights() {
            LinearWeight::Packed(k) => Some(k.describe()),
            LinearWeight::Dense(_) => None,
        })
}

/// The first `n` tokens of the embedded text (tokenizing only as much of it as needed).
fn prompt_tokens(engine: &Engine, n: usize) -> Result<Vec<u32>> {
    let mut bytes = 16 * n;
    loop {
        let end = (0..=bytes.min(DEFAULT_TEXT.len()))
            .rev()
            .find(|&i| DEFAULT_TEXT.is_char_boundary(i))
            .unwrap_or(0);
        let ids = engine
            .tokenizer()
            .encode(&DEFAULT_TEXT[..end], false)
            .map_err(|e| anyhow!("tokenizing the benchmark prompt: {e}"))?
            .get_ids()
            .to_vec();
        if ids.len() >= n {
            return Ok(ids[..n].to_vec());
        }
        ensure!(
            end < DEFAULT_TEXT.len(),
            "the embedded text has only {} tokens, fewer than the prompt length {n}",
            ids.len()
        );
        bytes *= 2;
    }
}

/// Peak resident set size of this process (`VmHWM` of /proc/self/status), where the
/// system has one.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
