//! Batch-1..8 GEMV on dense row-major weights held as f32 or as bf16 bits: the fused decode
//! step's path for float linears and for an LM head kept in its bf16 source precision
//! ([`super::Bf16Linear`]). Each weight is read once per call and multiplied in f32 (a
//! bf16 value widens to f32 exactly), so the result differs from an f32 matmul over the
//! same values by accumulation order only. Memory-bound by design: no repacking.

use crate::model::layers::cpu_slice;
use crate::model::{DenseGemv, MAX_GEMV_ROWS};
use crate::util::SharedOut;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};
use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Dense `[out, in]` weights, row-major.
#[derive(Debug, Clone, Copy)]
pub enum DenseRows<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
}

impl DenseRows<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F32(w) => w.len(),
            Self::Bf16(w) => w.len(),
        }
    }
}

/// [`DenseGemv`] for the model's fused decode step: [`gemv`] on the weight tensor's own
/// memory (f32, or bf16 bits widened exactly in registers).
#[derive(Debug)]
pub struct DenseKernel;

impl DenseGemv for DenseKernel {
    fn gemv(&self, w: &Tensor, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        let (n, k) = w.dims2()?;
        ensure!(
            x.len() == rows * k,
            "dense gemv: {} inputs for {rows} rows of {k}",
            x.len()
        );
        let (storage, layout) = w.storage_and_layout();
        match w.dtype() {
            DType::F32 => gemv(DenseRows::F32(cpu_slice(&storage, layout)?), n, k, x, y),
            DType::BF16 => gemv(
                DenseRows::Bf16(cpu_slice::<bf16>(&storage, layout)?.reinterpret_cast()),
                n,
                k,
                x,
                y,
            ),
            other => bail!("dense gemv: {other:?} weights (f32 or bf16 only)"),
        }
        Ok(())
    }
}

/// Output rows per rayon task: ≥ 16 KiB of f32 weights per task at the fixture's width.
const ROWS_PER_TASK: usize = 8;

/// `y` `[m, n]` = `x` `[m, k]` · `Wᵀ` for `W` `[n, k]`, `m` = `x.len() / k` in 1..=8;
/// `y` is overwritten.
pub fn gemv(w: DenseRows, n: usize, k: usize, x: &[f32], y: &mut [f32]) {
    assert!(k > 0 && x.len().is_multiple_of(k), "x is not [m, {k}]");
    let m = x.len() / k;
    assert!(
        (1..=MAX_GEMV_ROWS).contains(&m),
        "dense gemv takes 1..=8 rows, got {m}"
    );
    assert_eq!(w.len(), n * k, "weights are not [{n}, {k}]");
    assert_eq!(y.len(), m * n, "output is not [{m}, {n}]");
    let out = SharedOut::new(y);
    #[cfg(target_arch = "x86_64")]
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl");
    (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n);
            for r in rows {
                let mut acc = [0f32; MAX_GEMV_ROWS];
                #[cfg(target_arch = "x86_64")]
                if avx512 {
                    // SAFETY: AVX-512F/BW/VL were detected at run time; row r is in bounds.
                    unsafe { x86::row(w, r, k, x, m, &mut acc) };
                } else {
                    row_portable(w, r, k, x, m, &mut acc);
                }
                #[cfg(not(target_arch = "x86_64"))]
                row_portable(w, r, k, x, m, &mut acc);
                for (i, &v) in acc[..m].iter().enumerate() {
                    // SAFETY: output (i, r) is in bounds and written by this task alone.
                    unsafe { *out.at(i * n + r) = v };
                }
            }
        });
}

fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

