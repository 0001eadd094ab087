//! The AVX-512 VNNI kernel of the int8 GEMM: a register block of up to 6 tokens × 32
//! output rows (12 `i32` accumulators, 12 `f32` results), `vpdpbusd` multiplying four
//! consecutive columns of 16 rows (u8 codes) with one token's four broadcast int8
//! activations per instruction.

use super::{Int8Acts, Tile, TILE_ROWS};
use crate::util::SharedOut;

/// Tokens per register block.
const BLOCK_TOKENS: usize = 6;

/// Every token of `acts` against one tile.
pub(super) fn tile_gemm(t: &Tile, acts: &Int8Acts, out: SharedOut) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut tok = 0;
        while tok < acts.m {
            let n = (acts.m - tok).min(BLOCK_TOKENS);
            // SAFETY: `Int8Weights::gemm` only runs this kernel where the CPU has it; the
            // block writes rows `t.row0 .. t.row0 + t.rows` of its tokens only.
            unsafe {
                match n {
                    6 => block::<6>(t, acts, tok, out),
                    5 => block::<5>(t, acts, tok, out),
                    4 => block::<4>(t, acts, tok, out),
                    3 => block::<3>(t, acts, tok, out),
                    2 => block::<2>(t, acts, tok, out),
                    _ => block::<1>(t, acts, tok, out),
                }
            }
            tok += n;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the VNNI kernel is only chosen on x86_64 ({t:p}, {acts:p}, {out:p})");
}

/// [`super::quantize_chunk`] in AVX-512: the same bits.
pub(super) fn quantize_chunk(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only called for the AVX-512 VNNI kernel, where the CPU has it (AVX-512F too); `x` and `q` have
    // the same length, a multiple of 16.
    unsafe {
        quantize_chunk_avx512(x, q)
    }
    #[cfg(not(target_arch = "x86_64"))]
    super::quantize_chunk(x, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_chunk_avx512(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == q.len() && x.len().is_multiple_of(16));
    let mut amax = _mm512_setzero_ps();
    for i in (0..x.len()).step_by(16) {
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x.as_ptr().add(i))));
    }
    let amax = _mm512_reduce_max_ps(amax);
    if amax == 0.0 {
        q.fill(0);
        return (0.0, 0.0);
    }
    let inv = _mm512_set1_ps(127.0 / amax);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let mut qsum = _mm512_setzero_si512();
    for i in (0..x.len()).step_by(16) {
        let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), inv);
        // round to nearest even (the default MXCSR mode), as the portable path does
        let r = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
        qsum = _mm512_add_epi32(qsum, r);
        _mm_storeu_si128(q.as_mut_ptr().add(i) as *mut __m128i, _mm512_cvtsepi32_epi8(r));
    }
    let step = amax / 127.0;
    (step, step * _mm512_reduce_add_epi32(qsum) as f32)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn block<const MT: usize>(t: &Tile, a: &Int8Acts, tok0: usize, out: SharedOut) {
    use std::arch::x86_64::*;
    let (kp, nc) = (a.padded_in, t.chunks.len());
    let codes = t.codes.as_ptr();
    let q = a.q.as_ptr().add(tok0 * kp);
    let mut y = [[_mm512_setzero_ps(); 2]; MT];
    for (c, ch) in t.chunks.iter().enumerate() {
        let mut acc = [[_mm512_setzero_si512(); 2]; MT];
        for k4 in ch.col0 / 4..(ch.col0 + ch.width) / 4 {
            let w = codes.add(k4 * TILE_ROWS * 4);
            let w0 = _mm512_loadu_si512(w as *const __m512i);
            let w1 = _mm512_loadu_si512(w.add(64) as *const __m512i);
            for (i, acc) in acc.iter_mut().enumerate() {
                let x4 = (q.add(i * kp + k4 * 4) as *const i32).read_unaligned();
                let xb = _mm512_set1_epi32(x4);
                acc[0] = _mm512_dpbusd_epi32(acc[0], w0, xb);
                acc[1] = _mm512_dpbusd_epi32(acc[1], w1, xb);
            }
        }
        let p = c * TILE_ROWS;
        let s = [
            _mm512_loadu_ps(t.scale.as_ptr().add(p)),
            _mm512_loadu_ps(t.scale.as_ptr().add(p + 16)),
        ];
        let sz = [
            _mm512_loadu_ps(t.scaled_zero.as_ptr().add(p)),
            _mm512_loadu_ps(t.scaled_zero.as_ptr().add(p + 16)),
        ];
        for (i, (y, acc)) in y.iter_mut().zip(&acc).enumerate() {
            let d = _mm512_set1_ps(*a.step.get_unchecked((tok0 + i) * nc + c));
            let xs = _mm512_set1_ps(*a.sum.get_unchecked((tok0 + i) * nc + c));
            for v in 0..2 {
                let ds = _mm512_mul_ps(d, s[v]);
                y[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[v]), ds, y[v]);
                y[v] = _mm512_fnmadd_ps(xs, sz[v], y[v]);
            }
        }
    }
    for (i, y) in y.iter().enumerate() {
        for (v, &yv) in y.iter().enumerate() {
            let lane0 = 16 * v;
            if lane0 >= t.rows {
                continue;
            }
            let live = (t.rows - lane0).min(16);
            let mask = if live == 16 { u16::MAX } else { (1u16 << live) - 1 };
            let dst = out.at((tok0 + i) * t.out_features + t.row0 + lane0);
            _mm512_mask_storeu_ps(dst, mask, yv);
        }
    }
}
