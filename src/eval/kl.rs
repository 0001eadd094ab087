//! KL divergence to a base model, top-1 agreement and probability change of the correct
//! token, over the same windows as perplexity. The base is a model evaluated in lock-step
//! (window by window, chunk by chunk) or a saved logits file; only per-token statistics are
//! kept, never a run's logits.

use super::divergence::{compare_rows, compare_top_k, Scratch, TokenStats};
use super::logits_file::{LogitsReader, TopKBlock};
use super::stats::{mean, quantile, standard_error};
use super::windows::{check_targets, for_each_chunk, progress_bar, Chunk, Windows};
use crate::model::CausalLm;
use crate::error::fail;
use anyhow::Result;
use rayon::prelude::*;
use std::time::Instant;

/// What the models are compared against.
pub enum KlBase<'a> {
    /// A model evaluated alongside, known over its full vocabulary.
    Model(&'a CausalLm),
    /// Saved top-k logits (`ppl --save-logits`).
    File(&'a mut LogitsReader),
}

#[derive(Debug, Clone)]
pub struct KlOptions {
    pub seqlen: usize,
    /// Windows per forward pass.
    pub batch: usize,
    /// Evaluate only the first N windows.
    pub limit: Option<usize>,
    pub progress: bool,
}

/// Distribution of the per-token KL divergence, in nats.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KlSummary {
    pub mean: f64,
    /// Standard error of `mean` across windows.
    pub mean_se: Option<f64>,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

/// Base mass outside the saved top-k (a file base only).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TailMass {
    pub mean: f64,
    pub max: f64,
}

/// One model against the base.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KlResult {
    pub seqlen: usize,
    pub windows: usize,
    pub predicted_tokens: usize,
    pub mean_nll: f64,
    pub mean_nll_se: Option<f64>,
    pub ppl: f64,
    /// `ppl · mean_nll_se` (first-order propagation through `exp`).
    pub ppl_se: Option<f64>,
    pub ppl_base: f64,
    pub ppl_base_se: Option<f64>,
    /// Mean NLL of the model minus the base's: `ln(ppl / ppl_base)`.
    pub delta_nll: f64,
    /// Its standard error from the per-window differences (paired: the windows' shared
    /// difficulty cancels, so this is far smaller than either perplexity's).
    pub delta_nll_se: Option<f64>,
    pub kl_divergence: KlSummary,
    /// Share of tokens whose most likely token is the base's.
    pub top1_agreement: f64,
    pub top1_agreement_se: Option<f64>,
    /// RMS over tokens of `p_model(correct) − p_base(correct)`.
    pub rms_delta_p: f64,
    pub base_tail_mass: Option<TailMass>,
    pub window_nll: Vec<f64>,
    pub window_nll_base: Vec<f64>,
    pub window_kl: Vec<f64>,
    /// Seconds for the whole lock-step run (every model and the base).
    pub seconds: f64,
    /// Window tokens per second of the whole run.
    pub tokens_per_second: f64,
}

/// Running sums of one model.
#[derive(Default)]
struct Acc {
    token_kl: Vec<f64>,
    window: [f64; 4],
    window_nll: Vec<f64>,
    window_nll_base: Vec<f64>,
    window_kl: Vec<f64>,
    window_agree: Vec<f64>,
    sum_dp2: f64,
    tail_sum: f64,
    tail_max: f64,
}

impl Acc {
    fn add(&mut self, s: &[TokenStats]) {
        for t in s {
            self.token_kl.push(t.kl);
            self.window[0] += t.nll_model;
            self.window[1] += t.nll_base;
            self.window[2] += t.kl;
            self.window[3] += t.top1_agree as u8 as f64;
            self.sum_dp2 += t.delta_p * t.delta_p;
            self.tail_sum += t.base_tail;
            self.tail_max = self.tail_max.max(t.base_tail);
        }
    }

    fn end_window(&mut self, n: usize) {
        let n = n as f64;
        let [nll, nll_base, kl, agree] = std::mem::take(&mut self.window);
        self.window_nll.push(nll / n);
        self.window_nll_base.push(nll_base / n);
        self.window_kl.push(kl / n);
        self.window_agree.push(agree / n);
    }

