//! A whole packed model on a CUDA device (`cuda` feature) against the same model on the
//! CPU: a synthetic Llama (GQA, tied head) quantized by RTN (w4 g32 asymmetric, w3
//! per-channel symmetric), written in the GPTQ layout, loaded packed on both devices. The
//! full forward, a prefill followed by cached one-token decode steps (batch 2), and a bf16
//! forward on the GPU must follow the CPU's f32 logits. The packed layers run on bitsmith's
//! GPU kernels there, every other op on candle's CUDA backend. Skipped, with a message, when
//! no CUDA device can be opened.
//!
//! `cargo test --release --features cuda --test cuda_model` (needs nvcc to build and a GPU
//! with its driver to run).
#![cfg(feature = "cuda")]

mod common;

use bitsmith::infer::{load_model_with, Route, WeightMode};
use bitsmith::loader::resolve_model;
use bitsmith::model::{CausalLm, LogitsFor};
use bitsmith::pack::ZeroConvention;
use bitsmith::quant::GroupSize;
use candle_core::{DType, Device, Tensor};
use common::{rtn_packed, RtnPacked, Synth};

/// A synthetic model quantized and written as a packed GPTQ-layout folder.
fn packed_model(s: &Synth, bits: u8, group: GroupSize, sym: bool) -> RtnPacked {
    rtn_packed(s, bits, group, sym, ZeroConvention::V1, false)
}

fn load(packed: &std::path::Path, dtype: DType, dev: &Device) -> CausalLm {
    let files = resolve_model(packed.to_str().unwrap(), None).unwrap();
    load_model_with(&files, dtype, dev, WeightMode::Packed(Route::Auto)).unwrap()
}

fn ids_tensor(ids: &[Vec<u32>], from: usize, to: usize, dev: &Device) -> Tensor {
    let flat: Vec<u32> = ids.iter().flat_map(|r| r[from..to].to_vec()).collect();
    Tensor::from_vec(flat, (ids.len(), to - from), dev).unwrap()
}

/// Logits of every position, `[batch][position][vocab]`: a prefill of `prefill` tokens,
/// then one-token cached steps to the end.
fn cached_logits(m: &CausalLm, ids: &[Vec<u32>], prefill: usize) -> Vec<Vec<Vec<f32>>> {
    let dev = m.device().clone();
    let n = ids[0].len();
    let mut cache = m.new_cache(n);
    let mut out = vec![Vec::new(); ids.len()];
    let mut from = 0;
    for to in std::iter::once(prefill).chain(prefill + 1..=n) {
        let logits = m
            .forward_cached(&ids_tensor(ids, from, to, &dev), &mut cache, LogitsFor::All)
            .unwrap();
        assert!(
            logits.device().same_device(&dev),
            "logits stay on the model's device"
        );
        let rows: Vec<Vec<Vec<f32>>> = logits.to_dtype(DType::F32).unwrap().to_vec3().unwrap();
        for (b, r) in rows.into_iter().enumerate() {
            out[b].extend(r);
        }
        from = to;
    }
    out
}

/// Largest |a − b| over the largest |b| (at least 1).
/// `got` within `tol` of `want` (max |Δ| / max |logit|), the figure printed either way.
fn assert_close(got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f32>>], tol: f64, what: &str) {
    let d = max_rel_diff(got, want);
    eprintln!("{what}: max |Δ|/max|logit| = {d:.2e}");
    assert!(
        d < tol,
        "{what}: max |Δ|/max|logit| {d:.2e} (limit {tol:.0e})"
    );
}

fn max_rel_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f64 {
    let flat =
        |t: &[Vec<Vec<f32>>]| -> Vec<f32> { t.iter().flatten().flatten().copied().collect() };
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len(), "logit counts differ");
    let scale = b.iter().fold(1f64, |m, x| m.max(x.abs() as f64));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    diff / scale
}

#[test]
fn packed_model_on_the_gpu_follows_the_cpu() {
    let Some(gpu) = common::cuda_or_skip() else {
        return;
    };
    // widths the GEMV tiles evenly and ones it does not (intermediate 352 = 11 × 32)
    let s = Synth {
        hidden: 256,
        intermediate: 352,
        layers: 2,
        heads: 8,
        kv_heads: 2,
        vocab: 301,
        ..Synth::default()
    };
    for (bits, group, sym) in [
        (4u8, GroupSize::Columns(32), false),
        (3, GroupSize::PerChannel, true),
    ] {
        let what = format!("w{bits} {group:?} sym {sym}");
        let dir = packed_model(&s, bits, group, sym);
        let cpu = load(&dir.packed, DType::F32, &Device::Cpu);
        let on_gpu = load(&dir.packed, DType::F32, &gpu);
        assert!(on_gpu.device().is_cuda(), "{what}: loaded on the GPU");
        let ids = s.batch_ids(12);

        // the full forward (prefill of all 12 tokens)
        let want = cached_logits(&cpu, &ids, 12);
        let got = cached_logits(&on_gpu, &ids, 12);
        assert_close(
            &got,
            &want,
            1e-4,
            &format!("{what}: GPU full forward vs CPU"),
        );

        // prefill 5, then seven cached one-token steps: batch 1–2 GEMV on the GPU
        let want_steps = cached_logits(&cpu, &ids, 5);
        let got_steps = cached_logits(&on_gpu, &ids, 5);
        let steps = format!("{what}: GPU prefill 5 + 7 decode steps vs CPU");
        assert_close(&got_steps, &want_steps, 1e-4, &steps);
        let cpu_steps = format!("{what}: CPU decode vs its forward");
        assert_close(&want_steps, &want, 1e-4, &cpu_steps);

        // bf16 compute on the GPU: the packed layers take bf16 activations
        let half = load(&dir.packed, DType::BF16, &gpu);
        let bf16 = format!("{what}: bf16 on the GPU vs f32 CPU");
        assert_close(&cached_logits(&half, &ids, 5), &want, 5e-2, &bf16);
    }
}
