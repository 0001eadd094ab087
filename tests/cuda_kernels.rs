//! bitsmith's CUDA launcher (`cuda` feature) against its CPU kernels on random layers: every
//! width (2/3/4/8 and mixed 0..8 with pruned columns), groups 32/64/128/−1 incl. partial
//! ones, act-order, batches 1, 3, 8 (GEMV) and 64 (GEMM), f32 and bf16 inputs. Both sides
//! compute every weight exactly; they differ in f32 accumulation order only, so each output
//! must be within `γ(K + 8)·Σ|w·x|` of the f64 reference, like the CPU tests
//! (`tests/infer_kernels.rs`). Skipped, with a message, when no CUDA device can be opened.
//!
//! The lookup-table kernels of codebook layers (NUPES) are checked the same way, at every
//! width 2..8 (codes straddling words at 3, 5, 6, 7), per group and act-order.
//!
//! `cargo test --release --features cuda --test cuda_kernels` (needs nvcc to build and a
//! GPU with its driver to run).
#![cfg(feature = "cuda")]

mod common;
mod packed_common;

use bitsmith::infer::kernels::{BitsmithLinear, LutLinear};
use bitsmith::model::PackedMatmul;
use bitsmith::quant::{CodebookQuantizedLinear, GroupSize};
use candle_core::{DType, Device, Tensor};
use packed_common::*;

/// The layer on the GPU and on the CPU against the f64 reference, for every batch.
fn check_layer(
    dev: &Device,
    rng: &mut Rng,
    seed: u64,
    what: &str,
    kern: &dyn PackedMatmul,
    w: &[f32],
) {
    let (n, k) = (kern.out_features(), kern.in_features());
    for m in [1usize, 3, 8, 64] {
        let x = random_x(rng, m * k);
        let (want, mag) = reference(w, &x, n, k);
        let bound: Vec<f64> = mag.iter().map(|a| gamma(k + 8) * a).collect();
        let xc = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("x on the CPU");
        let cpu: Vec<f32> = kern
            .matmul(&xc)
            .and_then(|y| Ok(y.flatten_all()?.to_vec1()?))
            .expect("CPU matmul");
        check(&format!("{what} batch {m} CPU"), seed, &cpu, &want, &bound);
        let xt = Tensor::from_vec(x.clone(), (m, k), dev).expect("upload x");
        let y = kern.matmul(&xt).expect("CUDA matmul");
        assert_eq!(y.dims(), [m, n], "{what}: output shape");
        assert!(y.device().is_cuda(), "{what}: output stays on the GPU");
        let gpu: Vec<f32> = y.flatten_all().unwrap().to_vec1().expect("download y");
        check(&format!("{what} batch {m} CUDA"), seed, &gpu, &want, &bound);
        // a bf16 input comes back as bf16, computed in f32 from the bf16 values
        let yb = kern
            .matmul(&xt.to_dtype(DType::BF16).unwrap())
            .expect("CUDA matmul bf16");
        assert_eq!(
            yb.dtype(),
            DType::BF16,
            "{what}: output dtype = input dtype"
        );
    }
}

#[test]
fn cuda_launcher_matches_reference() {
    let Some(dev) = common::cuda_or_skip() else {
        return;
    };
    let seed = seed();
    let mut rng = Rng(seed);
    for &(n, k) in &[(37, 40), (37, 130), (19, 576), (577, 576), (300, 4096)] {
        for bits in [2u8, 3, 4, 8] {
            for group in [32i64, 64, 128, -1] {
                let group = GroupSize::from_i64(group).expect("valid group");
                for act_order in [false, true] {
                    let q = random_layer(&mut rng, n, k, bits, group, !act_order, act_order);
                    let kern = BitsmithLinear::from_quantized(&q).expect("repack");
                    let what = format!("{n}x{k} w{bits} g{} act_order={act_order}", group.as_i64());
                    check_layer(&dev, &mut rng, seed, &what, &kern, &q.dequantize());
                }
            }
        }
    }
    for_each_mixed_case(&mut rng, |rng, what, q| {
        let kern = BitsmithLinear::from_mixed(&q).expect("repack");
        check_layer(&dev, rng, seed, &what, &kern, &q.dequantize());
    });
}

/// A codebook layer of random codes, scales and table (any table: the kernels look it up).
fn random_codebook(
    rng: &mut Rng,
    n: usize,
    k: usize,
    bits: u8,
    group: GroupSize,
    act_order: bool,
) -> CodebookQuantizedLinear {
    let g = group.columns(k);
    let mut g_idx: Vec<u32> = (0..k).map(|j| (j / g) as u32).collect();
    if act_order {
        rng.shuffle(&mut g_idx);
    }
    CodebookQuantizedLinear {
        out_features: n,
        in_features: k,
        bits,
        group_size: group,
        exponent: 0.7,
        table: (0..1u32 << bits).map(|_| 2.0 * rng.unit() - 1.0).collect(),
        codes: (0..n * k).map(|_| rng.below(1 << bits) as u8).collect(),
        scales: (0..group.n_groups(k) * n)
            .map(|_| random_scale(rng))
            .collect(),
        g_idx,
    }
}

