//! The layer-by-layer runner (methods.md §1.2): embed the calibration segments, then for
//! each decoder block load it alone in f32, record the inputs of its linears as Hessians,
//! hand each group of linears that share an input to a quantizer, swap in the result, and
//! pass the block's *quantized* outputs on to the next block.
//!
//! Memory: one block in f32, the activations of all segments (`[n, seq, hidden]`, plus the
//! attention outputs while a block is in flight) and that block's Hessians; never the
//! whole model in f32.

use super::hessian::HessianAccumulator;
use super::CalibrationSet;
use crate::loader::{ModelConfig, WeightStore};
use crate::model::spec::{block_linears, LINEAR_GROUPS};
use crate::model::{
    BlockContext, BlockObserver, DecoderBlock, Flow, LinearSpec, NoObserver, Paused,
};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// One group of linears handed to the quantizer.
pub struct GroupInput<'a> {
    pub block: usize,
    pub specs: &'a [LinearSpec],
    /// Current f32 weights, `[out, in]` each.
    pub weights: Vec<Vec<f32>>,
    /// `2/N Σ x xᵀ` of the group's shared input.
    pub hessian: &'a [f32],
}

#[derive(Debug, Clone, Copy)]
pub struct RunnerOptions {
    /// Quantize `[q,k,v] → [o] → [gate,up] → [down]`, each group seeing the outputs of the
    /// already-quantized ones (default). When false, every group's Hessian comes from the
    /// float block (the original GPTQ recipe for OPT).
    pub true_sequential: bool,
}

/// The block's input embeddings for every segment, `[1, seq, hidden]` each.
pub fn embed_segments(
    config: &ModelConfig,
    store: &WeightStore,
    calib: &CalibrationSet,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let h = config.hidden_size;
    let table = store.tensor(
        "model.embed_tokens.weight",
        &[config.vocab_size, h],
        DType::F32,
        device,
    )?;
    calib
        .segments
        .iter()
        .map(|seg| {
            for &t in seg {
                anyhow::ensure!(
                    (t as usize) < config.vocab_size,
                    "calibration token {t} is outside the vocabulary"
                );
            }
            let ids = Tensor::from_slice(seg, seg.len(), device)?;
            Ok(table.index_select(&ids, 0)?.reshape((1, seg.len(), h))?)
        })
        .collect()
}

/// Run block `layer` over `inputs` (replaced by the block's quantized outputs), calling
/// `on_group` for each group of linears; it returns the weights to swap in.
pub fn run_block(
    config: &ModelConfig,
    store: &WeightStore,
    layer: usize,
    inputs: &mut [Tensor],
    opts: RunnerOptions,
    on_group: &mut dyn FnMut(&GroupInput) -> Result<Vec<Vec<f32>>>,
) -> Result<()> {
    let device = inputs
        .first()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    let dense = |s: &LinearSpec| {
        store
            .f32_vec(
                &format!("{}.weight", s.name),
                &[s.out_features, s.in_features],
            )
            .map(crate::model::LinearSource::Dense)
    };
    let mut block = DecoderBlock::load(config, store, layer, &dense, DType::F32, &device)
        .with_context(|| format!("loading block {layer}"))?;
    let seq = inputs.first().map(|t| t.dim(1)).transpose()?.unwrap_or(1);
    let ctx = BlockContext::new(config, seq, DType::F32, &device)?;
    let specs = block_linears(config, layer);

    let mut quantize_group =
        |block: &mut DecoderBlock, g: usize, hessian: Vec<f32>| -> Result<()> {
            let first: usize = LINEAR_GROUPS[..g].iter().map(|g| g.linears.len()).sum();
            let decls = LINEAR_GROUPS[g].linears;
            let group_specs = &specs[first..first + decls.len()];
            let weights = decls
                .iter()
                .map(|l| {
                    Ok(block
                        .linear(l.suffix)?
                        .weight()?
                        .flatten_all()?
                        .to_vec1::<f32>()?)
                })
                .collect::<Result<Vec<_>>>()?;
            let new = on_group(&GroupInput {
                block: layer,
                specs: group_specs,
                weights,
                hessian: &hessian,
            })?;
            anyhow::ensure!(
                new.len() == decls.len(),
                "block {layer} group {g}: {} weights returned for {} linears",
                new.len(),
                decls.len()
            );
            for ((l, spec), w) in decls.iter().zip(group_specs).zip(new) {
                let t = Tensor::from_vec(w, (spec.out_features, spec.in_features), &device)?;
                block
                    .linear_mut(l.suffix)
                    .context("a declared linear")?
                    .set_weight(t)?;
            }
            Ok(())
        };

    if opts.true_sequential {
        // Pause every segment's forward at group g's input, quantize g from their
        // Hessian, resume: each group sees the outputs of the already-quantized ones.
        let mut paused: Vec<Option<Paused>> = inputs.iter().map(|_| None).collect();
        for (g, group) in LINEAR_GROUPS.iter().enumerate() {
            let mut tap = Tap {
                group: g,
                acc: HessianAccumulator::new(group.input.size(config)),
            };
            for (x, p) in inputs.iter().zip(paused.iter_mut()) {
                let out = match p.take() {
                    None => block.forward_observed(x, &ctx, &mut tap)?,
                    Some(p) => block.resume(p, &ctx, &mut tap)?,
                };
                *p = Some(out.paused()?);
            }
            quantize_group(&mut block, g, tap.acc.finish()?)?;
        }
        for (x, p) in inputs.iter_mut().zip(paused) {
            let p = p.context("every segment paused at the last group")?;
            *x = block.resume(p, &ctx, &mut NoObserver)?.done()?;
        }
    } else {
        // Every group's Hessian from the float block; the forward stops at the last
        // group's input (its output is recomputed with the quantized weights below).
        let mut taps = TapAll(
            LINEAR_GROUPS
                .iter()
                .map(|g| HessianAccumulator::new(g.input.size(config)))
                .collect(),
        );
        for x in inputs.iter() {
            block.forward_observed(x, &ctx, &mut taps)?;
        }
        for (g, acc) in taps.0.into_iter().enumerate() {
            quantize_group(&mut block, g, acc.finish()?)?;
        }
        for x in inputs.iter_mut() {
            *x = block.forward(x, &ctx)?;
        }
    }
    Ok(())
}

/// Accumulates one group's input and pauses the forward there.
struct Tap {
    group: usize,
    acc: HessianAccumulator,
}

impl BlockObserver for Tap {
    fn group_input(&mut self, group: usize, x: &Tensor) -> Result<Flow> {
        anyhow::ensure!(
            group == self.group,
            "expected linear group {}, saw {group}",
            self.group
        );
        self.acc.add(x)?;
        Ok(Flow::Stop)
    }
}

/// Accumulates every group's input; stops after the last one.
struct TapAll(Vec<HessianAccumulator>);

impl BlockObserver for TapAll {
    fn group_input(&mut self, group: usize, x: &Tensor) -> Result<Flow> {
        self.0[group].add(x)?;
        Ok(if group + 1 == self.0.len() {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }
}
