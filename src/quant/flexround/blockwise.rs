//! FlexRound's block-wise reconstruction (methods.md §4.3) as a [`BlockReconstruction`]:
//! the block's linears become FlexRound quantizers, trained so that the block run on the
//! quantized stream matches the float block run on the float stream (the looper in
//! [`crate::quant::reconstruct`] keeps both streams).

use super::quantizer::{cosine_lr, FlexQuantizer};
use super::FlexRoundSpec;
use crate::calibration::CalibrationSet;
use crate::loader::ModelConfig;
use crate::model::spec::block_linears;
use crate::model::layers::cpu_slice;
use crate::model::{BlockContext, BlockWeights, DecoderBlock};
use crate::quant::reconstruct::{BlockJob, BlockReconstruction};
use crate::quant::LayerCodes;
use crate::util::SplitMix64;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use indicatif::ProgressBar;
use std::time::Instant;

/// Block-wise FlexRound.
pub struct FlexRoundBlocks {
    pub spec: FlexRoundSpec,
}

impl BlockReconstruction for FlexRoundBlocks {
    fn name(&self) -> &'static str {
        "flexround"
    }

    fn reconstruct(&self, job: &BlockJob) -> Result<(Vec<LayerCodes>, String)> {
        let weights = job.block.weights()?;
        let specs = block_linears(job.config, job.layer);
        let mut quantizers = specs
            .iter()
            .zip(&weights.linears)
            .zip(job.init)
            .map(|((s, w), c)| {
                let w = w.flatten_all()?.to_vec1::<f32>()?;
                FlexQuantizer::with_options(&w, c, &self.spec)
                    .with_context(|| format!("FlexRound quantizer for `{}`", s.name))
            })
            .collect::<Result<Vec<_>>>()?;
        // a generator per block, so that a resumed run draws the batches an
        // uninterrupted one draws
        let mut rng = SplitMix64::new(
            self.spec.seed ^ (job.layer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let t = Instant::now();
        let timing = train_block(
            job.block,
            &weights,
            &mut quantizers,
            job.inputs,
            job.targets,
            &self.spec,
            &mut rng,
            job.config,
            job.bar,
        )?;
        let secs = t.elapsed().as_secs_f64();
        let codes = quantizers
            .iter()
            .zip(job.init)
            .map(|(q, c)| q.freeze(c))
            .collect::<Result<_>>()?;
        let pct = |x: f64| 100.0 * x / timing.total().max(1e-9);
        Ok((
            codes,
            format!(
                "{} steps, {:.2} steps/s (forward {:.0} %, backward {:.0} %, quantizer {:.0} %)",
                self.spec.iters,
                self.spec.iters as f64 / secs.max(1e-9),
                pct(timing.forward),
                pct(timing.backward),
                pct(timing.quantize + timing.update),
            ),
        ))
    }
}

/// Bytes block-wise training holds beyond what the calibrated runner holds: the float
/// stream and the float block's outputs (two more copies of the activations) and one
/// training step's autograd graph (per token of the batch: the block's intermediate
/// tensors, a few times the attention scores), for the estimate printed before a run.
pub fn memory_estimate(
    config: &ModelConfig,
    calib: &CalibrationSet,
    batch: usize,
    bf16_streams: bool,
) -> (u64, String) {
    let f = 4u64;
    let stream_bytes = if bf16_streams { 2 } else { 4 };
    let streams = 2 * calib.tokens() as u64 * config.hidden_size as u64 * stream_bytes;
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
        // streams may be held in bf16: the step computes in f32
        let x = Tensor::cat(&idx.iter().map(|&i| &qs[i]).collect::<Vec<_>>(), 0)?
            .to_dtype(DType::F32)?;
        let y = Tensor::cat(&idx.iter().map(|&i| &targets[i]).collect::<Vec<_>>(), 0)?
            .to_dtype(DType::F32)?;
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
    // the fake-quantized weights become the leaves without a copy (`Var::from_tensor`
    // would copy every weight once more per step)
    let leaves = quantizers
        .iter()
        .zip(&weights.linears)
        .map(|(q, w)| Ok(Var::from_vec(q.forward(), w.shape(), &Device::Cpu)?))
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
            .context("every linear of the block gets a gradient")?;
        // read in place when contiguous (it is: a matmul's output), else copied
        let (storage, layout) = g.storage_and_layout();
        match cpu_slice::<f32>(&storage, layout) {
            Ok(slice) => q.backward(slice),
            Err(_) => {
                drop(storage);
                q.backward(&g.flatten_all()?.to_vec1::<f32>()?)
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_streams_halve_the_streams_in_the_memory_estimate() {
        let config = crate::loader::ModelConfig::from_json(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 61, "rms_norm_eps": 1e-5, "max_position_embeddings": 128,
        }))
        .unwrap();
        let calib = CalibrationSet {
            segments: vec![vec![1; 32]; 8],
            seqlen: 32,
            description: String::new(),
        };
        let (f32_total, _) = memory_estimate(&config, &calib, 2, false);
        let (bf16_total, line) = memory_estimate(&config, &calib, 2, true);
        let streams_f32 = 2 * 8 * 32 * 64 * 4;
        assert_eq!(f32_total - bf16_total, streams_f32 / 2, "{line}");
    }
}
