//! Perplexity over non-overlapping windows (methods.md §1.4): each window is evaluated on
//! its own from position 0; the partial tail is dropped; PPL = exp(mean NLL over all
//! predicted tokens). Optionally saves the top-k of every predicted token's distribution
//! (`--save-logits`) for later KL comparisons.

use super::divergence::{top_k, Scratch, TopK};
use super::logits_file::LogitsWriter;
use super::stats::{mean, standard_error};
use super::windows::{check_targets, for_each_chunk, progress_bar, Chunk, Windows};
use crate::model::CausalLm;
use anyhow::Result;
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
    /// Standard error of `mean_nll` across windows.
    pub mean_nll_se: Option<f64>,
    pub ppl: f64,
    /// `ppl · mean_nll_se` (first-order propagation through `exp`).
    pub ppl_se: Option<f64>,
    /// Mean NLL of each window, in order.
    pub window_nll: Vec<f64>,
    /// Seconds spent in forward passes and loss.
    pub seconds: f64,
    /// Window tokens evaluated per second.
    pub tokens_per_second: f64,
}

///
/// Errors: [`ErrorKind::InvalidInput`](crate::ErrorKind) for text shorter than one window
/// or tokens outside the model's vocabulary, `InvalidOption` for a window under 2 tokens
/// or `limit` 0.
pub fn perplexity(model: &CausalLm, ids: &[u32], opts: &PplOptions) -> crate::Result<PplResult> {
    Ok(perplexity_saving(model, ids, opts, None)?)
}

/// [`perplexity`], also writing each predicted token's top-k summary to `save` (whose
/// header must describe the same windows).
pub fn perplexity_saving(
    model: &CausalLm,
    ids: &[u32],
    opts: &PplOptions,
    mut save: Option<&mut LogitsWriter>,
) -> Result<PplResult> {
    let windows = Windows::new(ids, opts.seqlen, opts.limit)?;
    check_targets(windows.tokens(), model.config.vocab_size)?;
    let l = windows.seqlen();
    if let Some(w) = save.as_deref() {
        let h = w.header();
        anyhow::ensure!(
            h.seqlen == l && h.windows == windows.count() && h.vocab == model.config.vocab_size,
            "the logits file is set up for {} windows of {} tokens and a vocabulary of {}; this run has {} of {l} and {}",
            h.windows,
            h.seqlen,
            h.vocab,
            windows.count(),
            model.config.vocab_size
        );
    }
    let bar = progress_bar(opts.progress, windows.count(), "ppl");
    let start = Instant::now();
    let mut window_nll = Vec::with_capacity(windows.count());
    let mut nll = 0f64;
    let on_chunk = |c: &Chunk| -> Result<()> {
        let logits = c.logits[0];
        let rows = || logits.par_chunks(c.vocab).zip(c.targets.par_iter());
        nll += match save.as_deref_mut() {
            Some(w) => {
                let k = w.header().top_k;
                let records: Vec<TopK> = rows()
                    .map_init(Scratch::default, |s, (row, &t)| {
                        top_k(row, t as usize, k, s)
                    })
                    .collect();
                w.write(&records)?;
                records.iter().map(|r| r.nll).sum::<f64>()
            }
            None => rows().map(|(row, &t)| nll_of(row, t as usize)).sum(),
        };
        if c.last {
            if !nll.is_finite() {
                // NaN or infinite logits: a corrupt weight or an overflow; a perplexity
                // of NaN must not pass for a result
                anyhow::bail!(
                    "window {} gave a non-finite loss ({nll}): the model's logits are NaN or \
                     infinite (corrupt weights, or an overflow in this dtype)",
                    window_nll.len()
                );
            }
            window_nll.push(nll / (l - 1) as f64);
            nll = 0.0;
            bar.set_position(window_nll.len() as u64);
            let tps = (window_nll.len() * l) as f64 / start.elapsed().as_secs_f64();
            bar.set_message(format!(
                "{tps:.0} tok/s  ppl {:.4}",
                mean(&window_nll).exp()
            ));
        }
        Ok(())
    };
    for_each_chunk(&[model], &windows, opts.batch, on_chunk)?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let mean_nll = mean(&window_nll);
    let mean_nll_se = standard_error(&window_nll);
    Ok(PplResult {
        seqlen: l,
        windows: windows.count(),
        predicted_tokens: windows.predicted_tokens(),
        mean_nll,
        mean_nll_se,
        ppl: mean_nll.exp(),
        ppl_se: mean_nll_se.map(|se| se * mean_nll.exp()),
        window_nll,
        seconds,
        tokens_per_second: (windows.count() * l) as f64 / seconds,
    })
}

/// `logsumexp(row) − row[target]`, the exponentials in f32 and their sum in f64 (the row
/// is f32 already; this keeps plain `ppl` as fast as before).
fn nll_of(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
    (max as f64 + sum.ln()) - row[target] as f64
}
