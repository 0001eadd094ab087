//! Large-batch bf16 × bf16 GEMM with f32 accumulation: the prefill and perplexity path of a
//! model computed in bf16. Both operands are widened to f32 (exact: a bf16 number is an f32
//! with a shorter mantissa), multiplied by the `gemm` crate's f32 kernels (AVX-512 where the
//! CPU has it) and the result rounded once to bf16 — the arithmetic of transformers' bf16
//! matmuls (f32 accumulation of exact products), at f32 GEMM speed.
//!
//! The portable bf16 GEMM, and the faster one where `vdpbf16ps` is slow (see
//! [`super::select`]). The widening costs one pass over `x` and the weights and one over the
//! result per call, small next to the `m·n·k` products at prompt sizes (`m` ≥ 9 rows; fewer
//! rows run the GEMV). candle's own bf16 matmul is slower still: it converts element by
//! element and multiplies with the `gemm` crate's bf16 path.

use crate::model::split_gemm::{split_gemm_into, OutSpan};
use crate::util::SharedOut;
use half::bf16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::prelude::*;

/// Weight rows widened per block: bounds the temporary f32 copy (the fixture's 49152-row
/// head would be 113 MB at once) while keeping each f32 GEMM call large.
const MAX_BLOCK_BYTES: usize = 16 << 20;
/// Elements per rayon task of the widening and narrowing passes.
const CONVERT_CHUNK: usize = 1 << 15;

/// `y` `[m, n]` (bf16 bits, overwritten) = `x` `[m, k]` · `Wᵀ` for `W` `[n, k]`, all bf16
/// bit patterns, row-major, accumulated in f32 and rounded to nearest even. Panics (a
/// programming error, not input) when the slices do not have those lengths.
pub fn gemm(w: &[u16], n: usize, k: usize, x: &[u16], m: usize, y: &mut [u16]) {
    gemm_in_blocks(w, n, k, x, m, y, MAX_BLOCK_BYTES)
}

/// [`gemm`] widening at most `block_bytes` of f32 weights at a time.
fn gemm_in_blocks(
    w: &[u16],
    n: usize,
    k: usize,
    x: &[u16],
    m: usize,
    y: &mut [u16],
    block_bytes: usize,
) {
    assert_eq!(w.len(), n * k);
    assert_eq!(x.len(), m * k);
    assert_eq!(y.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(bf16::ZERO.to_bits());
        return;
    }
    let xf = widen(x);
    // uninitialized: every element is written by exactly one GEMM call below (read_dst
    // false) before `set_len`; zeroing it first cost ~4 % of a bf16 prefill
    let mut yf: Vec<f32> = Vec::with_capacity(m * n);
    let y_ptr = yf.spare_capacity_mut().as_mut_ptr() as *mut f32;
    let block_rows = (block_bytes / (4 * k)).clamp(1, n);
    let mut wf = vec![0f32; block_rows * k];
    for j0 in (0..n).step_by(block_rows) {
        let rows = block_rows.min(n - j0);
        let wf = &mut wf[..rows * k];
        widen_into(&w[j0 * k..(j0 + rows) * k], wf);
        let dst = OutSpan {
            at: SharedOut::from_ptr(y_ptr.wrapping_add(j0)),
            row_stride: n,
        };
        // SAFETY: dst is columns j0..j0+rows of yf's `[m, n]` capacity (row stride n), apart
        // from xf and wf
        unsafe { split_gemm_into(&xf, m, k, &[&wf[..]], &[dst]) };
    }
    // SAFETY: the blocks cover columns 0..n of all m rows
    unsafe { yf.set_len(m * n) };
    narrow_into(&yf, y);
}

fn widen(bits: &[u16]) -> Vec<f32> {
    let mut out = vec![0f32; bits.len()];
    widen_into(bits, &mut out);
    out
}

fn widen_into(bits: &[u16], out: &mut [f32]) {
    let src: &[bf16] = bits.reinterpret_cast();
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(src.par_chunks(CONVERT_CHUNK))
        .for_each(|(o, s)| s.convert_to_f32_slice(o));
}

/// f32 → bf16 bits, rounding to nearest even.
fn narrow_into(values: &[f32], bits: &mut [u16]) {
    let dst: &mut [bf16] = bits.reinterpret_cast_mut();
    dst.par_chunks_mut(CONVERT_CHUNK)
        .zip(values.par_chunks(CONVERT_CHUNK))
        .for_each(|(d, v)| d.convert_from_f32_slice(v));
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{assert_matches_float64, random_bf16};
    use super::*;

    #[test]
    fn matches_a_float64_reference_on_every_tail() {
        // odd shapes, short and long reductions, and the weights widened in blocks of
        // 7 rows (a partial last block) as well as at once
        for &(m, n, k, block_rows) in &[
            (1, 5, 2, 0),
            (3, 48, 64, 7),
            (9, 47, 130, 0),
            (17, 100, 576, 7),
            (8, 49, 31, 7),
            (64, 300, 96, 0),
        ] {
            let w = random_bf16(n * k, 7 + n as u64);
            let x = random_bf16(m * k, 11 + m as u64);
            let mut y = vec![0xffffu16; m * n]; // NaN bits: a missed output shows
            if block_rows == 0 {
                gemm(&w, n, k, &x, m, &mut y);
            } else {
                gemm_in_blocks(&w, n, k, &x, m, &mut y, 4 * k * block_rows);
            }
            assert_matches_float64(&w, n, k, &x, m, &y);
        }
    }
}
