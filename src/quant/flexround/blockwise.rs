//! FlexRound's block-wise reconstruction (methods.md §4.3): block by block, the block's
//! linears become FlexRound quantizers and are trained so that the block run on the
//! quantized stream (the outputs of the already-quantized blocks) matches the float block
//! run on the float stream. Two activation streams are kept; the float one is recomputed
//! from the float model when a run resumes from a checkpoint (which stores the quantized
//! one, as GPTQ's runs do).

use super::quantizer::{cosine_lr, FlexQuantizer};
use super::{FlexInit, FlexRoundSpec};
use crate::calibration::checkpoint::{Checkpoint, LayerEntry};
use crate::calibration::{embed_segments, run_block, CalibrationSet, GroupInput, RunnerOptions};
use crate::loader::{ModelConfig, WeightStore};
use crate::model::spec::block_linears;
use crate::model::{BlockContext, BlockWeights, DecoderBlock, LinearSource, LinearSpec};
use crate::quant::calibrated::{CalibratedModel, LayerLog};
use crate::quant::rounding::PlannedRounding;
use crate::quant::{LayerCodes, LayerQuantizer, LayerResult, LayerToQuantize, UniformGrid};
use crate::util::SplitMix64;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

/// How many calibration sequences the loss before and after training is measured on.
const REPORT_SEQUENCES: usize = 8;

/// What the block-wise trainer needs besides the model and the data.
pub struct BlockwiseOptions<'a> {
    pub spec: FlexRoundSpec,
    /// The initial rounding on every linear's planned grid (RTN or GPTQ).
    pub init: &'a PlannedRounding<'a>,
    pub runner: RunnerOptions,
    /// The grid checkpointed uniform layers are restored on.
    pub grid: UniformGrid,
    pub progress: bool,
    pub checkpoint: Option<Checkpoint>,
}

/// Bytes block-wise training holds beyond what the calibrated runner holds: the float
/// stream and the float block's outputs (two more copies of the activations) and one
/// training step's autograd graph (per token of the batch: the block's intermediate
/// tensors, a few times the attention scores), for the estimate printed before a run.
pub fn memory_estimate(
    config: &ModelConfig,
    calib: &CalibrationSet,
    batch: usize,
) -> (u64, String) {
    let f = 4u64;
    let streams = 2 * calib.tokens() as u64 * config.hidden_size as u64 * f;
    let tokens = (batch.min(calib.segments.len()) * calib.seqlen) as u64;
    let per_token = (12 * config.hidden_size + 8 * config.intermediate_size) as u64
        + 4 * (config.num_attention_heads * calib.seqlen) as u64;
    let step = tokens * per_token * f;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    (
        streams + step,
        format!(
            "FlexRound adds ~{:.2} GiB: float stream and targets {:.2} GiB, one training step {:.2} GiB",
            gib(streams + step),
            gib(streams),
            gib(step)
        ),
    )
}

