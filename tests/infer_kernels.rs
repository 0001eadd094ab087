//! Packed kernels against dequantize-then-matmul (`QuantizedLinear::dequantize`, products
//! summed in f64) on random layers and inputs, fresh each run (the seed is printed on
//! failure; `BITSMITH_TEST_SEED` replays one).
//!
//! Bounds, relative to `mag = Σ_k |w_k·x_k|` of each output:
//! - bitsmith kernels compute every weight exactly and differ only in the order of f32
//!   accumulation, so `|y − ref| ≤ γ(K + 8)·mag` with `γ(n) = n·u/(1 − n·u)`, `u = 2⁻²⁴`
//!   (the classical bound for a sum of K products, plus the reduction tree's depth);
//! - the GGML route quantizes each activation block (32, or 256 for candle's x86 repacked
//!   kernels) to 8 bits with an f16 or f32 block scale `d = max|x|/127`, an error of at
//!   most `0.5·d + 127·2⁻¹¹·d ≤ 0.57·d` per activation; Q4_1 also rounds `m = −scale·zero`
//!   to f16 (`≤ 2⁻¹¹·|m|` per weight) and its Q8_1 block sum to f16. The bound is
//!   `Σ_blocks 0.57·d_b·Σ|w| + Σ_k 2⁻¹⁰·|m|·(|x_k| + d_b) + 2⁻¹⁰·mag`.

use bitsmith::infer::ggml::{ggml_type, GgmlLinear};
use bitsmith::infer::kernels::{BitsmithLinear, Isa};
use bitsmith::model::PackedMatmul;
use bitsmith::quant::{GroupSize, QuantizedLinear};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

mod packed_common;
use packed_common::*;

const BATCHES: &[usize] = &[1, 2, 3, 7, 8, 9, 64];

/// Run `kernel` under every ISA and batch against `w`'s reference.
fn check_bitsmith(rng: &mut Rng, seed: u64, what: &str, kernel: BitsmithLinear, w: &[f32]) {
    let (n, k) = (kernel.out_features(), kernel.in_features());
    let mut kernel = Some(kernel);
    for isa in Isa::available() {
        let kern = kernel
            .take()
            .expect("kernel")
            .with_isa(isa)
            .expect("available isa");
        for &m in BATCHES {
            let x = random_x(rng, m * k);
            let (want, mag) = reference(w, &x, n, k);
            let bound: Vec<f64> = mag.iter().map(|a| gamma(k + 8) * a).collect();
            let y = kern.matmul_f32(&x, m);
            check(
                &format!("{what} {isa:?} batch {m}"),
                seed,
                &y,
                &want,
                &bound,
            );
        }
        kernel = Some(kern);
    }
}

#[test]
fn bitsmith_matches_dequantized_reference() {
    let seed = seed();
    let mut rng = Rng(seed);
    let shapes = [(37, 40), (37, 130), (19, 576), (577, 576)];
    for &(n, k) in &shapes {
        for bits in [2u8, 3, 4, 8] {
            for group in [32i64, 64, 128, -1] {
                let group = GroupSize::from_i64(group).expect("valid group");
                for sym in [true, false] {
                    for act_order in [false, true] {
                        // the big shape only in a sample of configurations: same code paths
                        if n == 577 && (sym || act_order) {
                            continue;
                        }
                        let q = random_layer(&mut rng, n, k, bits, group, sym, act_order);
                        let what = format!(
                            "{n}x{k} w{bits} g{} sym={sym} act_order={act_order}",
                            group.as_i64()
                        );
                        let kern = BitsmithLinear::from_quantized(&q).expect("repack");
                        check_bitsmith(&mut rng, seed, &what, kern, &q.dequantize());
                    }
                }
            }
        }
    }
}