#[test]
fn cuda_lookup_kernels_match_reference() {
    let Some(dev) = common::cuda_or_skip() else {
        return;
    };
    let seed = seed();
    let mut rng = Rng(seed);
    for &(n, k) in &[(37, 40), (19, 576), (577, 576), (300, 4096)] {
        for bits in 2u8..=8 {
            for group in [32i64, 128, -1] {
                let group = GroupSize::from_i64(group).expect("valid group");
                for act_order in [false, true] {
                    let q = random_codebook(&mut rng, n, k, bits, group, act_order);
                    let kern = LutLinear::from_codebook(&q).expect("codebook layer");
                    let what = format!(
                        "lookup {n}x{k} w{bits} g{} act_order={act_order}",
                        group.as_i64()
                    );
                    check_layer(&dev, &mut rng, seed, &what, &kern, &q.dequantize());
                }
            }
        }
    }
}

#[test]
fn cuda_launcher_handles_strided_and_repeated_inputs() {
    let Some(dev) = common::cuda_or_skip() else {
        return;
    };
    let mut rng = Rng(5);
    let q = random_layer(&mut rng, 64, 576, 4, GroupSize::Columns(128), false, true);
    let kern = BitsmithLinear::from_quantized(&q).expect("repack");
    let x = random_x(&mut rng, 2 * 3 * 576);
    // a non-contiguous view (every other row of a [6, 576] tensor) and a second call that
    // reuses the cached upload
    let full = Tensor::from_vec(x.clone(), (6, 576), &dev).unwrap();
    let view = full
        .reshape((3, 2, 576))
        .unwrap()
        .narrow(1, 1, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let rows: Vec<f32> = [1usize, 3, 5]
        .iter()
        .flat_map(|&r| x[r * 576..(r + 1) * 576].to_vec())
        .collect();
    let (want, mag) = reference(&q.dequantize(), &rows, 64, 576);
    let bound: Vec<f64> = mag.iter().map(|a| gamma(576 + 8) * a).collect();
    for call in 0..2 {
        let got: Vec<f32> = kern
            .matmul(&view)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        check(
            &format!("strided view, call {call}"),
            5,
            &got,
            &want,
            &bound,
        );
    }
}

/// The online Hadamard's CUDA launch (`kernels/bitsmith_hadamard.cu`) against the dense
/// matrix in f64, at Paley factors 1, 12, 28, 36 and 344 (GF(7³): Llama-2's 11008 = 32·344),
/// for f32 and bf16 inputs and a leading batch shape.
#[test]
fn cuda_online_hadamard_matches_reference() {
    use bitsmith::model::{Hadamard, OnlineHadamard};
    let Some(dev) = common::cuda_or_skip() else {
        return;
    };
    for n in [64usize, 96, 576, 1536, 896, 11008, 14336] {
        let (p, m) = Hadamard::new(n).expect("order").factors();
        let rows = 3;
        let x: Vec<f32> = (0..rows * n)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
            .collect();
        // the reference from the factors: Sylvester's closed form times H_m
        let h = Hadamard::new(n).expect("order");
        let small = h.small_factor();
        let scale = 1.0 / (n as f64).sqrt();
        for dtype in [DType::F32, DType::BF16] {
            let op = OnlineHadamard::new(n, dtype, &dev).expect("op on the GPU");
            let t = Tensor::from_vec(x.clone(), (1, rows, n), &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .and_then(|t| t.to_device(&dev))
                .expect("x on the GPU");
            let got: Vec<f32> = op
                .forward(&t)
                .and_then(|y| Ok(y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
                .expect("the launch");
            let xin: Vec<f64> = Tensor::from_vec(x.clone(), rows * n, &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype)?.to_dtype(DType::F32)?.to_vec1::<f32>())
                .expect("x rounded")
                .iter()
                .map(|&v| v as f64)
                .collect();
            let tol_rel = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
            for r in 0..rows {
                for j in (0..n).step_by(7) {
                    let (a2, b2) = (j / m, j % m);
                    let want: f64 = (0..n)
                        .map(|i| {
                            let (a, b) = (i / m, i % m);
                            let syl = if (a & a2).count_ones() % 2 == 0 {
                                1.0
                            } else {
                                -1.0
                            };
                            xin[r * n + i] * syl * small[b * m + b2] as f64
                        })
                        .sum::<f64>()
                        * scale;
                    let got = got[r * n + j] as f64;
                    assert!(
                        (got - want).abs() <= tol_rel * (1.0 + want.abs()),
                        "n {n} ({p}·{m}) {dtype:?} row {r} col {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
