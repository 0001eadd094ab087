//! Quantize a whole model with a calibration-based layer-wise method (GPTQ, …): the
//! layer-by-layer runner feeds each group of linears and its Hessian to the quantizer,
//! with per-block checkpoints for resuming.

use super::{LayerQuantizer, LayerResult, LayerToQuantize, UniformGrid};
use crate::calibration::{embed_segments, run_block, CalibrationSet, GroupInput, RunnerOptions};
use crate::loader::{ModelConfig, WeightStore};
use crate::model::LinearSpec;
use crate::quant::checkpoint::{Checkpoint, LayerEntry, SaveInBackground};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::ProgressBar;
use std::time::Instant;

pub struct CalibratedOptions {
    pub runner: RunnerOptions,
    /// The grid the quantizer writes (restores checkpointed layers).
    pub grid: UniformGrid,
    pub progress: bool,
    pub checkpoint: Option<Checkpoint>,
}

/// One line of the per-linear log.
#[derive(Debug, Clone)]
pub struct LayerLog {
    pub name: String,
    /// The method's own loss (GPTQ: Σ of column losses), if it reports one.
    pub loss: Option<f64>,
    pub seconds: f64,
}

pub struct CalibratedModel {
    pub layers: Vec<(LinearSpec, LayerResult)>,
    pub log: Vec<LayerLog>,
    pub seconds: f64,
    /// Seconds inside the quantizer (the rest is forward passes and Hessians).
    pub solve_seconds: f64,
    /// First block computed in this run (> 0 when resumed from a checkpoint). `log` holds
    /// every layer, the restored ones with the loss and seconds of the run that made them.
    pub resumed_at: usize,
}

/// Bytes the runner holds at its peak, for the estimate printed before a run.
pub fn memory_estimate(
    config: &ModelConfig,
    calib: &CalibrationSet,
    true_sequential: bool,
) -> (u64, String) {
    let tokens = calib.tokens() as u64;
    let f = 4u64;
    let acts = tokens * config.hidden_size as u64 * f;
    let attn = if true_sequential {
        tokens * (config.num_attention_heads * config.head_dim) as u64 * f
    } else {
        0
    };
    let block: u64 = crate::model::spec::block_linears(config, 0)
        .iter()
        .map(|s| (s.out_features * s.in_features) as u64 * f)
        .sum();
    let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
    let hess = (3 * h * h + i * i) * f + i * i * 8 * 3; // + f64 solve workspace
    let seq = calib.seqlen as u64;
    let transient = seq * config.intermediate_size as u64 * 3 * f; // one segment's MLP activations
    let total = acts + attn + block + hess + transient;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    (
        total,
        format!(
            "~{:.2} GiB peak: activations {:.2} GiB, attention outputs {:.2} GiB, one block {:.2} GiB, Hessians + solver {:.2} GiB",
            gib(total),
            gib(acts),
            gib(attn),
            gib(block),
            gib(hess)
        ),
    )
}

/// `MemAvailable` of `/proc/meminfo` in bytes, where there is one.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// An error when a run needs more than the memory available (unless `force`).
pub fn check_memory(need: u64, available: Option<u64>, force: bool) -> Result<()> {
    let Some(avail) = available else {
        return Ok(());
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if need > avail && !force {
        bail!(
            "this run needs ~{:.2} GiB at its peak but only {:.2} GiB of memory is available; \
             lower --nsamples or --seqlen (the activations grow with their product), or pass \
             --force to run anyway",
            gib(need),
            gib(avail)
        );
    }
    Ok(())
}

impl From<LayerEntry> for LayerLog {
    fn from(e: LayerEntry) -> Self {
        Self {
            name: e.name,
            loss: e.loss,
            seconds: e.seconds,
        }
    }
}

/// A checkpoint's layers with their specs (blocks `0..next_block` of `config`).
pub(crate) fn restored_layers(
    config: &ModelConfig,
    layers: Vec<(String, LayerResult)>,
    next_block: usize,
) -> Result<Vec<(LinearSpec, LayerResult)>> {
    let specs: Vec<LinearSpec> = (0..next_block)
        .flat_map(|l| crate::model::spec::block_linears(config, l))
        .collect();
    layers
        .into_iter()
        .map(|(name, res)| {
            let spec = specs
                .iter()
                .find(|s| s.name == name)
                .cloned()
                .with_context(|| format!("checkpoint holds unknown layer `{name}`"))?;
            Ok((spec, res))
        })
        .collect()
}

/// The block-by-block progress bar of a calibrated run (hidden without `progress`),
/// positioned at `first`; a resumed run says so, always: its result depends on what an
/// earlier process did.
pub(crate) fn blocks_bar(
    progress: bool,
    n_blocks: usize,
    name: &str,
    first: usize,
    checkpoint: Option<&Checkpoint>,
) -> ProgressBar {
    let bar = crate::util::progress_bar(progress, n_blocks, "blocks", &name.to_uppercase());
    bar.set_position(first as u64);
    if first > 0 {
        say(
            &bar,
            format!(
                "resuming from the checkpoint {} after block {}",
                checkpoint.map_or(String::new(), |c| c.dir().display().to_string()),
                first - 1
            ),
        );
    }
    bar
}

/// A log line above the bar, or on stderr when no bar is drawn (indicatif draws nothing
/// when stderr is not a terminal, and the log must stay then).
pub(crate) fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}")
    } else {
        bar.println(line)
    }
}