/// `--kernels int8` (batches above 8): the only error against the exact product is each
/// activation's rounding to int8, weighted by the weight itself (the zero-point term uses
/// the quantized activations' sum): `|y − Σ w·x| ≤ Σ_k |w_k| · d/2` with the step
/// `d ≤ max_k |x_k| / 127`, plus f32 rounding of terms as large as `s·code·x`. The AVX-512
/// VNNI kernel gives the portable kernel's bits.
#[test]
fn int8_route_within_rounding_bound_and_kernels_agree() {
    let seed = seed();
    let mut rng = Rng(seed);
    for &(n, k) in &[(37, 40), (19, 576), (70, 130)] {
        for bits in [2u8, 4, 8] {
            for group in [32i64, 128, -1] {
                let group = GroupSize::from_i64(group).expect("valid group");
                for (sym, act_order) in [(true, false), (false, false), (false, true)] {
                    let q = random_layer(&mut rng, n, k, bits, group, sym, act_order);
                    let what = format!(
                        "{n}x{k} w{bits} g{} sym={sym} act_order={act_order}",
                        group.as_i64()
                    );
                    let w = q.dequantize();
                    // −scale·zero at every weight: |scale·code| = |w − wz|
                    let mut q0 = q.clone();
                    q0.codes.fill(0);
                    let wz = q0.dequantize();
                    let mut by_isa: Vec<(Isa, Vec<f32>)> = Vec::new();
                    let m = 9 + rng.below(12) as usize;
                    let x = random_x(&mut rng, m * k);
                    for isa in Isa::available() {
                        let kern = BitsmithLinear::from_quantized(&q)
                            .expect("repack")
                            .with_isa(isa)
                            .expect("available isa")
                            .with_int8_activations();
                        by_isa.push((isa, kern.matmul_f32(&x, m)));
                    }
                    let (want, _) = reference(&w, &x, n, k);
                    let mut bound = vec![0f64; m * n];
                    for t in 0..m {
                        let xt = &x[t * k..(t + 1) * k];
                        let d = xt.iter().fold(0f64, |a, &v| a.max(v.abs() as f64)) / 127.0;
                        for j in 0..n {
                            let (wj, zj) = (&w[j * k..(j + 1) * k], &wz[j * k..(j + 1) * k]);
                            let (mut rounding, mut big) = (0f64, 0f64);
                            for ((&wv, &zv), &xv) in wj.iter().zip(zj).zip(xt) {
                                rounding += wv.abs() as f64;
                                big += ((wv - zv).abs() + zv.abs()) as f64 * (xv.abs() as f64 + d);
                            }
                            bound[t * n + j] =
                                0.5 * d * (1.0 + 1e-4) * rounding + gamma(3 * k + 8) * big;
                        }
                    }
                    for (isa, y) in &by_isa {
                        check(
                            &format!("{what} int8 {isa:?} batch {m}"),
                            seed,
                            y,
                            &want,
                            &bound,
                        );
                    }
                    let first = &by_isa[0].1;
                    for (isa, y) in &by_isa[1..] {
                        assert!(
                            y.iter().zip(first).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{what}: the int8 {isa:?} kernel differs from the portable one (seed {seed})"
                        );
                    }
                }
            }
        }
    }
}

/// A layer past the GEMV's pool threshold (2 MiB of codes), and calls from inside rayon's
/// pool as well as from outside: every call gives the same bits (the order of
/// accumulation per output does not depend on the threads).
#[test]
fn bitsmith_gemv_large_and_nested_calls() {
    use rayon::prelude::*;
    let seed = seed();
    let mut rng = Rng(seed);
    let (n, k) = (2048, 1024);
    let q = random_layer(&mut rng, n, k, 8, GroupSize::PerChannel, false, false);
    let kern = BitsmithLinear::from_quantized(&q).expect("repack");
    check_bitsmith(
        &mut rng,
        seed,
        "2048x1024 w8 per-channel",
        kern,
        &q.dequantize(),
    );
    for (n, k, bits) in [(2048, 1024, 8u8), (576, 576, 4)] {
        let q = random_layer(&mut rng, n, k, bits, GroupSize::Columns(128), true, false);
        let kern = BitsmithLinear::from_quantized(&q).expect("repack");
        for m in [1usize, 3] {
            let x = random_x(&mut rng, m * k);
            let want = kern.matmul_f32(&x, m);
            let nested: Vec<Vec<f32>> = (0..8)
                .into_par_iter()
                .map(|_| kern.matmul_f32(&x, m))
                .collect();
            for y in nested {
                assert!(
                    y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{n}x{k} w{bits} batch {m}: a call inside the pool differs (seed {seed})"
                );
            }
        }
    }
}

#[test]
fn bitsmith_mixed_widths_match_reference() {
    let seed = seed();
    let mut rng = Rng(seed);
    for_each_mixed_case(&mut rng, |rng, what, q| {
        let kern = BitsmithLinear::from_mixed(&q).expect("repack");
        check_bitsmith(rng, seed, &what, kern, &q.dequantize());
    });
}

/// BAQ prunes a whole layer (`--allowed-bits 0`, or a model-wide budget that gives it 0
/// bits) or all but a few columns: every kernel and batch size agrees with
/// dequantize-then-matmul (exactly 0 for a fully pruned layer), through the model's
/// tensor seam too, and the GGML route says why it cannot take the layer.
#[test]
fn pruned_layers_match_reference_on_every_route() {
    use bitsmith::infer::{packed_mixed, Route};
    let seed = seed();
    let mut rng = Rng(seed);
    let (n, k) = (24, 70);
    let except = |cols: &[(usize, u8)]| {
        let mut w = vec![0u8; k];
        cols.iter().for_each(|&(j, b)| w[j] = b);
        w
    };
    let cases = [
        ("all pruned", vec![0u8; k]),
        ("one 3-bit column", except(&[(37, 3)])),
        // a 2-bit run shorter than a slot and an 8-bit run of one column
        (
            "three 2-bit, one 8-bit",
            except(&[(0, 2), (5, 2), (69, 2), (40, 8)]),
        ),
    ];
    for (what, widths) in cases {
        for group in [None, Some(7)] {
            let q = mixed_with_widths(&mut rng, n, widths.clone(), group);
            let w = q.dequantize();
            if what == "all pruned" {
                assert!(w.iter().all(|&v| v == 0.0));
            }
            let what = format!("{what}, groups {group:?}");
            let kern = BitsmithLinear::from_mixed(&q).expect("repack");
            check_bitsmith(&mut rng, seed, &what, kern, &w);
            let layer = packed_mixed(&q, Route::Auto).expect("packed");
            for m in [1usize, 9] {
                let x = random_x(&mut rng, m * k);
                let (want, mag) = reference(&w, &x, n, k);
                let y: Vec<f32> = layer
                    .matmul(&Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap())
                    .expect("matmul")
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let bound: Vec<f64> = mag.iter().map(|a| gamma(k + 8) * a).collect();
                check(&format!("{what} tensor batch {m}"), seed, &y, &want, &bound);
            }
            let e = packed_mixed(&q, Route::Ggml).map(|_| ()).unwrap_err();
            assert!(e.to_string().contains("no GGML block type"), "{e}");
        }
    }
}

