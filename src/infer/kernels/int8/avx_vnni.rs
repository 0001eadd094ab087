//! The AVX-VNNI kernel of the int8 GEMM (AVX2 with the 256-bit `vpdpbusd`, for CPUs without
//! AVX-512): the 32-row tile in two halves of 16 rows, a register block of up to 3 tokens ×
//! 16 rows (6 `i32` accumulators, 6 `f32` results: AVX2 has 16 registers). Same operations
//! in the same order as the other kernels, so the same bits.

use super::{Int8Acts, Tile, TILE_ROWS};
use crate::util::SharedOut;

/// Tokens per register block.
const BLOCK_TOKENS: usize = 3;

/// Every token of `acts` against one tile.
pub(super) fn tile_gemm(t: &Tile, acts: &Int8Acts, out: SharedOut) {
    #[cfg(target_arch = "x86_64")]
    for half in 0..TILE_ROWS / 16 {
        if 16 * half >= t.rows {
            break;
        }
        let mut tok = 0;
        while tok < acts.m {
            let n = (acts.m - tok).min(BLOCK_TOKENS);
            // SAFETY: `Int8Weights::gemm` only runs this kernel where the CPU has AVX2, FMA
            // and AVX-VNNI; the block writes rows of this tile's half, of its tokens only.
            unsafe {
                match n {
                    3 => block::<3>(t, acts, tok, half, out),
                    2 => block::<2>(t, acts, tok, half, out),
                    _ => block::<1>(t, acts, tok, half, out),
                }
            }
            tok += n;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the AVX-VNNI kernel is only chosen on x86_64 ({t:p}, {acts:p}, {out:p})");
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn block<const MT: usize>(
    t: &Tile,
    a: &Int8Acts,
    tok0: usize,
    half: usize,
    out: SharedOut,
) {
    use std::arch::x86_64::*;
    let (kp, nc) = (a.padded_in, t.chunks.len());
    let codes = t.codes.as_ptr().add(64 * half);
    let q = a.q.as_ptr().add(tok0 * kp);
    let mut y = [[_mm256_setzero_ps(); 2]; MT];
    for (c, ch) in t.chunks.iter().enumerate() {
        let mut acc = [[_mm256_setzero_si256(); 2]; MT];
        for k4 in ch.col0 / 4..(ch.col0 + ch.width) / 4 {
            let w = codes.add(k4 * TILE_ROWS * 4);
            let w0 = _mm256_loadu_si256(w as *const __m256i);
            let w1 = _mm256_loadu_si256(w.add(32) as *const __m256i);
            for (i, acc) in acc.iter_mut().enumerate() {
                let x4 = (q.add(i * kp + k4 * 4) as *const i32).read_unaligned();
                let xb = _mm256_set1_epi32(x4);
                acc[0] = _mm256_dpbusd_avx_epi32(acc[0], w0, xb);
                acc[1] = _mm256_dpbusd_avx_epi32(acc[1], w1, xb);
            }
        }
        let p = c * TILE_ROWS + 16 * half;
        let s = [
            _mm256_loadu_ps(t.scale.as_ptr().add(p)),
            _mm256_loadu_ps(t.scale.as_ptr().add(p + 8)),
        ];
        let sz = [
            _mm256_loadu_ps(t.scaled_zero.as_ptr().add(p)),
            _mm256_loadu_ps(t.scaled_zero.as_ptr().add(p + 8)),
        ];
        for (i, (y, acc)) in y.iter_mut().zip(&acc).enumerate() {
            let d = _mm256_set1_ps(*a.step.get_unchecked((tok0 + i) * nc + c));
            let xs = _mm256_set1_ps(*a.sum.get_unchecked((tok0 + i) * nc + c));
            for v in 0..2 {
                let ds = _mm256_mul_ps(d, s[v]);
                y[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[v]), ds, y[v]);
                y[v] = _mm256_fnmadd_ps(xs, sz[v], y[v]);
            }
        }
    }
    for (i, y) in y.iter().enumerate() {
        for (v, &yv) in y.iter().enumerate() {
            let lane0 = 16 * half + 8 * v;
            if lane0 >= t.rows {
                continue;
            }
            let dst = out.at((tok0 + i) * t.out_features + t.row0 + lane0);
            let live = (t.rows - lane0).min(8);
            if live == 8 {
                _mm256_storeu_ps(dst, yv);
            } else {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), yv);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, live);
            }
        }
    }
}