/// Quantize every block's linears with block-wise FlexRound.
pub fn quantize_blockwise(
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
    let embedded = embed_segments(config, store, calib, &device)?;
    let mut layers: Vec<(LinearSpec, LayerResult)> = Vec::new();
    let mut log = Vec::new();
    let (mut fp, mut qs, first) = match resume {
        None => (embedded.clone(), embedded, 0),
        Some(r) => {
            let first = r.next_block;
            let specs: Vec<LinearSpec> =
                (0..first).flat_map(|l| block_linears(config, l)).collect();
            for (name, res) in r.layers {
                let spec = specs
                    .iter()
                    .find(|s| s.name == name)
                    .cloned()
                    .with_context(|| format!("checkpoint holds unknown layer `{name}`"))?;
                layers.push((spec, res));
            }
            log.extend(r.log.into_iter().map(|e| LayerLog {
                name: e.name,
                loss: e.loss,
                seconds: e.seconds,
            }));
            // the float stream is not checkpointed: run the float blocks again
            let mut fp = embedded.clone();
            for l in 0..first {
                fp = forward_all(&load_block(config, store, l, None)?, &fp, config)?;
            }
            let qs = match r.inputs {
                Some(x) => x,
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
                        qs = forward_all(&load_block(config, store, l, Some(w))?, &qs, config)?;
                    }
                    qs
                }
            };
            (fp, qs, first)
        }
    };

    let bar = if opts.progress {
        ProgressBar::new(n_blocks as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "FLEXROUND [{bar:30}] {pos}/{len} blocks {elapsed_precise} ETA {eta} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_position(first as u64);
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}")
        } else {
            bar.println(line)
        }
    };
    if first > 0 {
        say(format!(
            "resuming from the checkpoint {} after block {}",
            opts.checkpoint
                .as_ref()
                .map_or(String::new(), |c| c.dir().display().to_string()),
            first - 1
        ));
    }
    let mut solve_seconds = 0.0;
    for layer in first..n_blocks {
        bar.set_message(format!("block {layer}"));
        let t0 = Instant::now();
        let block = load_block(config, store, layer, None)?;
        let fp_out = forward_all(&block, &fp, config)?;
        let specs = block_linears(config, layer);
        let mut entries: Vec<LayerEntry> = Vec::new();
        let init = initial_codes(config, store, layer, &qs, &specs, opts, &mut entries, &say)?;
        let weights = block.weights()?;
        let mut quantizers = specs
            .iter()
            .zip(&weights.linears)
            .zip(&init)
            .map(|((s, w), c)| {
                let w = w.flatten_all()?.to_vec1::<f32>()?;
                FlexQuantizer::new(&w, c, opts.spec.s4)
                    .with_context(|| format!("FlexRound quantizer for `{}`", s.name))
            })
            .collect::<Result<Vec<_>>>()?;
        let report: Vec<usize> = (0..qs.len().min(REPORT_SEQUENCES)).collect();
        let dense = |codes: &[LayerCodes]| -> Vec<Vec<f32>> {
            codes.iter().map(|c| c.dequantize()).collect()
        };
        let before = block_loss(config, store, layer, dense(&init), &qs, &fp_out, &report)?;

        // a generator per block, so that a resumed run draws the batches an
        // uninterrupted one draws
        let mut rng = SplitMix64::new(
            opts.spec.seed ^ (layer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let t_train = Instant::now();
        let timing = train_block(
            &block,
            &weights,
            &mut quantizers,
            &qs,
            &fp_out,
            &opts.spec,
            &mut rng,
            config,
            &bar,
        )?;
        let train_secs = t_train.elapsed().as_secs_f64();
        let trained: Vec<LayerCodes> = quantizers
            .iter()
            .zip(&init)
            .map(|(q, c)| q.freeze(c))
            .collect::<Result<_>>()?;
        let after = block_loss(config, store, layer, dense(&trained), &qs, &fp_out, &report)?;
        // keep the start when training did not lower the block loss on the report set
        let (codes, kept) = if after <= before {
            (trained, "trained")
        } else {
            (init, "start kept")
        };
        let pct = |x: f64| 100.0 * x / timing.total().max(1e-9);
        say(format!(
            "  block {layer:<3} loss {before:.6} → {:.6} ({kept}), {} steps in {train_secs:.1} s ({:.2} steps/s: forward {:.0} %, backward {:.0} %, quantizer {:.0} %)",
            after.min(before),
            opts.spec.iters,
            opts.spec.iters as f64 / train_secs.max(1e-9),
            pct(timing.forward),
            pct(timing.backward),
            pct(timing.quantize + timing.update),
        ));
        qs = forward_all(
            &load_block(config, store, layer, Some(dense(&codes)))?,
            &qs,
            config,
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
        log.extend(entries.into_iter().map(|e| LayerLog {
            name: e.name,
            loss: e.loss,
            seconds: e.seconds,
        }));
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

/// `block` on every sequence (fused ops, no gradient).
fn forward_all(block: &DecoderBlock, xs: &[Tensor], config: &ModelConfig) -> Result<Vec<Tensor>> {
    let seq = xs.first().map(|t| t.dim(1)).transpose()?.unwrap_or(1);
    let ctx = BlockContext::new(config, seq, DType::F32, &Device::Cpu)?;
    xs.iter().map(|x| block.forward(x, &ctx)).collect()
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
    let outs = forward_all(&block, &xs, config)?;
    let mut total = 0.0;
    for (o, &i) in outs.iter().zip(which) {
        total += (o - &targets[i])?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total / which.len().max(1) as f64)
}

/// The codes training starts from, in [`block_linears`] order: RTN on every planned grid,
/// or GPTQ run on the quantized stream (its Hessians), logged per linear as GPTQ logs.
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
    match opts.spec.init {
        FlexInit::Rtn => specs
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
            .collect(),
        FlexInit::Gptq => {
            let mut found: Vec<(String, LayerCodes)> = Vec::new();
            let mut scratch = qs.to_vec();
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
                        .with_context(|| format!("GPTQ start of `{}`", spec.name))?;
                    let loss = r.column_loss.as_ref().map(|l| l.iter().sum::<f64>());
                    let secs = t.elapsed().as_secs_f64();
                    if opts.progress {
                        say(format!(
                            "  {:<40} gptq loss {:>12}  {:>6.2} s",
                            spec.name,
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
                        .with_context(|| format!("GPTQ gave no codes for `{}`", s.name))
                })
                .collect()
        }
    }
}

/// Adam on every quantizer's factors: each step a batch of quantized-stream sequences
/// through the block with fake-quantized weights (differentiable ops) against the float
/// block's outputs.
#[allow(clippy::too_many_arguments)]
fn train_block(
    block: &DecoderBlock,
    weights: &BlockWeights,
    quantizers: &mut [FlexQuantizer],
    qs: &[Tensor],
    targets: &[Tensor],
    spec: &FlexRoundSpec,
    rng: &mut SplitMix64,
    config: &ModelConfig,
    bar: &ProgressBar,
) -> Result<StepTiming> {
    let mut timing = StepTiming::default();
    ensure!(!qs.is_empty(), "FlexRound needs calibration sequences");
    let seq = qs[0].dim(1)?;
    let ctx = BlockContext::new(config, seq, DType::F32, &Device::Cpu)?.differentiable();
    let batch = spec.batch.min(qs.len());
    let mut order: Vec<usize> = Vec::new();
    let t = Instant::now();
    for step in 0..spec.iters {
        let mut idx = Vec::with_capacity(batch);
        while idx.len() < batch {
            if order.is_empty() {
                // a fresh shuffled pass over the sequences
                order = (0..qs.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
            }
            idx.push(order.pop().context("a non-empty order")?);
        }
        let x = Tensor::cat(&idx.iter().map(|&i| &qs[i]).collect::<Vec<_>>(), 0)?;
        let y = Tensor::cat(&idx.iter().map(|&i| &targets[i]).collect::<Vec<_>>(), 0)?;
        let lr = cosine_lr(spec.lr, step, spec.iters);
        let loss = train_step(
            block,
            weights,
            quantizers,
            &x,
            &y,
            &ctx,
            lr,
            step + 1,
            &mut timing,
        )?;
        if step % 10 == 9 && !bar.is_hidden() {
            let rate = (step + 1) as f64 / t.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "step {}/{} loss {:.6} {rate:.2} steps/s",
                step + 1,
                spec.iters,
                loss
            ));
        }
    }
    Ok(timing)
}

/// One Adam step of every quantizer on the batch `x` (`[b, seq, hidden]`, quantized
/// stream) against `y` (the float block's outputs): the fake-quantized weights enter the
/// block as leaves, candle's autograd gives `∂L/∂Ŵ`, the quantizers take it from there.
/// Returns the step's loss (mean squared error) and adds its time to `timing`.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    block: &DecoderBlock,
    weights: &BlockWeights,
    quantizers: &mut [FlexQuantizer],
    x: &Tensor,
    y: &Tensor,
    ctx: &BlockContext,
    lr: f32,
    t: usize,
    timing: &mut StepTiming,
) -> Result<f32> {
    let tq = Instant::now();
    let leaves = quantizers
        .iter()
        .zip(&weights.linears)
        .map(|(q, w)| {
            Ok(Var::from_tensor(&Tensor::from_vec(
                q.forward(),
                w.shape(),
                &Device::Cpu,
            )?)?)
        })
        .collect::<Result<Vec<Var>>>()?;
    let w = BlockWeights {
        linears: leaves.iter().map(|v| v.as_tensor().clone()).collect(),
        input_norm: weights.input_norm.clone(),
        post_attention_norm: weights.post_attention_norm.clone(),
    };
    let tf = Instant::now();
    let out = block.with_weights(&w)?.forward(x, ctx)?;
    let loss = (out - y)?.sqr()?.mean_all()?;
    let tb = Instant::now();
    let grads = loss.backward()?;
    let tu = Instant::now();
    for (q, leaf) in quantizers.iter_mut().zip(&leaves) {
        let g = grads
            .get(leaf.as_tensor())
            .context("every linear of the block gets a gradient")?
            .flatten_all()?
            .to_vec1::<f32>()?;
        q.backward(&g);
        q.adam_step(lr, t as i32);
    }
    timing.add(&[tq, tf, tb, tu, Instant::now()]);
    Ok(loss.to_scalar::<f32>()?)
}

/// Seconds spent in each part of the training steps: where a step's time goes.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepTiming {
    /// The quantizers' forward (fake-quantized weights).
    pub quantize: f64,
    /// The block's forward on the batch and the loss.
    pub forward: f64,
    /// The block's backward (candle autograd) to `∂L/∂Ŵ`.
    pub backward: f64,
    /// The quantizers' backward and Adam.
    pub update: f64,
}

impl StepTiming {
    pub fn add(&mut self, marks: &[Instant; 5]) {
        let d = |a: usize| (marks[a + 1] - marks[a]).as_secs_f64();
        self.quantize += d(0);
        self.forward += d(1);
        self.backward += d(2);
        self.update += d(3);
    }

    pub fn total(&self) -> f64 {
        self.quantize + self.forward + self.backward + self.update
    }
}