#[test]
fn layout_skips_the_gather_only_when_it_is_the_identity() {
    let mut rng = Rng(7);
    let plain = random_layer(&mut rng, 8, 576, 4, GroupSize::Columns(128), true, false);
    let l = BitsmithLinear::from_quantized(&plain).expect("repack");
    assert!(
        l.layout().gather.is_none(),
        "576 = 4·128 + 64 needs no gather"
    );
    let odd = random_layer(&mut rng, 8, 40, 4, GroupSize::Columns(32), true, false);
    let l = BitsmithLinear::from_quantized(&odd).expect("repack");
    assert_eq!(
        l.layout().padded_in,
        48,
        "the 8-column tail group is padded to 16"
    );
    // 4-bit g128 resident size: 4 bits per code + one u32 per 128 codes
    let l = BitsmithLinear::from_quantized(&random_layer(
        &mut rng,
        64,
        4096,
        4,
        GroupSize::Columns(128),
        true,
        false,
    ))
    .expect("repack");
    assert_eq!(l.resident_bytes(), 64 * 4096 / 2 + 64 * 32 * 4);
}

/// The GGML bound of the module doc, per output.
fn ggml_bound(q: &QuantizedLinear, w: &[f32], x: &[f32], mag: &[f64]) -> Vec<f64> {
    let (n, k) = (q.out_features, q.in_features);
    let block = if k % 256 == 0 { 256 } else { 32 };
    let m = x.len() / k;
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        let xi = &x[i * k..(i + 1) * k];
        for r in 0..n {
            let mut e = 2f64.powi(-10) * mag[i * n + r];
            for (b, xb) in xi.chunks(block).enumerate() {
                let d = xb.iter().fold(0f64, |a, &v| a.max(v.abs() as f64)) / 127.0;
                for (j, &xv) in xb.iter().enumerate() {
                    let col = b * block + j;
                    let p = q.params(q.g_idx[col] as usize, r);
                    let mm = (p.scale * p.zero as f32).abs() as f64;
                    e += 0.57 * d * w[r * k + col].abs() as f64
                        + 2f64.powi(-10) * mm * (xv.abs() as f64 + d);
                }
            }
            out[i * n + r] = e;
        }
    }
    out
}

#[test]
fn ggml_route_within_activation_quantization_bound() {
    let seed = seed();
    let mut rng = Rng(seed);
    let cases = [
        (4u8, 32i64, true, GgmlDType::Q4_0),
        (4, 128, true, GgmlDType::Q4_0),
        (8, 64, true, GgmlDType::Q8_0),
        (8, -1, true, GgmlDType::Q8_0),
        (4, 32, false, GgmlDType::Q4_1),
        (4, 128, false, GgmlDType::Q4_1),
    ];
    for &(n, k) in &[(37, 576), (64, 512)] {
        for &(bits, g, sym, want) in &cases {
            let group = GroupSize::from_i64(g).expect("group");
            let q = random_layer(&mut rng, n, k, bits, group, sym, false);
            assert_eq!(ggml_type(&q), Some(want));
            let kern = GgmlLinear::from_quantized(&q).expect("repack");
            let w = q.dequantize();
            let (mut worst, mut err, mut size) = (0f64, 0f64, 0f64);
            for &m in BATCHES {
                let x = random_x(&mut rng, m * k);
                let (ref_y, mag) = reference(&w, &x, n, k);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("x");
                let y = kern
                    .matmul(&xt)
                    .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                    .expect("matmul");
                let bound = ggml_bound(&q, &w, &x, &mag);
                let what = format!("{want:?} {n}x{k} g{g} batch {m}");
                worst = worst.max(check(&what, seed, &y, &ref_y, &bound));
                for (&a, &b) in y.iter().zip(&ref_y) {
                    err = err.max((a as f64 - b).abs());
                    size = size.max(b.abs());
                }
            }
            eprintln!(
                "{want:?} {n}x{k} g{g}: worst error / bound = {worst:.3}, max error / max |y| = {:.2e}",
                err / size
            );
        }
    }
    // act-order, 3-bit and partial groups have no exact block type
    let act = random_layer(&mut rng, 8, 256, 4, GroupSize::Columns(32), true, true);
    assert_eq!(ggml_type(&act), None);
    let odd = random_layer(&mut rng, 8, 576, 4, GroupSize::Columns(48), true, false);
    assert!(GgmlLinear::from_quantized(&odd).is_err());
}
