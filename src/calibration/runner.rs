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
use crate::model::spec::block_linears;
use crate::model::{BlockContext, DecoderBlock, LinearSpec};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// Linears that read the same input, in the order true-sequential quantizes them.
pub const LINEAR_GROUPS: [&[&str]; 4] = [
    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    &["self_attn.o_proj"],
    &["mlp.gate_proj", "mlp.up_proj"],
    &["mlp.down_proj"],
];

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
    let dims = [
        config.hidden_size,
        config.num_attention_heads * config.head_dim,
        config.hidden_size,
        config.intermediate_size,
    ];

    let mut quantize_group =
        |block: &mut DecoderBlock, g: usize, hessian: Vec<f32>| -> Result<()> {
            let group_specs: Vec<LinearSpec> = specs
                .iter()
                .filter(|s| {
                    LINEAR_GROUPS[g]
                        .iter()
                        .any(|suffix| s.name.ends_with(suffix))
                })
                .cloned()
                .collect();
            let weights = LINEAR_GROUPS[g]
                .iter()
                .map(|suffix| {
                    Ok(block
                        .linear_mut(suffix)
                        .expect("known suffix")
                        .weight()?
                        .flatten_all()?
                        .to_vec1::<f32>()?)
                })
                .collect::<Result<Vec<_>>>()?;
            let new = on_group(&GroupInput {
                block: layer,
                specs: &group_specs,
                weights,
                hessian: &hessian,
            })?;
            for ((suffix, spec), w) in LINEAR_GROUPS[g].iter().zip(&group_specs).zip(new) {
                let t = Tensor::from_vec(w, (spec.out_features, spec.in_features), &device)?;
                block
                    .linear_mut(suffix)
                    .expect("known suffix")
                    .set_weight(t)?;
            }
            Ok(())
        };

    if opts.true_sequential {
        // [q,k,v]: input = input_layernorm(x)
        let mut acc = HessianAccumulator::new(dims[0]);
        for x in inputs.iter() {
            acc.add(&block.input_layernorm.forward(x)?)?;
        }
        quantize_group(&mut block, 0, acc.finish()?)?;
        // [o]: input = attention output with the quantized q/k/v
        let mut acc = HessianAccumulator::new(dims[1]);
        let mut attn = Vec::with_capacity(inputs.len());
        for x in inputs.iter() {
            let a = block
                .self_attn
                .core(&block.input_layernorm.forward(x)?, &ctx)?;
            acc.add(&a)?;
            attn.push(a);
        }
        quantize_group(&mut block, 1, acc.finish()?)?;
        // [gate,up]: input = post_attention_layernorm(x + o(attn)); keep the residual
        let mut acc = HessianAccumulator::new(dims[2]);
        for (x, a) in inputs.iter_mut().zip(attn.drain(..)) {
            let h = (&*x + block.self_attn.o_proj.forward(&a)?)?;
            acc.add(&block.post_attention_layernorm.forward(&h)?)?;
            *x = h;
        }
        quantize_group(&mut block, 2, acc.finish()?)?;
        // [down]: input = silu(gate) · up with the quantized gate/up
        let mut acc = HessianAccumulator::new(dims[3]);
        for h in inputs.iter() {
            acc.add(
                &block
                    .mlp
                    .hidden(&block.post_attention_layernorm.forward(h)?)?,
            )?;
        }
        quantize_group(&mut block, 3, acc.finish()?)?;
        for h in inputs.iter_mut() {
            *h = (&*h
                + block
                    .mlp
                    .forward(&block.post_attention_layernorm.forward(h)?)?)?;
        }
    } else {
        let mut accs: Vec<HessianAccumulator> =
            dims.iter().map(|&d| HessianAccumulator::new(d)).collect();
        for x in inputs.iter() {
            let xn = block.input_layernorm.forward(x)?;
            accs[0].add(&xn)?;
            let a = block.self_attn.core(&xn, &ctx)?;
            accs[1].add(&a)?;
            let h = (x + block.self_attn.o_proj.forward(&a)?)?;
            let hn = block.post_attention_layernorm.forward(&h)?;
            accs[2].add(&hn)?;
            accs[3].add(&block.mlp.hidden(&hn)?)?;
        }
        for (g, acc) in accs.into_iter().enumerate() {
            quantize_group(&mut block, g, acc.finish()?)?;
        }
        for x in inputs.iter_mut() {
            *x = block.forward(x, &ctx)?;
        }
    }
    Ok(())
}