fn row_portable(w: DenseRows, r: usize, k: usize, x: &[f32], m: usize, acc: &mut [f32]) {
    for (i, xr) in x.chunks_exact(k).take(m).enumerate() {
        acc[i] = match w {
            DenseRows::F32(w) => w[r * k..(r + 1) * k]
                .iter()
                .zip(xr)
                .map(|(a, b)| a * b)
                .sum(),
            DenseRows::Bf16(w) => w[r * k..(r + 1) * k]
                .iter()
                .zip(xr)
                .map(|(&a, b)| bf16_to_f32(a) * b)
                .sum(),
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::DenseRows;
    use std::arch::x86_64::*;

    /// 16 weights of row `r` from column `c` as f32 (`mask` selects the valid lanes).
    #[inline(always)]
    unsafe fn load(w: DenseRows, at: usize, mask: __mmask16) -> __m512 {
        match w {
            DenseRows::F32(w) => _mm512_maskz_loadu_ps(mask, w.as_ptr().add(at)),
            DenseRows::Bf16(w) => {
                let h = _mm256_maskz_loadu_epi16(mask, w.as_ptr().add(at) as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }

    /// One weight row against `m` input rows: two accumulators per input row hide the FMA
    /// latency; the tail is masked.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn row(w: DenseRows, r: usize, k: usize, x: &[f32], m: usize, acc: &mut [f32]) {
        let base = r * k;
        let xp = x.as_ptr();
        let mut a0 = [_mm512_setzero_ps(); super::MAX_GEMV_ROWS];
        let mut a1 = [_mm512_setzero_ps(); super::MAX_GEMV_ROWS];
        let mut c = 0;
        while c + 32 <= k {
            let w0 = load(w, base + c, !0);
            let w1 = load(w, base + c + 16, !0);
            for i in 0..m {
                a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp.add(i * k + c)), a0[i]);
                a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(i * k + c + 16)), a1[i]);
            }
            c += 32;
        }
        while c < k {
            let mask: __mmask16 = if k - c >= 16 {
                !0
            } else {
                (1u16 << (k - c)) - 1
            };
            let w0 = load(w, base + c, mask);
            for (i, a) in a0[..m].iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(i * k + c));
                *a = _mm512_fmadd_ps(w0, xv, *a);
            }
            c += 16;
        }
        for ((out, &x0), &x1) in acc[..m].iter_mut().zip(&a0).zip(&a1) {
            *out = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], n: usize, k: usize, x: &[f32]) -> Vec<f64> {
        let m = x.len() / k;
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for r in 0..n {
                y[i * n + r] = (0..k)
                    .map(|c| w[r * k + c] as f64 * x[i * k + c] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn f32_and_bf16_match_a_float64_reference() {
        let mut s = 0x9E3779B97F4A7C15u64;
        let mut unit = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for &(n, k, m) in &[
            (1, 1, 1),
            (37, 45, 1),
            (70, 576, 3),
            (19, 100, 8),
            (5, 33, 2),
        ] {
            let w: Vec<f32> = (0..n * k).map(|_| unit()).collect();
            let x: Vec<f32> = (0..m * k).map(|_| unit()).collect();
            // bf16 weights: the same values rounded to bf16, referenced exactly
            let wb: Vec<u16> = w
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let wbf: Vec<f32> = wb.iter().map(|&b| bf16_to_f32(b)).collect();
            for (rows, wf) in [(DenseRows::F32(&w), &w), (DenseRows::Bf16(&wb), &wbf)] {
                let mut y = vec![f32::NAN; m * n];
                gemv(rows, n, k, &x, &mut y);
                let want = reference(wf, n, k, &x);
                for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
                    let mag: f64 = (0..k)
                        .map(|c| (wf[(i % n) * k + c] as f64 * x[(i / n) * k + c] as f64).abs())
                        .sum();
                    let bound = (k as f64 + 8.0) * 2f64.powi(-24) * mag * 1.01 + 1e-30;
                    assert!(
                        (a as f64 - b).abs() <= bound,
                        "{n}x{k} m={m} out {i}: {a} vs {b} (bound {bound})"
                    );
                }
            }
        }
    }
}