pub fn quantize_model_calibrated(
    config: &ModelConfig,
    store: &WeightStore,
    calib: &CalibrationSet,
    quantizer: &dyn LayerQuantizer,
    opts: &CalibratedOptions,
) -> Result<CalibratedModel> {
    let start = Instant::now();
    let device = Device::Cpu;
    let resume = match &opts.checkpoint {
        Some(c) => c
            .load(opts.grid, &device)
            .with_context(|| format!("reading checkpoint {}", c.dir().display()))?,
        None => None,
    };
    let mut log = Vec::new();
    // blocks below `replay_until` are run again with their restored codes (no solve) to
    // recompute activations a damaged checkpoint lost
    let (mut inputs, first, replay_until, restored) = match resume {
        Some(r) => {
            let restored = restored_layers(config, r.layers, r.next_block)?;
            log.extend(r.log.into_iter().map(LayerLog::from));
            match r.inputs {
                Some(x) => (x, r.next_block, 0, restored),
                None => (
                    embed_segments(config, store, calib, &device)?,
                    r.next_block,
                    r.next_block,
                    restored,
                ),
            }
        }
        None => (
            embed_segments(config, store, calib, &device)?,
            0,
            0,
            Vec::new(),
        ),
    };
    let mut layers = Vec::new();
    if replay_until > 0 {
        eprintln!(
            "recomputing the activations of blocks 0..{replay_until} from the checkpointed codes"
        );
        for layer in 0..replay_until {
            let mut replay = |g: &GroupInput| -> Result<Vec<Vec<f32>>> {
                g.specs
                    .iter()
                    .map(|spec| {
                        restored
                            .iter()
                            .find(|(s, _)| s.name == spec.name)
                            .map(|(_, r)| r.codes.dequantize())
                            .with_context(|| format!("checkpoint lacks `{}`", spec.name))
                    })
                    .collect()
            };
            run_block(config, store, layer, &mut inputs, opts.runner, &mut replay)?;
        }
    }
    layers.extend(restored);
    let n_blocks = config.num_hidden_layers;
    let bar = blocks_bar(
        opts.progress,
        n_blocks,
        quantizer.name(),
        first,
        opts.checkpoint.as_ref(),
    );
    let mut solve_seconds = 0.0;
    let mut pending_save: Option<SaveInBackground> = None;
    for layer in first..n_blocks {
        bar.set_message(format!("block {layer}"));
        let mut block_layers: Vec<(LinearSpec, LayerResult)> = Vec::new();
        let mut block_log: Vec<LayerEntry> = Vec::new();
        let mut on_group = |g: &GroupInput| -> Result<Vec<Vec<f32>>> {
            let mut replacements = Vec::with_capacity(g.specs.len());
            for (spec, w) in g.specs.iter().zip(&g.weights) {
                let t = Instant::now();
                let r = quantizer
                    .quantize(&LayerToQuantize {
                        name: &spec.name,
                        weight: w,
                        out_features: spec.out_features,
                        in_features: spec.in_features,
                        hessian: Some(g.hessian),
                    })
                    .with_context(|| format!("quantizing `{}`", spec.name))?;
                let secs = t.elapsed().as_secs_f64();
                solve_seconds += secs;
                let loss = r
                    .column_loss
                    .as_ref()
                    .map(|l| l.iter().sum::<f64>())
                    .or(r.trained_loss.map(|(_, end)| end));
                if opts.progress {
                    let from = r
                        .trained_loss
                        .map_or(String::new(), |(start, _)| format!(" (from {start:.4})"));
                    let line = format!(
                        "  {:<40} loss {:>12}{from}  {:>6.2} s",
                        spec.name,
                        loss.map_or("-".into(), |l| format!("{l:.4}")),
                        secs
                    );
                    say(&bar, line);
                }
                block_log.push(LayerEntry {
                    name: spec.name.clone(),
                    loss,
                    seconds: secs,
                });
                replacements.push(r.codes.dequantize());
                block_layers.push((spec.clone(), r));
            }
            Ok(replacements)
        };
        let ran = run_block(
            config,
            store,
            layer,
            &mut inputs,
            opts.runner,
            &mut on_group,
        );
        // the previous block's checkpoint lands even when this block failed (resume starts
        // after it)
        if let Some(save) = pending_save.take() {
            save.finish()?;
        }
        ran?;
        if let Some(c) = &opts.checkpoint {
            pending_save = Some(SaveInBackground::start(
                c,
                layer,
                block_layers.clone(),
                block_log.clone(),
                inputs.clone(),
            ));
        }
        log.extend(block_log.into_iter().map(LayerLog::from));
        layers.extend(block_layers);
        bar.inc(1);
    }
    if let Some(save) = pending_save {
        save.finish()?;
    }
    bar.finish_and_clear();
    Ok(CalibratedModel {
        layers,
        log,
        seconds: start.elapsed().as_secs_f64(),
        solve_seconds,
        resumed_at: first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_check_names_both_numbers_and_the_way_out() {
        let gib = 1u64 << 30;
        let err = check_memory(879 * gib, Some(23 * gib), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("879.00 GiB") && err.contains("23.00 GiB"),
            "{err}"
        );
        assert!(
            err.contains("--nsamples") && err.contains("--force"),
            "{err}"
        );
        check_memory(879 * gib, Some(23 * gib), true).unwrap();
        check_memory(gib, Some(23 * gib), false).unwrap();
        check_memory(879 * gib, None, false).unwrap();
    }
}
