//! Quantize a whole model with a calibration-based layer-wise method (GPTQ, …): the
//! layer-by-layer runner feeds each group of linears and its Hessian to the quantizer,
//! with per-block checkpoints for resuming.

use super::{LayerQuantizer, LayerResult, LayerToQuantize, UniformGrid};
use crate::calibration::checkpoint::Checkpoint;
use crate::calibration::{embed_segments, run_block, CalibrationSet, GroupInput, RunnerOptions};
use crate::loader::{ModelConfig, WeightStore};
use crate::model::LinearSpec;
use anyhow::{Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
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
    /// First block computed in this run (> 0 when resumed from a checkpoint).
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
    let (mut inputs, first, mut layers) = match resume {
        Some(r) => {
            let specs: Vec<LinearSpec> = (0..r.next_block)
                .flat_map(|l| crate::model::spec::block_linears(config, l))
                .collect();
            let mut restored = Vec::new();
            for (name, res) in r.layers {
                let spec = specs
                    .iter()
                    .find(|s| s.name == name)
                    .cloned()
                    .with_context(|| format!("checkpoint holds unknown layer `{name}`"))?;
                restored.push((spec, res));
            }
            (r.inputs, r.next_block, restored)
        }
        None => (
            embed_segments(config, store, calib, &device)?,
            0,
            Vec::new(),
        ),
    };
    let n_blocks = config.num_hidden_layers;
    let bar = if opts.progress {
        ProgressBar::new(n_blocks as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} blocks {elapsed_precise} ETA {eta} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_prefix(quantizer.name().to_uppercase());
    bar.set_position(first as u64);
    if first > 0 {
        // always said, terminal or log file, --quiet or not: a resumed run's result depends
        // on what an earlier process did
        let line = format!(
            "resuming from the checkpoint {} after block {}",
            opts.checkpoint
                .as_ref()
                .map_or(String::new(), |c| c.dir().display().to_string()),
            first - 1
        );
        if bar.is_hidden() {
            eprintln!("{line}")
        } else {
            bar.println(line)
        }
    }
    let mut log = Vec::new();
    let mut solve_seconds = 0.0;
    for layer in first..n_blocks {
        bar.set_message(format!("block {layer}"));
        let mut block_layers: Vec<(LinearSpec, LayerResult)> = Vec::new();
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
                let loss = r.column_loss.as_ref().map(|l| l.iter().sum::<f64>());
                if opts.progress {
                    let line = format!(
                        "  {:<40} loss {:>12}  {:>6.2} s",
                        spec.name,
                        loss.map_or("-".into(), |l| format!("{l:.4}")),
                        secs
                    );
                    // indicatif draws nothing when stderr is not a terminal; keep the log then
                    if bar.is_hidden() {
                        eprintln!("{line}")
                    } else {
                        bar.println(line)
                    }
                }
                log.push(LayerLog {
                    name: spec.name.clone(),
                    loss,
                    seconds: secs,
                });
                replacements.push(r.codes.dequantize());
                block_layers.push((spec.clone(), r));
            }
            Ok(replacements)
        };
        run_block(
            config,
            store,
            layer,
            &mut inputs,
            opts.runner,
            &mut on_group,
        )?;
        if let Some(c) = &opts.checkpoint {
            c.save_block(layer, &block_layers, &inputs)?;
        }
        layers.extend(block_layers);
        bar.inc(1);
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