    fn finish(mut self, windows: &Windows, from_file: bool, seconds: f64) -> KlResult {
        let n = self.token_kl.len() as f64;
        self.token_kl.sort_unstable_by(f64::total_cmp);
        let mean_nll = mean(&self.window_nll);
        let mean_nll_base = mean(&self.window_nll_base);
        let nll_se = standard_error(&self.window_nll);
        let base_se = standard_error(&self.window_nll_base);
        let diffs: Vec<f64> = self
            .window_nll
            .iter()
            .zip(&self.window_nll_base)
            .map(|(a, b)| a - b)
            .collect();
        KlResult {
            seqlen: windows.seqlen(),
            windows: windows.count(),
            predicted_tokens: windows.predicted_tokens(),
            mean_nll,
            mean_nll_se: nll_se,
            ppl: mean_nll.exp(),
            ppl_se: nll_se.map(|se| se * mean_nll.exp()),
            ppl_base: mean_nll_base.exp(),
            ppl_base_se: base_se.map(|se| se * mean_nll_base.exp()),
            delta_nll: mean(&diffs),
            delta_nll_se: standard_error(&diffs),
            kl_divergence: KlSummary {
                mean: mean(&self.window_kl),
                mean_se: standard_error(&self.window_kl),
                median: quantile(&self.token_kl, 0.5),
                p99: quantile(&self.token_kl, 0.99),
                max: self.token_kl.last().copied().unwrap_or(f64::NAN),
            },
            top1_agreement: mean(&self.window_agree),
            top1_agreement_se: standard_error(&self.window_agree),
            rms_delta_p: (self.sum_dp2 / n).sqrt(),
            base_tail_mass: from_file.then(|| TailMass {
                mean: self.tail_sum / n,
                max: self.tail_max,
            }),
            window_nll: self.window_nll,
            window_nll_base: self.window_nll_base,
            window_kl: self.window_kl,
            seconds,
            tokens_per_second: (windows.count() * windows.seqlen()) as f64 / seconds,
        }
    }
}

/// Compare each of `models` with `base` on the windows of `ids`; one result per model, in
/// order. All models run in lock-step, so they are all held in memory at once; the base's
/// forward is shared by all of them.
///
/// Errors as [`perplexity`](crate::perplexity()), and `InvalidOption` for no model.
pub fn kl_divergence(
    base: KlBase,
    models: &[&CausalLm],
    ids: &[u32],
    opts: &KlOptions,
) -> crate::Result<Vec<KlResult>> {
    Ok(compare(base, models, ids, opts)?)
}

fn compare(
    base: KlBase,
    models: &[&CausalLm],
    ids: &[u32],
    opts: &KlOptions,
) -> Result<Vec<KlResult>> {
    if models.is_empty() {
        fail!(InvalidOption, "no model to compare with the base");
    }
    let windows = Windows::new(ids, opts.seqlen, opts.limit)?;
    let vocab = models[0].config.vocab_size;
    check_targets(windows.tokens(), vocab)?;
    let l = windows.seqlen();
    let (mut reader, runs): (Option<&mut LogitsReader>, Vec<&CausalLm>) = match base {
        KlBase::Model(b) => (
            None,
            std::iter::once(b).chain(models.iter().copied()).collect(),
        ),
        KlBase::File(r) => {
            r.check_matches(windows.tokens(), l, vocab)?;
            (Some(r), models.to_vec())
        }
    };
    let from_file = reader.is_some();
    let bar = progress_bar(opts.progress, windows.count(), "kl");
    let start = Instant::now();
    let mut accs: Vec<Acc> = models.iter().map(|_| Acc::default()).collect();
    let mut block = TopKBlock::default();
    let on_chunk = |c: &Chunk| -> Result<()> {
        let v = c.vocab;
        let rows = c.rows();
        let model_logits = match reader.as_deref_mut() {
            Some(r) => {
                r.read_block(rows, &mut block)?;
                c.logits
            }
            None => &c.logits[1..],
        };
        for (acc, logits) in accs.iter_mut().zip(model_logits) {
            let stats: Vec<TokenStats> = if from_file {
                (0..rows)
                    .into_par_iter()
                    .map_init(Scratch::default, |s, r| {
                        let row = &logits[r * v..(r + 1) * v];
                        compare_top_k(block.row(r), row, c.targets[r] as usize, s)
                    })
                    .collect()
            } else {
                let base = c.logits[0];
                (0..rows)
                    .into_par_iter()
                    .map(|r| {
                        let span = r * v..(r + 1) * v;
                        compare_rows(&base[span.clone()], &logits[span], c.targets[r] as usize)
                    })
                    .collect()
            };
            acc.add(&stats);
        }
        if c.last {
            accs.iter_mut().for_each(|a| a.end_window(l - 1));
            let done = accs[0].window_kl.len();
            bar.set_position(done as u64);
            let tps = (done * l) as f64 / start.elapsed().as_secs_f64();
            bar.set_message(format!(
                "{tps:.0} tok/s  ppl {:.4}  kl {:.5}",
                mean(&accs[0].window_nll).exp(),
                mean(&accs[0].window_kl)
            ));
        }
        Ok(())
    };
    for_each_chunk(&runs, &windows, opts.batch, on_chunk)?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    Ok(accs
        .into_iter()
        .map(|a| a.finish(&windows, from_file, seconds))
        .collect())
}
