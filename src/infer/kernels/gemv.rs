//! Batch-1..8 GEMV on the packed layout: codes are unpacked in registers, never written
//! out. Per output row and span: `acc += (code − zero) · x` over the span's slots, then
//! `y += scale · acc` — `scale · (code − zero)` is exact in f32 (an f16 times an integer
//! of at most 9 bits), so the result differs from dequantize-then-matmul by the order of
//! f32 accumulation only.

use super::super::layout::{slots_per_tile, PackedLayout, SLOT, TILE_WORDS};
use super::Isa;
use rayon::prelude::*;

/// Output rows per rayon task: enough work to amortise the task, enough tasks to balance.
const ROWS_PER_TASK: usize = 16;

/// `y` `[M, out]` = `x` `[M, padded_in]` (padded order) · `Wᵀ`, for `M` = `x.len() / padded_in` ≤ 8.
pub fn gemv(l: &PackedLayout, isa: Isa, x: &[f32], y: &mut [f32]) {
    let m = x.len() / l.padded_in.max(1);
    match m {
        1 => run::<1>(l, isa, x, y),
        2 => run::<2>(l, isa, x, y),
        3 => run::<3>(l, isa, x, y),
        4 => run::<4>(l, isa, x, y),
        5 => run::<5>(l, isa, x, y),
        6 => run::<6>(l, isa, x, y),
        7 => run::<7>(l, isa, x, y),
        8 => run::<8>(l, isa, x, y),
        _ => panic!("gemv takes 1..=8 rows, got {m}"),
    }
}

fn run<const M: usize>(l: &PackedLayout, isa: Isa, x: &[f32], y: &mut [f32]) {
    let n = l.out_features;
    // results land row-major per output row ([out, M]) so tasks own disjoint chunks
    let mut yt = vec![0f32; n * M];
    yt.par_chunks_mut(ROWS_PER_TASK * M)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, out) in chunk.chunks_exact_mut(M).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let out: &mut [f32; M] = out.try_into().expect("M outputs");
                match isa {
                    // SAFETY: `Isa::Avx512`/`Avx2` are only constructed after runtime
                    // detection of the features these functions enable.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe { x86::row_avx512::<M>(l, r, x, out) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { x86::row_avx2::<M>(l, r, x, out) },
                    _ => row_portable::<M>(l, r, x, out),
                }
            }
        });
    for (r, v) in yt.chunks_exact(M).enumerate() {
        for (m, &val) in v.iter().enumerate() {
            y[m * n + r] = val;
        }
    }
}

/// The slots of one span of one row: (first word of the slot's tile, shift, padded column).
/// An iterator rather than a closure so its body is compiled with the SIMD caller's
/// target features.
pub(super) struct Slots {
    row: *const u32,
    bits: usize,
    spt: usize,
    tile: usize,
    t: usize,
    col: usize,
    left: usize,
}

impl Slots {
    #[inline(always)]
    pub(super) fn new(l: &PackedLayout, r: usize, si: usize) -> Self {
        let span = l.spans[si];
        Self {
            row: l.words[r * l.row_words + span.tile_word0 as usize..].as_ptr(),
            bits: span.bits as usize,
            spt: slots_per_tile(span.bits),
            tile: 0,
            t: span.t0 as usize,
            col: span.col0 as usize,
            left: span.slots as usize,
        }
    }
}

impl Iterator for Slots {
    type Item = (*const u32, u32, usize);
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        // SAFETY: the layout builder sized every row to hold all its spans' tiles; the
        // pointer is only formed for slots of the span.
        let w = unsafe { self.row.add(self.tile * TILE_WORDS) };
        let item = (w, (self.t * self.bits) as u32, self.col);
        self.left -= 1;
        self.col += SLOT;
        self.t += 1;
        if self.t == self.spt {
            self.t = 0;
            self.tile += 1;
        }
        Some(item)
    }
}

