//! bf16 × bf16 GEMM on AVX-512 BF16's `vdpbf16ps`, which multiplies bf16 pairs directly
//! with f32 accumulation; each output rounded once to bf16 straight from the registers (no
//! f32 result matrix, no conversion pass). Where the instruction runs at twice the f32 FMA
//! rate this is ~3× the widened path; where it runs at half (measured on another host of
//! the same CPU family) it is slower — [`super::select`] decides by measuring.
//!
//! GotoBLAS shape: the weights `[n, k]` are cut into panels of [`NR`] output columns, each
//! repacked on the fly into `[k/2][NR]` bf16 pairs (so one 512-bit load holds 16 columns'
//! pair at a reduction step), and an `MR × NR` register tile of accumulators sweeps the
//! batch rows: per pair step, 3 panel loads and `MR` broadcasts of an input pair feed
//! `3·MR` dot products. Rayon tasks own disjoint ranges of panels (output columns), so a
//! panel is packed once per call by the task that uses it.

use crate::util::SharedOut;
use rayon::prelude::*;

/// Output columns per panel (three 16-lane registers).
const NR: usize = 48;
/// Batch rows per register tile (8 × 3 accumulators + 3 panel registers + 1 broadcast).
const MR: usize = 8;

/// Whether this CPU runs [`gemm`] (AVX-512F + BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y` `[m, n]` (bf16 bits, overwritten) = `x` `[m, k]` · `Wᵀ` for `W` `[n, k]`, all bf16
/// bit patterns, row-major, accumulated in f32 and rounded to nearest even; `k` even. Panics (a programming error, not input) when the slices
/// do not have those lengths or the CPU lacks AVX-512 BF16 ([`available`]).
pub fn gemm(w: &[u16], n: usize, k: usize, x: &[u16], m: usize, y: &mut [u16]) {
    assert!(available(), "bf16 gemm needs AVX-512 BF16");
    assert!(
        k.is_multiple_of(2),
        "bf16 gemm needs an even reduction length, got {k}"
    );
    assert_eq!(w.len(), n * k);
    assert_eq!(x.len(), m * k);
    assert_eq!(y.len(), m * n);
    let panels = n.div_ceil(NR);
    // a few tasks per thread so both cores stay busy when panels differ in cost (the last
    // is partial); a panel is ≥ 48 × k MACs per batch row, far above rayon's overhead
    let tasks = (rayon::current_num_threads() * 4).min(panels).max(1);
    let per_task = panels.div_ceil(tasks);
    let out = SharedOut::new(y);
    (0..panels.div_ceil(per_task))
        .into_par_iter()
        .for_each(|t| {
            let mut panel = vec![0u32; (k / 2) * NR];
            for p in t * per_task..((t + 1) * per_task).min(panels) {
                let j0 = p * NR;
                let cols = NR.min(n - j0);
                pack_panel(w, k, j0, cols, &mut panel);
                // SAFETY: AVX-512F/BF16 checked above; this task writes columns j0..j0+cols of
                // every row of y, and no other task writes them (disjoint panels).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::panel_rows(&panel, k, x, m, out, n, j0, cols)
                };
            }
        });
}

/// Panel `[k/2][NR]` of bf16 pairs: element `(kp, jj)` holds `W[j0+jj][2kp]` in its low
/// half and `W[j0+jj][2kp+1]` in its high half (zero for columns past `cols`).
fn pack_panel(w: &[u16], k: usize, j0: usize, cols: usize, panel: &mut [u32]) {
    let kh = k / 2;
    for jj in 0..NR {
        if jj >= cols {
            for kp in 0..kh {
                panel[kp * NR + jj] = 0;
            }
            continue;
        }
        let row = &w[(j0 + jj) * k..(j0 + jj + 1) * k];
        for (kp, pair) in row.chunks_exact(2).enumerate() {
            panel[kp * NR + jj] = pair[0] as u32 | (pair[1] as u32) << 16;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use crate::util::SharedOut;
    use std::arch::x86_64::*;

    /// Every batch row against one packed panel, `MR` rows at a time (then the tail).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn panel_rows(
        panel: &[u32],
        k: usize,
        x: &[u16],
        m: usize,
        y: SharedOut<u16>,
        n: usize,
        j0: usize,
        cols: usize,
    ) {
        let mut r = 0;
        while r + MR <= m {
            tile::<MR>(panel, k, x, r, y, n, j0, cols);
            r += MR;
        }
        match m - r {
            0 => {}
            1 => tile::<1>(panel, k, x, r, y, n, j0, cols),
            2 => tile::<2>(panel, k, x, r, y, n, j0, cols),
            3 => tile::<3>(panel, k, x, r, y, n, j0, cols),
            4 => tile::<4>(panel, k, x, r, y, n, j0, cols),
            5 => tile::<5>(panel, k, x, r, y, n, j0, cols),
            6 => tile::<6>(panel, k, x, r, y, n, j0, cols),
            _ => tile::<7>(panel, k, x, r, y, n, j0, cols),
        }
    }

    /// Rows `r0..r0+R` × the panel's columns: `R × 3` f32 accumulators over `k/2` pair steps.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn tile<const R: usize>(
        panel: &[u32],
        k: usize,
        x: &[u16],
        r0: usize,
        y: SharedOut<u16>,
        n: usize,
        j0: usize,
        cols: usize,
    ) {
        let kh = k / 2;
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        let p = panel.as_ptr();
        // row r's pairs as u32: x is bf16 pairs in memory, k even so every row starts aligned
        // to a pair
        let xr: [*const u32; R] =
            std::array::from_fn(|i| x.as_ptr().add((r0 + i) * k) as *const u32);
        for kp in 0..kh {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(p.add(kp * NR) as *const _));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(p.add(kp * NR + 16) as *const _));
            let b2: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(p.add(kp * NR + 32) as *const _));
            for i in 0..R {
                let a: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(xr[i].add(kp).read_unaligned() as i32));
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
                acc[i][2] = _mm512_dpbf16_ps(acc[i][2], a, b2);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let out = y.at((r0 + i) * n + j0);
            for (c, v) in row.iter().enumerate() {
                let lo = c * 16;
                if lo >= cols {
                    break;
                }
                let mask: __mmask16 = if cols - lo >= 16 {
                    0xffff
                } else {
                    (1u16 << (cols - lo)) - 1
                };
                let bits: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(*v));
                _mm256_mask_storeu_epi16(out.add(lo) as *mut i16, mask, bits);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{assert_matches_float64, random_bf16};
    use super::*;

    #[test]
    fn matches_a_float64_reference_on_every_tail() {
        if !available() {
            eprintln!("SKIPPED: this CPU has no AVX-512 BF16");
            return;
        }
        // batch tails 1..8 and 9, column tails (n not a multiple of 48), panels split
        // across tasks, short and long reductions
        for &(m, n, k) in &[
            (1, 5, 2),
            (3, 48, 64),
            (9, 47, 130),
            (17, 100, 576),
            (8, 49, 32),
            (64, 300, 96),
        ] {
            let w = random_bf16(n * k, 7 + n as u64);
            let x = random_bf16(m * k, 11 + m as u64);
            let mut y = vec![0xffffu16; m * n]; // NaN bits: a missed output shows
            gemm(&w, n, k, &x, m, &mut y);
            assert_matches_float64(&w, n, k, &x, m, &y);
        }
    }
}
