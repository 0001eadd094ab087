//! One FlexRound block-training step (forward + backward through a decoder block of the
//! fixture's shape, the quantizers' backward and Adam) as useful GFLOP/s against the f32
//! matmul rate measured in the same run. Goal (issue 11): at least 40 %.
//!
//!     cargo bench --bench flexround
//!
//! Useful work: the block's matmuls forward (`2 · params · tokens` plus attention's
//! `4 · batch · heads · seq² · head_dim`, halved by the causal mask it does not skip) and
//! twice that backward (gradients of activations and of weights).

use bitsmith::loader::{resolve_model, ModelConfig, WeightStore};
use bitsmith::model::{BlockContext, DecoderBlock, LinearSource, LinearSpec};
use bitsmith::quant::allocation::LayerPlan;
use bitsmith::quant::flexround::blockwise::{train_step, StepTiming};
use bitsmith::quant::flexround::FlexQuantizer;
use bitsmith::quant::rounding::LayerRounding;
use bitsmith::quant::{GroupSize, LayerToQuantize, RtnRounding, UniformGrid};
use candle_core::{DType, Device, Tensor};

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "timing.rs"]
mod timing;
use timing::matmul_gflops;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    // SmolLM2-135M's block
    let s = common::Synth {
        hidden: 576,
        intermediate: 1536,
        layers: 1,
        heads: 9,
        kv_heads: 3,
        ..common::Synth::default()
    };
    s.write(dir.path(), 1, false);
    let files = resolve_model(dir.path().to_str().unwrap(), None).unwrap();
    let config = ModelConfig::from_file(&files.config).unwrap();
    let store = WeightStore::open(&files.weights).unwrap();
    let dense = |sp: &LinearSpec| {
        store
            .f32_vec(
                &format!("{}.weight", sp.name),
                &[sp.out_features, sp.in_features],
            )
            .map(LinearSource::Dense)
    };
    let block = DecoderBlock::load(&config, &store, 0, &dense, DType::F32, &Device::Cpu).unwrap();
    let weights = block.weights().unwrap();
    let plan = LayerPlan::Uniform(UniformGrid::new(3, GroupSize::Columns(128), false).unwrap());
    let specs = bitsmith::model::block_linears(&config, 0);
    let mut quantizers: Vec<FlexQuantizer> = specs
        .iter()
        .zip(&weights.linears)
        .map(|(sp, w)| {
            let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let layer = LayerToQuantize {
                name: &sp.name,
                weight: &w,
                out_features: sp.out_features,
                in_features: sp.in_features,
                hessian: None,
            };
            let init = RtnRounding.round(&layer, &plan).unwrap().codes;
            FlexQuantizer::new(&w, &init, false).unwrap()
        })
        .collect();
    let params: usize = specs.iter().map(|s| s.out_features * s.in_features).sum();

    for (batch, seq) in [(2usize, 512usize), (4, 256), (1, 1024)] {
        let ctx = BlockContext::new(&config, seq, DType::F32, &Device::Cpu)
            .unwrap()
            .differentiable();
        let x = Tensor::randn(0f32, 1.0, (batch, seq, s.hidden), &Device::Cpu).unwrap();
        let y = Tensor::randn(0f32, 1.0, (batch, seq, s.hidden), &Device::Cpu).unwrap();
        let mut warm = StepTiming::default();
        train_step(
            &block,
            &weights,
            &mut quantizers,
            &x,
            &y,
            &ctx,
            1e-3,
            1,
            &mut warm,
        )
        .unwrap();
        // interleave the matmul reference with the steps: the machine is shared and noisy
        let (mut rates, mut mms) = (vec![], vec![]);
        let mut timing = StepTiming::default();
        for t in 0..5 {
            mms.push(matmul_gflops(batch * seq, 576, 1536));
            let before = timing.total();
            train_step(
                &block,
                &weights,
                &mut quantizers,
                &x,
                &y,
                &ctx,
                1e-3,
                t + 2,
                &mut timing,
            )
            .unwrap();
            let secs = timing.total() - before;
            let tokens = (batch * seq) as f64;
            let attn = 4.0 * (batch * s.heads * seq * seq * (s.hidden / s.heads)) as f64 / 2.0;
            let useful = 3.0 * (2.0 * params as f64 * tokens + attn);
            rates.push(useful / secs / 1e9);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (lo, hi) = (
            rates.iter().cloned().fold(f64::INFINITY, f64::min),
            rates.iter().cloned().fold(0.0, f64::max),
        );
        let (r, mm) = (median(&mut rates), median(&mut mms));
        let total = timing.total();
        println!(
            "batch {batch} x {seq}: {r:.1} GFLOP/s useful (range {lo:.1}–{hi:.1}), f32 matmul {mm:.1} GFLOP/s: {:.0} %; time: forward {:.0} %, backward {:.0} %, quantizers + Adam {:.0} %",
            100.0 * r / mm,
            100.0 * timing.forward / total,
            100.0 * timing.backward / total,
            100.0 * (timing.quantize + timing.update) / total
        );
    }
}
