//! Batch-1..8 GEMV on the packed layout: codes are unpacked in registers, never written
//! out. Per output row and span: `acc += (code − zero) · x` over the span's slots, then
//! `y += scale · acc` — `scale · (code − zero)` is exact in f32 (an f16 times an integer
//! of at most 9 bits), so the result differs from dequantize-then-matmul by the order of
//! f32 accumulation only.

use super::super::layout::{slots_per_tile, PackedLayout, SLOT, TILE_WORDS};
use super::Isa;
use crate::util::SharedOut;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// `y` `[m, out]` = `x` `[m, padded_in]` (padded order) · `Wᵀ`, for `m` ≤ 8. `m` is passed,
/// not derived from `x.len()`: a fully pruned layer has `padded_in = 0` and an empty `x`.
pub fn gemv(l: &PackedLayout, isa: Isa, x: &[f32], m: usize, y: &mut [f32]) {
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

/// Target words of codes per chunk of rows: small enough that the last chunks balance
/// the threads and the wait at the end is short, large enough to amortise a claim.
const CHUNK_WORDS: usize = 2048;

fn run<const M: usize>(l: &PackedLayout, isa: Isa, x: &[f32], y: &mut [f32]) {
    let n = l.out_features;
    assert!(
        x.len() >= M * l.padded_in && y.len() >= M * n,
        "gemv operand sizes"
    );
    let out = SharedOut::new(y);
    // SAFETY: rows r0..r1 are this chunk's alone; `y` holds `M·n` values.
    for_row_chunks(n, l.row_words, &|r0, r1| unsafe {
        rows_range::<M>(l, isa, x, out, r0, r1)
    });
}

/// `work(r0, r1)` over every chunk of a layer's `n` output rows (`row_words` words of
/// codes each), on both cores: chunks of about [`CHUNK_WORDS`] words, claimed as
/// [`share_chunks`] does for small layers, on rayon's pool for large ones. Each row is in
/// exactly one chunk. Shared by the lookup-table kernels.
pub(super) fn for_row_chunks(n: usize, row_words: usize, work: &(dyn Fn(usize, usize) + Sync)) {
    let rows = rows_per_chunk(row_words);
    let chunk = |c: usize| work(c * rows, ((c + 1) * rows).min(n));
    let chunks = n.div_ceil(rows);
    if n * row_words >= POOL_WORDS {
        chunks_on_pool(chunks, &chunk);
    } else {
        share_chunks(chunks, &chunk);
    }
}

/// Layers with at least this many words of codes (2 MiB) run all their chunks on rayon's
/// pool, the caller waiting: measured on a busy 2-core machine, the pool's workers then
/// get both cores, while a caller that computes alongside them was often left alone.
const POOL_WORDS: usize = 1 << 19;

fn chunks_on_pool(total: usize, work: &(dyn Fn(usize) + Sync)) {
    use rayon::prelude::*;
    (0..total)
        .into_par_iter()
        .with_min_len(POOL_MIN_CHUNKS)
        .for_each(work);
}

/// Chunks per rayon task on the pool (a task of about 8192 words).
const POOL_MIN_CHUNKS: usize = 4;

/// Output rows per chunk: about [`CHUNK_WORDS`] of codes, a multiple of 8 rows.
fn rows_per_chunk(row_words: usize) -> usize {
    CHUNK_WORDS.div_ceil(row_words.max(1)).next_multiple_of(8)
}

/// Smaller layers: chunks claimed one at a time from a shared counter by the calling thread and by
/// helper jobs on rayon's pool. The caller starts at once and never sleeps: a helper
/// that wakes late (an idle pool, a busy machine) only claims what is left, so a call
/// costs at most about what one thread alone would, without the two sleeping hand-offs
/// of running the whole call on the pool from outside it.
struct Shared {
    next: AtomicUsize,
    done: AtomicUsize,
    total: usize,
    /// The caller's work, its lifetime erased: only called for chunks `< total`, and the
    /// caller returns only once all of those are done (see `share_chunks`).
    work: *const (dyn Fn(usize) + Sync),
}

// SAFETY: `work` is `Sync` and only called while the caller waits (see the field).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn drain(&self) {
        loop {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            if c >= self.total {
                return;
            }
            // SAFETY: chunk `c < total` is not yet counted done, so the caller still waits
            // and `work` is alive.
            unsafe { (*self.work)(c) };
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

fn share_chunks(total: usize, work: &(dyn Fn(usize) + Sync)) {
    let helpers = rayon::current_num_threads()
        .saturating_sub(1)
        .min(total.saturating_sub(1));
    if helpers == 0 {
        (0..total).for_each(work);
        return;
    }
    // SAFETY: only the lifetime changes; see `Shared::work`.
    let work: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(work) };
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        total,
        work,
    });
    for _ in 0..helpers {
        let s = Arc::clone(&shared);
        rayon::spawn(move || s.drain());
    }
    shared.drain();
    // chunks claimed by helpers may still run; wait for them without sleeping
    let mut spins = 0u32;
    while shared.done.load(Ordering::Acquire) < total {
        if spins < 1 << 12 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

/// Rows `r0..r1` of `y` `[M, n]`.
///
/// # Safety
/// `y` must point to `M · out_features` floats of which no one else touches rows `r0..r1`.
unsafe fn rows_range<const M: usize>(
    l: &PackedLayout,
    isa: Isa,
    x: &[f32],
    y: SharedOut,
    r0: usize,
    r1: usize,
) {
    let n = l.out_features;
    let store = |r: usize, v: [f32; M]| {
        for (m, &val) in v.iter().enumerate() {
            // SAFETY: the caller's contract.
            unsafe { *y.at(m * n + r) = val };
        }
    };
    match isa {
        // SAFETY: `Isa::Avx512`/`Avx2` are only constructed after runtime detection of the
        // features these functions enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::rows_avx512::<M>(l, x, r0, r1, store) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            for r in r0..r1 {
                let mut out = [0f32; M];
                unsafe { x86::row_avx2::<M>(l, r, x, &mut out) };
                store(r, out);
            }
        }
        _ => {
            for r in r0..r1 {
                let mut out = [0f32; M];
                row_portable::<M>(l, r, x, &mut out);
                store(r, out);
            }
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

    /// f32 bits of 2²³: OR-ed above a code in bits 0..23 it gives the f32 `2²³ + code`.
    const EXP23: i32 = 0x4B00_0000;
    /// `vpternlogd` immediate for `(a & b) | c`.
    const AND_OR: i32 = 0xEA;

    /// How many blocks of rows ahead [`block`] prefetches.
    const PREFETCH_BLOCKS: usize = 2;

    /// Rows `r0..r1`, `R` rows at a time (sharing each x load), handing each row's `M`
    /// outputs to `store`. `R` and the accumulator sets `ACC` per row are chosen so that
    /// `R · M · ACC ≥ 8` independent FMA chains hide the FMA latency.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn rows_avx512<const M: usize>(
        l: &PackedLayout,
        x: &[f32],
        r0: usize,
        r1: usize,
        store: impl Fn(usize, [f32; M]),
    ) {
        match M {
            1 => block_loop::<M, 4, 2>(l, x, r0, r1, &store),
            2 => block_loop::<M, 4, 1>(l, x, r0, r1, &store),
            3 | 4 => block_loop::<M, 2, 1>(l, x, r0, r1, &store),
            _ => block_loop::<M, 1, 1>(l, x, r0, r1, &store),
        }
    }

    #[inline(always)]
    unsafe fn block_loop<const M: usize, const R: usize, const ACC: usize>(
        l: &PackedLayout,
        x: &[f32],
        r0: usize,
        r1: usize,
        store: &impl Fn(usize, [f32; M]),
    ) {
        let mut r = r0;
        while r + R <= r1 {
            let out = block::<M, R, ACC>(l, x, r, r1);
            for (i, o) in out.into_iter().enumerate() {
                store(r + i, o);
            }
            r += R;
        }
        while r < r1 {
            let [o] = block::<M, 1, 2>(l, x, r, r1);
            store(r, o);
            r += 1;
        }
    }

    /// Rows `r .. r + R`: per span, accumulate `(code − zero) · x` over its slots, then
    /// `tot += scale · acc`; finally reduce each `tot` across lanes.
    #[inline(always)]
    unsafe fn block<const M: usize, const R: usize, const ACC: usize>(
        l: &PackedLayout,
        x: &[f32],
        r: usize,
        r1: usize,
    ) -> [[f32; M]; R] {
        let kp = l.padded_in;
        let xp = x.as_ptr();
        let ns = l.spans.len();
        let rows: [*const u32; R] =
            std::array::from_fn(|i| l.words.as_ptr().add((r + i) * l.row_words));
        // the same tiles PREFETCH_BLOCKS blocks of rows ahead (clamped to this call's last
        // row): each tile load also asks for its successor, so the memory system has
        // requests in flight from a layer's first rows on, which a decode step's small
        // layers need — they end before the hardware prefetcher has ramped up
        let ahead: [*const u32; R] = std::array::from_fn(|i| {
            let row = (r + i + PREFETCH_BLOCKS * R).min(r1 - 1);
            l.words.as_ptr().add(row * l.row_words)
        });
        let params: [*const u32; R] = std::array::from_fn(|i| l.params.as_ptr().add((r + i) * ns));
        let mut tot = [[_mm512_setzero_ps(); M]; R];
        for (si, span) in l.spans.iter().enumerate() {
            let p: [u32; R] = std::array::from_fn(|i| *params[i].add(si));
            // 2²³ + zero, as f32 bits (the zero is at most 8 bits)
            let c: [__m512; R] = std::array::from_fn(|i| {
                _mm512_castsi512_ps(_mm512_set1_epi32(EXP23 | (p[i] >> 16) as i32))
            });
            let mut acc = [[[_mm512_setzero_ps(); M]; R]; ACC];
            let a = SpanArgs {
                rows,
                ahead,
                tile_word0: span.tile_word0 as usize,
                t0: span.t0 as usize,
                slots: span.slots as usize,
                xs: xp.add(span.col0 as usize),
                kp,
            };
            match span.bits {
                1 => span_slots::<M, R, ACC, 1>(&a, &c, &mut acc),
                2 => span_slots::<M, R, ACC, 2>(&a, &c, &mut acc),
                3 => span_slots::<M, R, ACC, 3>(&a, &c, &mut acc),
                4 => span_slots::<M, R, ACC, 4>(&a, &c, &mut acc),
                5 => span_slots::<M, R, ACC, 5>(&a, &c, &mut acc),
                6 => span_slots::<M, R, ACC, 6>(&a, &c, &mut acc),
                7 => span_slots::<M, R, ACC, 7>(&a, &c, &mut acc),
                _ => span_slots::<M, R, ACC, 8>(&a, &c, &mut acc),
            }
            for i in 0..R {
                let s = _mm512_set1_ps(f16_to_f32(p[i]));
                for m in 0..M {
                    let mut sum = acc[0][i][m];
                    for acc_k in acc.iter().skip(1) {
                        sum = _mm512_add_ps(sum, acc_k[i][m]);
                    }
                    tot[i][m] = _mm512_fmadd_ps(sum, s, tot[i][m]);
                }
            }
        }
        std::array::from_fn(|i| std::array::from_fn(|m| _mm512_reduce_add_ps(tot[i][m])))
    }

    struct SpanArgs<const R: usize> {
        rows: [*const u32; R],
        ahead: [*const u32; R],
        tile_word0: usize,
        t0: usize,
        slots: usize,
        /// x at the span's first column (batch row 0)
        xs: *const f32,
        kp: usize,
    }

    /// All slots of one span for `R` rows: whole tiles fully unrolled (shifts and masks
    /// are immediates), a partial first or last tile slot by slot.
    #[inline(always)]
    unsafe fn span_slots<const M: usize, const R: usize, const ACC: usize, const B: usize>(
        a: &SpanArgs<R>,
        c: &[__m512; R],
        acc: &mut [[[__m512; M]; R]; ACC],
    ) {
        let spt = 32 / B;
        let (mut tw, mut t, mut left, mut xs) = (a.tile_word0, a.t0, a.slots, a.xs);
        while left > 0 {
            let tiles: [__m512i; R] =
                std::array::from_fn(|i| _mm512_loadu_si512(a.rows[i].add(tw) as *const _));
            for p in a.ahead {
                _mm_prefetch::<_MM_HINT_T0>(p.add(tw) as *const i8);
            }
            if t == 0 && left >= spt {
                for tt in 0..spt {
                    slot::<M, R, B>(
                        tt * B,
                        &tiles,
                        xs.add(SLOT * tt),
                        a.kp,
                        c,
                        &mut acc[tt % ACC],
                    );
                }
                left -= spt;
                xs = xs.add(SLOT * spt);
            } else {
                let tb = spt.min(t + left);
                for tt in t..tb {
                    slot::<M, R, B>(tt * B, &tiles, xs, a.kp, c, &mut acc[0]);
                    xs = xs.add(SLOT);
                }
                left -= tb - t;
            }
            t = 0;
            tw += TILE_WORDS;
        }
    }

    /// One slot (codes at bit `shift` of each word) of `R` rows: the exact unpack
    /// `((w >> shift) & mask) | bits(2²³)` = f32 `2²³ + code`, minus `2²³ + zero`, FMA
    /// against each batch row's x.
    #[inline(always)]
    unsafe fn slot<const M: usize, const R: usize, const B: usize>(
        shift: usize,
        tiles: &[__m512i; R],
        xs: *const f32,
        kp: usize,
        c: &[__m512; R],
        acc: &mut [[__m512; M]; R],
    ) {
        let mask = _mm512_set1_epi32(((1u32 << B) - 1) as i32);
        let exp = _mm512_set1_epi32(EXP23);
        let cnt = _mm_cvtsi32_si128(shift as i32);
        let xv: [__m512; M] = std::array::from_fn(|m| _mm512_loadu_ps(xs.add(m * kp)));
        for i in 0..R {
            let v = if shift == 0 {
                tiles[i]
            } else {
                _mm512_srl_epi32(tiles[i], cnt)
            };
            let q = _mm512_ternarylogic_epi32::<AND_OR>(v, mask, exp);
            let w = _mm512_sub_ps(_mm512_castsi512_ps(q), c[i]);
            for m in 0..M {
                acc[i][m] = _mm512_fmadd_ps(w, xv[m], acc[i][m]);
            }
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