fn row_portable<const M: usize>(l: &PackedLayout, r: usize, x: &[f32], out: &mut [f32; M]) {
    let kp = l.padded_in;
    let mut tot = [0f32; M];
    for si in 0..l.spans.len() {
        let (s, z) = l.param(r, si);
        let mask = (1u32 << l.spans[si].bits) - 1;
        let mut acc = [[0f32; SLOT]; M];
        for (w, shift, col) in Slots::new(l, r, si) {
            // SAFETY: a tile is TILE_WORDS words (see `Slots`).
            let words = unsafe { std::slice::from_raw_parts(w, TILE_WORDS) };
            for (lane, &word) in words.iter().enumerate() {
                let q = ((word >> shift) & mask) as f32 - z;
                for m in 0..M {
                    acc[m][lane] += q * x[m * kp + col + lane];
                }
            }
        }
        for m in 0..M {
            tot[m] += s * acc[m].iter().sum::<f32>();
        }
    }
    *out = tot;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// The f16 scale in the low half of a params word, with F16C.
    #[inline(always)]
    unsafe fn f16_to_f32(p: u32) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((p & 0xffff) as i32)))
    }

    /// 16 lanes = one slot per register; two accumulator sets (even/odd slots, unrolled so
    /// both stay in registers) hide the FMA latency at batch 1.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn row_avx512<const M: usize>(
        l: &PackedLayout,
        r: usize,
        x: &[f32],
        out: &mut [f32; M],
    ) {
        let kp = l.padded_in;
        let xp = x.as_ptr();
        let mut tot = [_mm512_setzero_ps(); M];
        for si in 0..l.spans.len() {
            let p = l.params[r * l.spans.len() + si];
            let s = _mm512_set1_ps(f16_to_f32(p));
            let z = _mm512_set1_ps((p >> 16) as f32);
            let mask = _mm512_set1_epi32(((1u32 << l.spans[si].bits) - 1) as i32);
            let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); M], [_mm512_setzero_ps(); M]);
            let mut slots = Slots::new(l, r, si);
            while let Some(a) = slots.next() {
                slot_avx512(a, xp, kp, z, mask, &mut acc0);
                if let Some(b) = slots.next() {
                    slot_avx512(b, xp, kp, z, mask, &mut acc1);
                }
            }
            for m in 0..M {
                tot[m] = _mm512_fmadd_ps(_mm512_add_ps(acc0[m], acc1[m]), s, tot[m]);
            }
        }
        for m in 0..M {
            out[m] = _mm512_reduce_add_ps(tot[m]);
        }
    }

    /// One slot: unpack 16 codes, subtract the zero, FMA against each batch row's x.
    #[inline(always)]
    unsafe fn slot_avx512<const M: usize>(
        (w, shift, col): (*const u32, u32, usize),
        xp: *const f32,
        kp: usize,
        z: __m512,
        mask: __m512i,
        acc: &mut [__m512; M],
    ) {
        let v = _mm512_loadu_si512(w as *const _);
        let q = _mm512_and_si512(_mm512_srl_epi32(v, _mm_cvtsi32_si128(shift as i32)), mask);
        let wf = _mm512_sub_ps(_mm512_cvtepi32_ps(q), z);
        for (m, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xp.add(m * kp + col)), *a);
        }
    }

    /// 8 lanes: a slot is the two halves of its tile, each with its own accumulator.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_avx2<const M: usize>(
        l: &PackedLayout,
        r: usize,
        x: &[f32],
        out: &mut [f32; M],
    ) {
        let kp = l.padded_in;
        let xp = x.as_ptr();
        let mut tot = [_mm256_setzero_ps(); M];
        for si in 0..l.spans.len() {
            let p = l.params[r * l.spans.len() + si];
            let s = _mm256_set1_ps(f16_to_f32(p));
            let z = _mm256_set1_ps((p >> 16) as f32);
            let mask = _mm256_set1_epi32(((1u32 << l.spans[si].bits) - 1) as i32);
            let mut acc = [[_mm256_setzero_ps(); M]; 2];
            for (w, shift, col) in Slots::new(l, r, si) {
                let cnt = _mm_cvtsi32_si128(shift as i32);
                for (h, a) in acc.iter_mut().enumerate() {
                    let v = _mm256_loadu_si256(w.add(8 * h) as *const _);
                    let q = _mm256_and_si256(_mm256_srl_epi32(v, cnt), mask);
                    let wf = _mm256_sub_ps(_mm256_cvtepi32_ps(q), z);
                    for (m, am) in a.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(xp.add(m * kp + col + 8 * h));
                        *am = _mm256_fmadd_ps(wf, xv, *am);
                    }
                }
            }
            for m in 0..M {
                tot[m] = _mm256_fmadd_ps(_mm256_add_ps(acc[0][m], acc[1][m]), s, tot[m]);
            }
        }
        for m in 0..M {
            let v = tot[m];
            let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            out[m] = _mm_cvtss_f32(s1);
        }
    }
}
