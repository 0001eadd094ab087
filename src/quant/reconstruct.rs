//! Block reconstruction: the looper for methods that train a whole decoder block at a time
//! (FlexRound; learned NUPES and OSTQuant to come). Block by block it keeps two activation
//! streams — the float model's (targets) and the quantized model's (inputs) — starts every
//! linear from a layer rounding's codes (RTN on the planned grid, or GPTQ run on the
//! quantized stream), lets the [`BlockReconstruction`] train them, keeps the start where
//! training did not lower the block loss, and checkpoints per block (the quantized stream is
//! saved; the float stream is recomputed from the float model on resume).

use crate::calibration::{embed_segments, run_block, CalibrationSet, GroupInput, RunnerOptions};
use crate::loader::{ModelConfig, WeightStore};
use crate::model::spec::block_linears;
use crate::model::{BlockContext, DecoderBlock, LinearSource, LinearSpec};
use crate::quant::calibrated::{blocks_bar, restored_layers, say, CalibratedModel, LayerLog};
use crate::quant::checkpoint::{Checkpoint, LayerEntry};
use crate::quant::rounding::PlannedRounding;
use crate::quant::{LayerCodes, LayerQuantizer, LayerResult, LayerToQuantize, UniformGrid};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use std::time::Instant;

/// One block handed to a [`BlockReconstruction`].
pub struct BlockJob<'a> {
    pub config: &'a ModelConfig,
    pub layer: usize,
    /// The float block.
    pub block: &'a DecoderBlock,
    /// Every linear's starting codes, in [`block_linears`] order.
    pub init: &'a [LayerCodes],
    /// The quantized stream: the block's inputs in the quantized model, `[1, seq, hidden]`.
    pub inputs: &'a [Tensor],
    /// The float block's outputs on the float stream.
    pub targets: &'a [Tensor],
    /// For a status message while training.
    pub bar: &'a ProgressBar,
}

/// A method that trains one block's quantized linears against the float block.
pub trait BlockReconstruction: Send + Sync {
    /// Name for logs and the progress bar.
    fn name(&self) -> &'static str;
    /// The trained codes of every linear (in [`block_linears`] order, on the same plans as
    /// `job.init`), and a line for the log (steps, speed).
    fn reconstruct(&self, job: &BlockJob) -> Result<(Vec<LayerCodes>, String)>;
}

/// How many calibration sequences the loss before and after training is measured on.
const REPORT_SEQUENCES: usize = 8;

/// What the looper needs besides the model and the data.
pub struct BlockwiseOptions<'a> {
    pub method: &'a dyn BlockReconstruction,
    /// The starting rounding on every linear's planned grid (RTN; GPTQ when it needs the
    /// Hessian, which the looper then collects on the quantized stream).
    pub init: &'a PlannedRounding<'a>,
    pub runner: RunnerOptions,
    /// The grid checkpointed uniform layers are restored on.
    pub grid: UniformGrid,
    pub progress: bool,
    pub checkpoint: Option<Checkpoint>,
    /// What the streams are held in between blocks (f32, or bf16 for half the memory);
    /// every forward computes in f32.
    pub stream_dtype: DType,
}

