//! `y_i = x · W_iᵀ` for several dense f32 weights `W_i` `[n_i, k]` that read the same input
//! `x` `[m, k]` (q/k/v, gate/up; or one linear alone), as one GEMM whose output columns
//! are split evenly between the threads: each thread runs the `gemm` crate's
//! single-threaded kernels on its own contiguous range of columns across all the weights.
//!
//! Why not candle's matmul per linear: it asks the `gemm` crate to thread each product
//! itself, which on the prompt shapes of a small model (512 × 576 × 576) gained only
//! ~1.1–1.5× from the second core (measured in prefill: 449 tok/s on one thread, 511 on
//! two), and every linear of a group packed `x` again. Split by columns, the threads
//! share no data and synchronize once per group, so the second core is nearly a second
//! core's worth. Same products and f32 accumulation as the matmul; the summation order
//! inside the kernels may differ.

use super::layers::{cpu_slice, Linear, LinearWeight};
use crate::util::SharedOut;
use anyhow::Result;
use candle_core::{DType, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Columns of one thread's range are rounded to this (the f32 micro-kernels' width).
const COLUMN_ALIGN: usize = 16;

/// The outputs of `linears` on their shared input `x` `[.., k]` through [`split_gemm`], or
/// `None` when it does not apply: anything but f32 dense weights and input on the CPU
/// (packed and half-precision layers have their own kernels; GPUs their own matmul).
/// Not for a loss that needs gradients: the product is computed outside candle's graph.
pub fn forward_dense_group(linears: &[&Linear], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let mut dense = Vec::with_capacity(linears.len());
    for l in linears {
        match l.weights() {
            LinearWeight::Dense(w)
                if w.device().is_cpu() && w.dtype() == DType::F32 && w.is_contiguous() =>
            {
                dense.push(w)
            }
            _ => return Ok(None),
        }
    }
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    if k == 0 || dense.iter().any(|w| w.dims2().map(|d| d.1).ok() != Some(k)) {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let held: Vec<_> = dense.iter().map(|w| w.storage_and_layout()).collect();
    let weights = held
        .iter()
        .map(|(s, l)| cpu_slice::<f32>(s, l))
        .collect::<Result<Vec<_>>>()?;
    // uninitialized: the GEMM overwrites every element without reading it (zeroing the
    // outputs first was ~3 % of an f32 prefill)
    let mut ys: Vec<Vec<f32>> = linears
        .iter()
        .map(|l| Vec::with_capacity(m * l.out_features()))
        .collect();
    let spans: Vec<OutSpan> = ys
        .iter_mut()
        .zip(linears)
        .map(|(y, l)| OutSpan {
            at: SharedOut::from_ptr(y.spare_capacity_mut().as_mut_ptr() as *mut f32),
            row_stride: l.out_features(),
        })
        .collect();
    // SAFETY: each span is the capacity of its own `[m, n_i]` vector
    unsafe { split_gemm_into(cpu_slice(&xs, xl)?, m, k, &weights, &spans) };
    for (y, l) in ys.iter_mut().zip(linears) {
        // SAFETY: split_gemm_into wrote all m rows of n_i columns
        unsafe { y.set_len(m * l.out_features()) };
    }
    ys.into_iter()
        .zip(linears)
        .map(|(y, l)| {
            let mut out_dims = dims.clone();
            *out_dims.last_mut().expect("k > 0 above") = l.out_features();
            let y = Tensor::from_vec(y, out_dims, x.device())?;
            Ok(match l.bias() {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// `outs[i]` `[m, n_i]` = `x` `[m, k]` · `weights[i]ᵀ`, with `weights[i]` `[n_i, k]`
/// row-major and `n_i = weights[i].len() / k`; every slice row-major and contiguous.
/// Panics (a programming error) when the lengths disagree.
pub fn split_gemm(x: &[f32], m: usize, k: usize, weights: &[&[f32]], outs: &mut [&mut [f32]]) {
    assert_eq!(weights.len(), outs.len());
    let spans: Vec<OutSpan> = weights
        .iter()
        .zip(outs.iter_mut())
        .map(|(w, y)| {
            assert!(
                k > 0 && w.len() % k == 0,
                "weights of {} for k = {k}",
                w.len()
            );
            let n = w.len() / k;
            assert_eq!(y.len(), m * n);
            OutSpan {
                at: SharedOut::new(y),
                row_stride: n,
            }
        })
        .collect();
    // SAFETY: each span is a whole `[m, n_i]` slice borrowed mutably for this call
    unsafe { split_gemm_into(x, m, k, weights, &spans) }
}

/// Where one weight's `[m, n]` product goes: row `r`, column `j` at `at + r·row_stride + j`.
#[derive(Clone, Copy)]
pub(crate) struct OutSpan {
    pub at: SharedOut,
    pub row_stride: usize,
}

/// [`split_gemm`] into outputs that may be column blocks of wider matrices (a row stride
/// of their own), overwriting them without reading them (uninitialized memory is fine).
///
/// # Safety
/// Every `outs[i]` must be valid for writes of `m` rows of `weights[i].len() / k`
/// elements at its row stride, and the spans must not overlap each other or `x`.
pub(crate) unsafe fn split_gemm_into(
    x: &[f32],
    m: usize,
    k: usize,
    weights: &[&[f32]],
    outs: &[OutSpan],
) {
    assert_eq!(weights.len(), outs.len());
    assert_eq!(x.len(), m * k);
    assert!(k > 0, "an empty reduction");
    let widths: Vec<usize> = weights.iter().map(|w| w.len() / k).collect();
    let total: usize = widths.iter().sum();
    if m == 0 || total == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let per_thread = total.div_ceil(threads).next_multiple_of(COLUMN_ALIGN);
    (0..total.div_ceil(per_thread))
        .into_par_iter()
        .for_each(|t| {
            let (lo, hi) = (t * per_thread, ((t + 1) * per_thread).min(total));
            let mut start = 0;
            for (i, &n) in widths.iter().enumerate() {
                let (a, b) = (lo.max(start), hi.min(start + n));
                if a < b {
                    let (c0, cols) = (a - start, b - a);
                    // SAFETY: dst is columns c0..c0+cols of outs[i] (the caller's promise),
                    // written by this task alone (the column ranges are disjoint); lhs is x
                    // `[m, k]`; rhs is rows c0..c0+cols of weights[i] read transposed
                    // (`[k, cols]`: row stride 1, column stride k), inside the slice.
                    unsafe {
                        gemm::gemm(
                            m,
                            cols,
                            k,
                            outs[i].at.at(c0),
                            1,
                            outs[i].row_stride as isize,
                            false,
                            x.as_ptr(),
                            1,
                            k as isize,
                            weights[i].as_ptr().add(c0 * k),
                            k as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                    }
                }
                start += n;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::SplitMix64;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }

    #[test]
    fn matches_a_float64_reference_for_groups_and_ragged_widths() {
        // widths that straddle the thread split, a 1-column weight, one row, odd k
        for (m, k, widths) in [
            (5, 64, vec![96, 32, 32]),
            (1, 7, vec![1]),
            (33, 130, vec![17, 100, 3]),
            (64, 48, vec![300]),
        ] {
            let x = random(m * k, 3 + m as u64);
            let ws: Vec<Vec<f32>> = widths
                .iter()
                .enumerate()
                .map(|(i, &n)| random(n * k, 100 + i as u64))
                .collect();
            let mut ys: Vec<Vec<f32>> = widths.iter().map(|&n| vec![f32::NAN; m * n]).collect();
            {
                let wr: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
                let mut yr: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                split_gemm(&x, m, k, &wr, &mut yr);
            }
            for ((w, y), &n) in ws.iter().zip(&ys).zip(&widths) {
                for r in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|c| x[r * k + c] as f64 * w[j * k + c] as f64)
                            .sum();
                        let got = y[r * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                            "m {m} k {k} n {n} at ({r}, {j}): {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
