//! Perplexity over non-overlapping windows (methods.md §1.4): each window is evaluated on
//! its own from position 0; the partial tail is dropped; PPL = exp(mean NLL over all
//! predicted tokens).

use crate::model::CausalLm;
use anyhow::{bail, Result};
use candle_core::{DType, Storage, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct PplOptions {
    pub seqlen: usize,
    /// Windows per forward pass.
    pub batch: usize,
    /// Evaluate only the first N windows.
    pub limit: Option<usize>,
    pub progress: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PplResult {
    pub seqlen: usize,
    pub windows: usize,
    pub predicted_tokens: usize,
    pub mean_nll: f64,
    pub ppl: f64,
    /// Mean NLL of each window, in order.
    pub window_nll: Vec<f64>,
    /// Seconds spent in forward passes and loss.
    pub seconds: f64,
    /// Window tokens evaluated per second.
    pub tokens_per_second: f64,
}

/// Rows of logits the head computes at once (bounds the `[rows, vocab]` buffer).
const HEAD_CHUNK_ROWS: usize = 1024;

pub fn perplexity(model: &CausalLm, ids: &[u32], opts: &PplOptions) -> Result<PplResult> {
    let l = opts.seqlen;
    if l < 2 {
        bail!("--seqlen must be at least 2");
    }
    let available = ids.len() / l;
    if available == 0 {
        bail!(
            "the text has {} tokens, fewer than one window of {l}",
            ids.len()
        );
    }
    if opts.limit == Some(0) {
        bail!("a window limit of 0 evaluates nothing (valid: 1 or more)");
    }
    let windows = opts.limit.map_or(available, |n| n.min(available));
    let batch = opts.batch.max(1);
    let bar = if opts.progress {
        ProgressBar::new(windows as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "ppl [{bar:30}] {pos}/{len} windows {elapsed_precise} ETA {eta} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let ctx = model.context(l)?;
    let start = Instant::now();
    let mut window_nll = Vec::with_capacity(windows);
    let mut first = 0;
    while first < windows {
        let b = batch.min(windows - first);
        let chunk = &ids[first * l..(first + b) * l];
        let input = Tensor::from_slice(chunk, (b, l), model.device())?;
        let hidden = model.run_blocks(model.embed(&input)?, &ctx)?;
        // the last position predicts nothing inside the window
        let hidden = model.final_norm(&hidden.narrow(1, 0, l - 1)?)?;
        for w in 0..b {
            let h = hidden.get(w)?; // [l-1, hidden]
            let targets = &chunk[w * l + 1..(w + 1) * l];
            let mut nll = 0f64;
            let mut row = 0;
            while row < l - 1 {
                let rows = HEAD_CHUNK_ROWS.min(l - 1 - row);
                let logits = model.lm_head.forward(&h.narrow(0, row, rows)?)?;
                nll += nll_sum(&logits, &targets[row..row + rows])?;
                row += rows;
            }
            if !nll.is_finite() {
                // NaN or infinite logits: a corrupt weight or an overflow; a perplexity
                // of NaN must not pass for a result
                bail!(
                    "window {} gave a non-finite loss ({nll}): the model's logits are NaN or \
                     infinite (corrupt weights, or an overflow in this dtype)",
                    first + w
                );
            }
            window_nll.push(nll / (l - 1) as f64);
        }
        first += b;
        bar.set_position(first as u64);
        let tps = (first * l) as f64 / start.elapsed().as_secs_f64();
        let running = window_nll.iter().sum::<f64>() / window_nll.len() as f64;
        bar.set_message(format!("{tps:.0} tok/s  ppl {:.4}", running.exp()));
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let mean_nll = window_nll.iter().sum::<f64>() / windows as f64;
    Ok(PplResult {
        seqlen: l,
        windows,
        predicted_tokens: windows * (l - 1),
        mean_nll,
        ppl: mean_nll.exp(),
        window_nll,
        seconds,
        tokens_per_second: (windows * l) as f64 / seconds,
    })
}

/// Σ over rows of `logsumexp(logits[r]) − logits[r, target[r]]`, accumulated in f64.
fn nll_sum(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let (rows, vocab) = logits.dims2()?;
    let owned;
    let (storage, layout) = logits.storage_and_layout();
    let data: &[f32] = match &*storage {
        Storage::Cpu(cpu) => {
            &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + rows * vocab]
        }
        _ => {
            owned = logits.flatten_all()?.to_vec1::<f32>()?;
            &owned
        }
    };
    for &t in targets {
        if t as usize >= vocab {
            bail!("token id {t} is outside the model's vocabulary of {vocab}");
        }
    }
    Ok(data
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
            (max as f64 + sum.ln()) - row[t as usize] as f64
        })
        .sum())
}