/// Quantize every block's linears by block reconstruction.
pub fn quantize_by_blocks(
    config: &ModelConfig,
    store: &WeightStore,
    calib: &CalibrationSet,
    opts: &BlockwiseOptions,
) -> Result<CalibratedModel> {
    let start = Instant::now();
    let device = Device::Cpu;
    let n_blocks = config.num_hidden_layers;
    let resume = match &opts.checkpoint {
        Some(c) => c
            .load(opts.grid, &device)
            .with_context(|| format!("reading checkpoint {}", c.dir().display()))?,
        None => None,
    };
    let held = opts.stream_dtype;
    let embedded = embed_segments(config, store, calib, &device)?
        .iter()
        .map(|x| x.to_dtype(held))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut layers: Vec<(LinearSpec, LayerResult)> = Vec::new();
    let mut log = Vec::new();
    let (mut fp, mut qs, first) = match resume {
        None => (embedded.clone(), embedded, 0),
        Some(r) => {
            let first = r.next_block;
            layers = restored_layers(config, r.layers, first)?;
            log.extend(r.log.into_iter().map(LayerLog::from));
            // the float stream is not checkpointed: run the float blocks again
            let mut fp = embedded.clone();
            for l in 0..first {
                fp = forward_all(&load_block(config, store, l, None)?, &fp, config, held)?;
            }
            let qs = match r.inputs {
                Some(x) => x
                    .iter()
                    .map(|x| x.to_dtype(held))
                    .collect::<candle_core::Result<_>>()?,
                None => {
                    let mut qs = embedded;
                    for l in 0..first {
                        let w: Vec<Vec<f32>> = block_linears(config, l)
                            .iter()
                            .map(|s| {
                                layers
                                    .iter()
                                    .find(|(x, _)| x.name == s.name)
                                    .map(|(_, r)| r.codes.dequantize())
                                    .with_context(|| format!("checkpoint lacks `{}`", s.name))
                            })
                            .collect::<Result<_>>()?;
                        let block = load_block(config, store, l, Some(w))?;
                        qs = forward_all(&block, &qs, config, held)?;
                    }
                    qs
                }
            };
            (fp, qs, first)
        }
    };

    let bar = blocks_bar(
        opts.progress,
        n_blocks,
        opts.method.name(),
        first,
        opts.checkpoint.as_ref(),
    );
    let say = |line: String| say(&bar, line);
    let mut solve_seconds = 0.0;
    for layer in first..n_blocks {
        bar.set_message(format!("block {layer}"));
        let t0 = Instant::now();
        let block = load_block(config, store, layer, None)?;
        let fp_out = forward_all(&block, &fp, config, held)?;
        let specs = block_linears(config, layer);
        let mut entries: Vec<LayerEntry> = Vec::new();
        let init = initial_codes(config, store, layer, &qs, &specs, opts, &mut entries, &say)?;
        let report: Vec<usize> = (0..qs.len().min(REPORT_SEQUENCES)).collect();
        let dense = |codes: &[LayerCodes]| -> Vec<Vec<f32>> {
            codes.iter().map(|c| c.dequantize()).collect()
        };
        let before = block_loss(config, store, layer, dense(&init), &qs, &fp_out, &report)?;

        let t_train = Instant::now();
        let (trained, summary) = opts.method.reconstruct(&BlockJob {
            config,
            layer,
            block: &block,
            init: &init,
            inputs: &qs,
            targets: &fp_out,
            bar: &bar,
        })?;
        let train_secs = t_train.elapsed().as_secs_f64();
        let after = block_loss(config, store, layer, dense(&trained), &qs, &fp_out, &report)?;
        // keep the start when training did not lower the block loss on the report set
        let (codes, kept) = if after <= before {
            (trained, "trained")
        } else {
            (init, "start kept")
        };
        if opts.progress {
            say(format!(
                "  block {layer:<3} loss {before:.6} → {:.6} ({kept}) in {train_secs:.1} s: {summary}",
                after.min(before),
            ));
        }
        qs = forward_all(
            &load_block(config, store, layer, Some(dense(&codes)))?,
            &qs,
            config,
            held,
        )?;
        fp = fp_out;
        let secs = t0.elapsed().as_secs_f64();
        solve_seconds += secs;
        let block_layers: Vec<(LinearSpec, LayerResult)> = specs
            .iter()
            .cloned()
            .zip(codes)
            .map(|(s, c)| {
                (
                    s,
                    LayerResult {
                        codes: c,
                        column_loss: None,
                        trained_loss: Some((before, after.min(before))),
                    },
                )
            })
            .collect();
        // one log line per linear, the block's loss on each (it is what was minimised)
        if entries.is_empty() {
            entries = specs
                .iter()
                .map(|s| LayerEntry {
                    name: s.name.clone(),
                    loss: None,
                    seconds: 0.0,
                })
                .collect();
        }
        for e in entries.iter_mut() {
            e.loss = Some(after.min(before));
            e.seconds += secs / specs.len() as f64;
        }
        if let Some(c) = &opts.checkpoint {
            c.save_block(layer, &block_layers, &entries, &qs)?;
        }
        log.extend(entries.into_iter().map(LayerLog::from));
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

/// Block `layer` with its float weights, or with `weights` (`[out, in]` each, in
/// [`block_linears`] order).
fn load_block(
    config: &ModelConfig,
    store: &WeightStore,
    layer: usize,
    weights: Option<Vec<Vec<f32>>>,
) -> Result<DecoderBlock> {
    let specs = block_linears(config, layer);
    let source = |s: &LinearSpec| -> Result<LinearSource> {
        match &weights {
            Some(w) => {
                let i = specs
                    .iter()
                    .position(|x| x.name == s.name)
                    .context("a linear of this block")?;
                Ok(LinearSource::Dense(w[i].clone()))
            }
            None => store
                .f32_vec(
                    &format!("{}.weight", s.name),
                    &[s.out_features, s.in_features],
                )
                .map(LinearSource::Dense),
        }
    };
    DecoderBlock::load(config, store, layer, &source, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading block {layer}"))
}

/// `block` on every sequence (fused ops, no gradient), computed in f32, the outputs held
/// in `held`.
fn forward_all(
    block: &DecoderBlock,
    xs: &[Tensor],
    config: &ModelConfig,
    held: DType,
) -> Result<Vec<Tensor>> {
    let seq = xs.first().map(|t| t.dim(1)).transpose()?.unwrap_or(1);
    let ctx = BlockContext::new(config, seq, DType::F32, &Device::Cpu)?;
    xs.iter()
        .map(|x| Ok(block.forward(&x.to_dtype(DType::F32)?, &ctx)?.to_dtype(held)?))
        .collect()
}

/// Mean squared error of the block with `weights` on the quantized stream against the
/// float targets, over the sequences `which`.
fn block_loss(
    config: &ModelConfig,
    store: &WeightStore,
    layer: usize,
    weights: Vec<Vec<f32>>,
    qs: &[Tensor],
    targets: &[Tensor],
    which: &[usize],
) -> Result<f64> {
    let block = load_block(config, store, layer, Some(weights))?;
    let xs: Vec<Tensor> = which.iter().map(|&i| qs[i].clone()).collect();
    let outs = forward_all(&block, &xs, config, DType::F32)?;
    let mut total = 0.0;
    for (o, &i) in outs.iter().zip(which) {
        let target = targets[i].to_dtype(DType::F32)?;
        total += (o - target)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total / which.len().max(1) as f64)
}

/// The codes training starts from, in [`block_linears`] order: a data-free rounding (RTN)
/// on every planned grid, or one that needs Hessians (GPTQ) run on the quantized stream,
/// logged per linear as GPTQ logs.
#[allow(clippy::too_many_arguments)]
fn initial_codes(
    config: &ModelConfig,
    store: &WeightStore,
    layer: usize,
    qs: &[Tensor],
    specs: &[LinearSpec],
    opts: &BlockwiseOptions,
    entries: &mut Vec<LayerEntry>,
    say: &dyn Fn(String),
) -> Result<Vec<LayerCodes>> {
    if !opts.init.needs_hessian() {
        return specs
            .iter()
            .map(|s| {
                let w = store.f32_vec(
                    &format!("{}.weight", s.name),
                    &[s.out_features, s.in_features],
                )?;
                Ok(opts
                    .init
                    .quantize(&LayerToQuantize {
                        name: &s.name,
                        weight: &w,
                        out_features: s.out_features,
                        in_features: s.in_features,
                        hessian: None,
                    })?
                    .codes)
            })
            .collect();
    }
    {
        {
            let mut found: Vec<(String, LayerCodes)> = Vec::new();
            // the runner computes in f32 (a transient f32 copy of bf16 streams)
            let mut scratch = qs
                .iter()
                .map(|x| x.to_dtype(DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let mut on_group = |g: &GroupInput| -> Result<Vec<Vec<f32>>> {
                let mut out = Vec::new();
                for (spec, w) in g.specs.iter().zip(&g.weights) {
                    let t = Instant::now();
                    let r = opts
                        .init
                        .quantize(&LayerToQuantize {
                            name: &spec.name,
                            weight: w,
                            out_features: spec.out_features,
                            in_features: spec.in_features,
                            hessian: Some(g.hessian),
                        })
                        .with_context(|| format!("the start of `{}`", spec.name))?;
                    let loss = r.column_loss.as_ref().map(|l| l.iter().sum::<f64>());
                    let secs = t.elapsed().as_secs_f64();
                    if opts.progress {
                        say(format!(
                            "  {:<40} {} loss {:>12}  {:>6.2} s",
                            spec.name,
                            opts.init.name(),
                            loss.map_or("-".into(), |l| format!("{l:.4}")),
                            secs
                        ));
                    }
                    entries.push(LayerEntry {
                        name: spec.name.clone(),
                        loss,
                        seconds: secs,
                    });
                    out.push(r.codes.dequantize());
                    found.push((spec.name.clone(), r.codes));
                }
                Ok(out)
            };
            run_block(
                config,
                store,
                layer,
                &mut scratch,
                opts.runner,
                &mut on_group,
            )?;
            specs
                .iter()
                .map(|s| {
                    found
                        .iter()
                        .position(|(n, _)| *n == s.name)
                        .map(|i| found.swap_remove(i).1)
                        .with_context(|| format!("the start gave no codes for `{}`", s.name))
                })
                .collect()
        }
    }
}
