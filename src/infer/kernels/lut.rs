//! Lookup-table kernels for codebook layers (NUPES' power grid, `bitsmith_codebook`): a
//! weight is `scale[group, row] · table[code]`, so unpacking a code is a table lookup
//! instead of `scale · (code − zero)`.
//!
//! The layer stays in the file's `row-codes-v1` form (each output row's codes an LSB-first
//! `b`-bit stream, [`crate::pack::bits`]). GEMV (1..=8 rows, the decode step): per output
//! row, the codes of one group are looked up and dotted with every input row, then
//! scaled once per group. At 4 bits on AVX-512 the 16-entry table is one register: the
//! codes of a step are widened to lanes and looked up with `vpermps`
//! (`_mm512_permutexvar_ps`), accumulated with FMA; AVX2 holds the table in two registers;
//! every width on AVX-512 VBMI moves each code's bytes into its lane with `vpermb`; other
//! CPUs run the portable loop. Larger batches run the tiled GEMM ([`super::gemm`]): each
//! task looks a small tile of weights up (the same register lookup) and hands it to the
//! `gemm` crate; an act-order layer's tile is scaled column by column (its columns
//! scatter over groups).

use super::gemm::{self, TileSource};
use super::gemv::for_row_chunks;
use super::Isa;
use crate::model::{host_matmul_tensor, HostMatmul, PackedMatmul, MAX_GEMV_ROWS};
use crate::pack::bits;
use crate::quant::CodebookQuantizedLinear;
use crate::util::SharedOut;
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use std::ops::Range;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;

/// A codebook layer run by lookup-table kernels.
#[derive(Debug)]
pub struct LutLinear {
    out_features: usize,
    in_features: usize,
    bits: u8,
    /// `u32` words per output row.
    pub(super) row_words: usize,
    /// `[out, row_words]`.
    words: Vec<u32>,
    /// `[out, n_groups]` (row-major per output row: one row's scales are contiguous).
    scales: Vec<f32>,
    n_groups: usize,
    table: Vec<f32>,
    /// Columns of each group in order: `None` when groups are contiguous runs of
    /// `group_cols` columns (no act-order), else the original columns of every group.
    groups: Option<Vec<Vec<u32>>>,
    /// Each column's group when `groups` is `Some` (the tiled GEMM scales by column).
    col_group: Option<Vec<u32>>,
    group_cols: usize,
    isa: Isa,
    /// The layer uploaded to each CUDA device it ran on (`cuda` feature).
    #[cfg(feature = "cuda")]
    cuda: cuda::CudaCache,
    /// The layer uploaded to each Metal device it ran on (`metal` feature).
    #[cfg(feature = "metal")]
    metal: metal::MetalCache,
}

impl LutLinear {
    pub fn from_codebook(q: &CodebookQuantizedLinear) -> Result<Self> {
        let (n, k, b) = (q.out_features, q.in_features, q.bits);
        ensure!(
            q.codes.len() == n * k && q.g_idx.len() == k && q.table.len() == 1 << b,
            "codebook layer sizes do not match {n}x{k} at {b} bits"
        );
        let n_groups = q.n_groups();
        let group_cols = q.group_size.columns(k);
        let contiguous = q
            .g_idx
            .iter()
            .enumerate()
            .all(|(j, &g)| g as usize == j / group_cols);
        let groups = (!contiguous).then(|| {
            let mut gs = vec![vec![]; n_groups];
            for (j, &g) in q.g_idx.iter().enumerate() {
                gs[g as usize].push(j as u32);
            }
            gs
        });
        let row_words = bits::packed_words(k, b);
        // slack past the last row: a register step's 16-byte load may run past its row
        let mut words = vec![0u32; n * row_words + READ_SLACK_WORDS];
        for (r, row) in words.chunks_mut(row_words.max(1)).enumerate().take(n) {
            bits::pack_into(q.codes[r * k..(r + 1) * k].iter().copied(), b, row);
        }
        let mut scales = vec![0f32; n * n_groups];
        for g in 0..n_groups {
            for r in 0..n {
                scales[r * n_groups + g] = q.scales[g * n + r].to_f32();
            }
        }
        Ok(Self {
            out_features: n,
            in_features: k,
            bits: b,
            row_words,
            words,
            scales,
            n_groups,
            table: q.table.clone(),
            col_group: groups.is_some().then(|| q.g_idx.clone()),
            groups,
            group_cols,
            isa: Isa::detect(),
            #[cfg(feature = "cuda")]
            cuda: Default::default(),
            #[cfg(feature = "metal")]
            metal: Default::default(),
        })
    }

    /// Force an instruction set (tests); an error if this CPU lacks it.
    pub fn with_isa(mut self, isa: Isa) -> Result<Self> {
        ensure!(
            Isa::available().contains(&isa),
            "this CPU cannot run the {isa:?} kernels"
        );
        self.isa = isa;
        Ok(self)
    }

    /// The register kernel that runs this layer: 4-bit codes in contiguous groups whose
    /// boundaries fall on 32-column steps (AVX-512) or 16-column ones (AVX2) take the
    /// nibble lookup; other widths (and 4 bits on 16-column groups) take the byte-gather
    /// lookup where the CPU has AVX-512 VBMI; the rest the portable loop.
    fn path(&self) -> Path {
        let aligned = |step: usize| {
            self.groups.is_none() && (self.group_cols.is_multiple_of(step) || self.n_groups == 1)
        };
        match self.isa {
            Isa::Avx512 if self.bits == 4 && aligned(32) => Path::Nibble512,
            Isa::Avx512 if vbmi() && aligned(16) => Path::Vbmi,
            Isa::Avx2 if self.bits == 4 && aligned(16) => Path::Nibble256,
            _ => Path::Portable,
        }
    }

    /// The group of every input column (`[in]`), as the GPU kernels take it.
    pub fn g_idx(&self) -> Vec<u32> {
        match &self.groups {
            None => (0..self.in_features)
                .map(|j| (j / self.group_cols.max(1)) as u32)
                .collect(),
            Some(gs) => {
                let mut g_idx = vec![0u32; self.in_features];
                for (g, cols) in gs.iter().enumerate() {
                    for &j in cols {
                        g_idx[j as usize] = g as u32;
                    }
                }
                g_idx
            }
        }
    }

    /// The unit values of output row `o`'s codes (`[in]`).
    fn lookup_row(&self, o: usize, out: &mut [f32]) {
        self.lookup_tile(o..o + 1, 0, out)
    }

    /// The unit values of rows `rows` at columns `c0..c0 + width` into `out` (`[rows,
    /// width]`), `c0` a multiple of 16 (so a 2-, 4- or 8-bit run starts on a word).
    fn lookup_tile(&self, rows: Range<usize>, c0: usize, out: &mut [f32]) {
        let width = out.len() / rows.len().max(1);
        debug_assert!(c0.is_multiple_of(16) && c0 + width <= self.in_features);
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512 && vbmi() {
            // SAFETY: VBMI detected and AVX-512 detected or forced from `Isa::available`;
            // `c0` is on a 16-column step and `words` has its read slack.
            return unsafe { vbmi::lookup_tile(self, rows, c0, width, out) };
        }
        for (o, dst) in rows.zip(out.chunks_exact_mut(width.max(1))) {
            self.lookup_cols_portable(o, c0, dst);
        }
    }

    /// [`Self::lookup_tile`] for one row, in portable code.
    fn lookup_cols_portable(&self, o: usize, c0: usize, out: &mut [f32]) {
        let words = &self.words[o * self.row_words..(o + 1) * self.row_words];
        let b = self.bits as usize;
        match b {
            // whole codes per word: one shift and mask each
            2 | 4 | 8 => {
                let per = 32 / b;
                let mask = (1u32 << b) - 1;
                for (chunk, &w) in out.chunks_mut(per).zip(&words[c0 * b / 32..]) {
                    for (i, v) in chunk.iter_mut().enumerate() {
                        *v = self.table[((w >> (i * b)) & mask) as usize];
                    }
                }
            }
            _ => {
                // a bit reader: refill 32 bits whenever fewer than `b` are buffered
                let mask = (1u64 << b) - 1;
                let bit = c0 * b;
                let mut next = bit / 32;
                let (mut buf, mut have) = (0u64, 0u32);
                if !bit.is_multiple_of(32) {
                    buf = (words[next] >> (bit % 32)) as u64;
                    have = 32 - (bit % 32) as u32;
                    next += 1;
                }
                for v in out.iter_mut() {
                    if have < b as u32 {
                        buf |= (words[next] as u64) << have;
                        next += 1;
                        have += 32;
                    }
                    *v = self.table[(buf & mask) as usize];
                    buf >>= b;
                    have -= b as u32;
                }
            }
        }
    }

    /// `y` `[rows, out]` = `x` `[rows, in]` · Wᵀ for `rows ≤` [`MAX_GEMV_ROWS`].
    fn gemv(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        match rows {
            1 => self.run::<1>(x, y),
            2 => self.run::<2>(x, y),
            3 => self.run::<3>(x, y),
            4 => self.run::<4>(x, y),
            5 => self.run::<5>(x, y),
            6 => self.run::<6>(x, y),
            7 => self.run::<7>(x, y),
            8 => self.run::<8>(x, y),
            _ => panic!("the lookup GEMV takes 1..=8 rows, got {rows}"),
        }
    }

    fn run<const M: usize>(&self, x: &[f32], y: &mut [f32]) {
        let n = self.out_features;
        let xs = self.prepare_x(x);
        let out = SharedOut::new(y);
        let store = |o: usize, v: [f32; M]| {
            for (m, &val) in v.iter().enumerate() {
                // SAFETY: row `o` belongs to one chunk of `for_row_chunks` only; `y` is
                // `[M, n]`.
                unsafe { *out.at(m * n + o) = val };
            }
        };
        for_row_chunks(n, self.row_words, &|r0, r1| {
            self.rows_range::<M>(&xs, r0, r1, &store)
        });
    }

    /// `x` (`[M, in]`) as the row kernels read it: the nibble kernels read each step's
    /// even columns first (see `split_x`), the others `x` as it is.
    pub(super) fn prepare_x<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match self.path() {
            Path::Nibble512 => split_x(x, self.in_features, 32).into(),
            Path::Nibble256 => split_x(x, self.in_features, 16).into(),
            Path::Vbmi | Path::Portable => x.into(),
        }
    }

    /// Output rows `r0..r1` for the `M` input rows `xs` ([`Self::prepare_x`]), each handed
    /// to `store` (on the calling thread).
    pub(super) fn rows_range<const M: usize>(
        &self,
        xs: &[f32],
        r0: usize,
        r1: usize,
        store: &(impl Fn(usize, [f32; M]) + Sync),
    ) {
        let k = self.in_features;
        match self.path() {
            // SAFETY: `path` checked the instruction set (detected, or forced from
            // `Isa::available`), the width and step-aligned groups; `xs` is split for the
            // nibble kernels; `words` has its read slack.
            #[cfg(target_arch = "x86_64")]
            Path::Nibble512 => unsafe { avx512::rows_4bit::<M>(self, xs, r0, r1, store) },
            #[cfg(target_arch = "x86_64")]
            Path::Nibble256 => unsafe { avx2::rows_4bit::<M>(self, xs, r0, r1, store) },
            #[cfg(target_arch = "x86_64")]
            Path::Vbmi => unsafe { vbmi::rows::<M>(self, xs, r0, r1, store) },
            _ => UNIT.with_borrow_mut(|unit| {
                unit.resize(k, 0.0);
                for o in r0..r1 {
                    store(o, self.row_portable::<M>(o, xs, unit));
                }
            }),
        }
    }

    /// Output row `o` for `M` input rows: the row's unit values looked up into `unit`,
    /// dotted group by group with each input row, scaled once per group.
    fn row_portable<const M: usize>(&self, o: usize, x: &[f32], unit: &mut [f32]) -> [f32; M] {
        let k = self.in_features;
        self.lookup_row(o, unit);
        let scales = &self.scales[o * self.n_groups..(o + 1) * self.n_groups];
        let mut acc = [0f32; M];
        for (g, &s) in scales.iter().enumerate() {
            for (m, a) in acc.iter_mut().enumerate() {
                let xr = &x[m * k..(m + 1) * k];
                let dot = match &self.groups {
                    None => {
                        let c = g * self.group_cols..((g + 1) * self.group_cols).min(k);
                        dot(&unit[c.clone()], &xr[c])
                    }
                    Some(gs) => gs[g]
                        .iter()
                        .map(|&j| unit[j as usize] * xr[j as usize])
                        .sum(),
                };
                *a += s * dot;
            }
        }
        acc
    }

    /// The dense weights `[out, in]` (what [`CodebookQuantizedLinear::dequantize`] gives);
    /// the tests' check of the packing (the kernels never expand a whole layer).
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let (n, k) = (self.out_features, self.in_features);
        let mut w = vec![0f32; n * k];
        w.par_chunks_mut(k.max(1)).enumerate().for_each(|(o, row)| {
            self.lookup_row(o, row);
            let scales = &self.scales[o * self.n_groups..(o + 1) * self.n_groups];
            match &self.groups {
                None => {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v *= scales[j / self.group_cols];
                    }
                }
                Some(gs) => {
                    for (g, cols) in gs.iter().enumerate() {
                        for &j in cols {
                            row[j as usize] *= scales[g];
                        }
                    }
                }
            }
        });
        w
    }
}

thread_local! {
    /// The portable path's looked-up row (`[in]`), reused across calls.
    static UNIT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Which kernel runs a layer's GEMV (see [`LutLinear::path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Nibble512,
    Nibble256,
    Vbmi,
    Portable,
}

/// Whether this CPU has AVX-512 VBMI (`vpermb`), which the byte-gather kernel needs.
fn vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Words of zeros after the last row, so a 16-byte load from any step of a row stays in
/// the buffer.
const READ_SLACK_WORDS: usize = 4;

/// `x` `[rows, k]` with each whole step of `step` columns reordered even columns first,
/// then odd ones (columns past the last whole step stay in place). A register kernel
/// widens each byte of codes to a lane: its low nibble is an even column's code, its high
/// nibble the next odd column's, so the split x lines up with both halves without any
/// shuffle of the codes.
fn split_x(x: &[f32], k: usize, step: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    let half = step / 2;
    for (src, dst) in x.chunks(k.max(1)).zip(out.chunks_mut(k.max(1))) {
        for (s, d) in src.chunks_exact(step).zip(dst.chunks_exact_mut(step)) {
            for t in 0..half {
                d[t] = s[2 * t];
                d[half + t] = s[2 * t + 1];
            }
        }
    }
    out
}

/// `Σ a·b` in 16 lanes, so the compiler vectorizes it (one running f32 sum would be
/// bound by the add's latency).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(u, v)| u * v)
        .sum();
    for (u, v) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += u[l] * v[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::LutLinear;
    use std::arch::x86_64::*;

    /// Rows `r0..r1` of `x · Wᵀ` for `M` input rows, `R` output rows at a time sharing
    /// each x load (`R · M · 2` independent FMA chains at batch 1–2). Per step of 32
    /// columns: 16 bytes of codes widened to 16 lanes; `vpermps` reads only an index's low
    /// 4 bits, so the table register looks up the even columns' codes (low nibbles)
    /// directly and the odd ones' after one shift — no mask, no code shuffle (x comes
    /// split by [`super::split_x`]). Per group the looked-up values are dotted with x,
    /// then scaled once; a tail of fewer than 32 columns is done in scalar code.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn rows_4bit<const M: usize>(
        l: &LutLinear,
        xs: &[f32],
        r0: usize,
        r1: usize,
        store: &impl Fn(usize, [f32; M]),
    ) {
        let r = match M {
            1 | 2 => block_loop::<M, 4>(l, xs, r0, r1, store),
            3 | 4 => block_loop::<M, 2>(l, xs, r0, r1, store),
            _ => r0,
        };
        block_loop::<M, 1>(l, xs, r, r1, store);
    }

    /// Blocks of `R` rows from `r0` while whole ones fit; returns the first row left.
    #[inline(always)]
    unsafe fn block_loop<const M: usize, const R: usize>(
        l: &LutLinear,
        xs: &[f32],
        r0: usize,
        r1: usize,
        store: &impl Fn(usize, [f32; M]),
    ) -> usize {
        let mut o = r0;
        while o + R <= r1 {
            for (i, v) in block::<M, R>(l, xs, o).into_iter().enumerate() {
                store(o + i, v);
            }
            o += R;
        }
        o
    }

    #[inline(always)]
    unsafe fn block<const M: usize, const R: usize>(
        l: &LutLinear,
        xs: &[f32],
        o: usize,
    ) -> [[f32; M]; R] {
        let k = l.in_features;
        let steps = k / 32;
        let per_group = if l.n_groups == 1 { steps.max(1) } else { l.group_cols / 32 };
        let table = _mm512_loadu_ps(l.table.as_ptr());
        let codes: [*const u8; R] =
            std::array::from_fn(|i| l.words.as_ptr().add((o + i) * l.row_words) as *const u8);
        let scales: [*const f32; R] =
            std::array::from_fn(|i| l.scales.as_ptr().add((o + i) * l.n_groups));
        let xp = xs.as_ptr();
        let mut tot = [[_mm512_setzero_ps(); M]; R];
        let (mut s, mut g) = (0, 0);
        while s < steps {
            let end = (s + per_group).min(steps);
            let mut even = [[_mm512_setzero_ps(); M]; R];
            let mut odd = [[_mm512_setzero_ps(); M]; R];
            for st in s..end {
                let xe: [__m512; M] = std::array::from_fn(|m| _mm512_loadu_ps(xp.add(m * k + 32 * st)));
                let xo: [__m512; M] =
                    std::array::from_fn(|m| _mm512_loadu_ps(xp.add(m * k + 32 * st + 16)));
                for i in 0..R {
                    let bytes = _mm_loadu_si128(codes[i].add(16 * st) as *const __m128i);
                    let v = _mm512_cvtepu8_epi32(bytes);
                    let we = _mm512_permutexvar_ps(v, table);
                    let wo = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), table);
                    for m in 0..M {
                        even[i][m] = _mm512_fmadd_ps(we, xe[m], even[i][m]);
                        odd[i][m] = _mm512_fmadd_ps(wo, xo[m], odd[i][m]);
                    }
                }
            }
            for i in 0..R {
                let sc = _mm512_set1_ps(*scales[i].add(g));
                for m in 0..M {
                    tot[i][m] = _mm512_fmadd_ps(_mm512_add_ps(even[i][m], odd[i][m]), sc, tot[i][m]);
                }
            }
            s = end;
            g += 1;
        }
        // the horizontal sums here, not in the closures below: a closure does not inherit
        // this function's target features, so the intrinsic would not inline there (an
        // outlined call per row and input row, 16 % of a decode step in `perf`)
        let mut sums = [[0f32; M]; R];
        for i in 0..R {
            for m in 0..M {
                sums[i][m] = _mm512_reduce_add_ps(tot[i][m]);
            }
        }
        std::array::from_fn(|i| {
            std::array::from_fn(|m| {
                let mut v = sums[i][m];
                let row = std::slice::from_raw_parts(codes[i], l.row_words * 4);
                for j in 32 * steps..k {
                    let code = (row[j / 2] >> (4 * (j % 2))) & 0xf;
                    v += *scales[i].add(j / l.group_cols) * l.table[code as usize] * xs[m * k + j];
                }
                v
            })
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::LutLinear;
    use std::arch::x86_64::*;

    /// [`super::avx512::rows_4bit`] in 8-lane registers, one output row at a time: a step
    /// is 16 columns (8 bytes widened to 8 lanes); the 16-entry table is two registers,
    /// each code looked up in both (`vpermps` reads an index's low 3 bits) and the right
    /// one picked by the code's bit 3 (the nibble's top bit shifted to the sign for
    /// `vblendvps`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_4bit<const M: usize>(
        l: &LutLinear,
        xs: &[f32],
        r0: usize,
        r1: usize,
        store: &impl Fn(usize, [f32; M]),
    ) {
        let k = l.in_features;
        let steps = k / 16;
        let per_group = if l.n_groups == 1 { steps.max(1) } else { l.group_cols / 16 };
        let lo = _mm256_loadu_ps(l.table.as_ptr());
        let hi = _mm256_loadu_ps(l.table.as_ptr().add(8));
        let xp = xs.as_ptr();
        for o in r0..r1 {
            let codes = l.words.as_ptr().add(o * l.row_words) as *const u8;
            let scales = &l.scales[o * l.n_groups..(o + 1) * l.n_groups];
            let mut tot = [_mm256_setzero_ps(); M];
            let (mut s, mut g) = (0, 0);
            while s < steps {
                let end = (s + per_group).min(steps);
                let mut even = [_mm256_setzero_ps(); M];
                let mut odd = [_mm256_setzero_ps(); M];
                for st in s..end {
                    let bytes = _mm_loadl_epi64(codes.add(8 * st) as *const __m128i);
                    let v = _mm256_cvtepu8_epi32(bytes);
                    let vo = _mm256_srli_epi32::<4>(v);
                    let we = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(lo, v),
                        _mm256_permutevar8x32_ps(hi, v),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<28>(v)),
                    );
                    let wo = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(lo, vo),
                        _mm256_permutevar8x32_ps(hi, vo),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<24>(v)),
                    );
                    for m in 0..M {
                        let x0 = _mm256_loadu_ps(xp.add(m * k + 16 * st));
                        let x1 = _mm256_loadu_ps(xp.add(m * k + 16 * st + 8));
                        even[m] = _mm256_fmadd_ps(we, x0, even[m]);
                        odd[m] = _mm256_fmadd_ps(wo, x1, odd[m]);
                    }
                }
                let sc = _mm256_set1_ps(scales[g]);
                for m in 0..M {
                    tot[m] = _mm256_fmadd_ps(_mm256_add_ps(even[m], odd[m]), sc, tot[m]);
                }
                s = end;
                g += 1;
            }
            let row = std::slice::from_raw_parts(codes, l.row_words * 4);
            let out: [f32; M] = std::array::from_fn(|m| {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), tot[m]);
                let mut v: f32 = lanes.iter().sum();
                for j in 16 * steps..k {
                    let code = (row[j / 2] >> (4 * (j % 2))) & 0xf;
                    v += scales[j / l.group_cols] * l.table[code as usize] * xs[m * k + j];
                }
                v
            });
            store(o, out);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vbmi {
    use super::LutLinear;
    use crate::pack::bits;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Rows `r0..r1` of `x · Wᵀ` for any width 2–8 on AVX-512 VBMI, 16 columns per step:
    /// the step's `2b` bytes are broadcast to all four 128-bit lanes, `vpermb` moves the two
    /// bytes holding column `j`'s code into lane `j` (others zeroed), `vpsrlvd` shifts the
    /// code to bit 0, and the table is looked up on the low bits — one `vpermps` on a
    /// 16-entry table repeating the `2^b` values (b ≤ 4: the bits above the code select
    /// a copy), `vpermt2ps` on 32 (b = 5), a gather of the masked code (b ≥ 6). Two
    /// accumulator sets alternate between steps; per group the sum is scaled once.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    pub(super) unsafe fn rows<const M: usize>(
        l: &LutLinear,
        x: &[f32],
        r0: usize,
        r1: usize,
        store: &impl Fn(usize, [f32; M]),
    ) {
        match l.bits {
            2 => rows_b::<M, 2>(l, x, r0, r1, store),
            3 => rows_b::<M, 3>(l, x, r0, r1, store),
            4 => rows_b::<M, 4>(l, x, r0, r1, store),
            5 => rows_b::<M, 5>(l, x, r0, r1, store),
            6 => rows_b::<M, 6>(l, x, r0, r1, store),
            7 => rows_b::<M, 7>(l, x, r0, r1, store),
            _ => rows_b::<M, 8>(l, x, r0, r1, store),
        }
    }

    /// One width's lookup: the byte picks and shifts that bring each of a step's 16 codes
    /// to bit 0 of its lane, and the table in registers.
    struct Lookup<const B: usize> {
        idx: __m512i,
        shift: __m512i,
        t0: __m512,
        t1: __m512,
        mask: __m512i,
        table: *const f32,
    }

    impl<const B: usize> Lookup<B> {
        #[inline(always)]
        unsafe fn new(table: &[f32]) -> Self {
            let mut idx = [0u8; 64];
            let mut shift = [0u32; 16];
            for j in 0..16 {
                idx[4 * j] = (B * j / 8) as u8;
                idx[4 * j + 1] = (B * j / 8 + 1) as u8;
                shift[j] = (B * j % 8) as u32;
            }
            let n_values = 1usize << B;
            let repeated: [f32; 32] = std::array::from_fn(|i| table[i % n_values]);
            Self {
                idx: _mm512_loadu_si512(idx.as_ptr() as *const _),
                shift: _mm512_loadu_si512(shift.as_ptr() as *const _),
                t0: _mm512_loadu_ps(repeated.as_ptr()),
                t1: _mm512_loadu_ps(repeated.as_ptr().add(16)),
                mask: _mm512_set1_epi32((n_values - 1) as i32),
                table: table.as_ptr(),
            }
        }

        /// The table values of step `st` (columns `16·st..16·st + 16`) of the codes at
        /// `codes` (a row's first byte; 16 bytes from the step's first are readable).
        #[inline(always)]
        unsafe fn step(&self, codes: *const u8, st: usize) -> __m512 {
            // the low two bytes of every 32-bit lane
            const LOW_BYTES: u64 = 0x3333_3333_3333_3333;
            let data =
                _mm512_broadcast_i32x4(_mm_loadu_si128(codes.add(2 * B * st) as *const __m128i));
            let picked = _mm512_maskz_permutexvar_epi8(LOW_BYTES, self.idx, data);
            let v = _mm512_srlv_epi32(picked, self.shift);
            match B {
                ..=4 => _mm512_permutexvar_ps(v, self.t0),
                5 => _mm512_permutex2var_ps(self.t0, v, self.t1),
                _ => _mm512_i32gather_ps::<4>(_mm512_and_si512(v, self.mask), self.table as _),
            }
        }
    }

    #[inline(always)]
    unsafe fn rows_b<const M: usize, const B: usize>(
        l: &LutLinear,
        x: &[f32],
        r0: usize,
        r1: usize,
        store: &impl Fn(usize, [f32; M]),
    ) {
        let k = l.in_features;
        let steps = k / 16;
        let per_group = if l.n_groups == 1 { steps.max(1) } else { l.group_cols / 16 };
        let lookup = Lookup::<B>::new(&l.table);
        let xp = x.as_ptr();
        for o in r0..r1 {
            let codes = l.words.as_ptr().add(o * l.row_words) as *const u8;
            let scales = &l.scales[o * l.n_groups..(o + 1) * l.n_groups];
            let mut tot = [_mm512_setzero_ps(); M];
            let (mut s, mut g) = (0, 0);
            while s < steps {
                let end = (s + per_group).min(steps);
                let mut acc = [[_mm512_setzero_ps(); M]; 2];
                for st in s..end {
                    let w = lookup.step(codes, st);
                    for (m, a) in acc[st & 1].iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp.add(m * k + 16 * st)), *a);
                    }
                }
                let sc = _mm512_set1_ps(scales[g]);
                for m in 0..M {
                    tot[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[0][m], acc[1][m]), sc, tot[m]);
                }
                s = end;
                g += 1;
            }
            let row = &l.words[o * l.row_words..(o + 1) * l.row_words];
            // summed outside the closure, which would not inline the intrinsic (see
            // `block_loop`)
            let mut sums = [0f32; M];
            for m in 0..M {
                sums[m] = _mm512_reduce_add_ps(tot[m]);
            }
            let out: [f32; M] = std::array::from_fn(|m| {
                let mut v = sums[m];
                for j in 16 * steps..k {
                    let code = bits::get(row, B as u8, j);
                    v += scales[j / l.group_cols] * l.table[code as usize] * x[m * k + j];
                }
                v
            });
            store(o, out);
        }
    }

    /// The table values of rows `rows` at columns `c0..c0 + width` into `out`
    /// (`[rows, width]`, `c0` a multiple of 16): whole steps by the register lookup, the
    /// tail code by code.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    pub(super) unsafe fn lookup_tile(
        l: &LutLinear,
        rows: Range<usize>,
        c0: usize,
        width: usize,
        out: &mut [f32],
    ) {
        match l.bits {
            2 => lookup_tile_b::<2>(l, rows, c0, width, out),
            3 => lookup_tile_b::<3>(l, rows, c0, width, out),
            4 => lookup_tile_b::<4>(l, rows, c0, width, out),
            5 => lookup_tile_b::<5>(l, rows, c0, width, out),
            6 => lookup_tile_b::<6>(l, rows, c0, width, out),
            7 => lookup_tile_b::<7>(l, rows, c0, width, out),
            _ => lookup_tile_b::<8>(l, rows, c0, width, out),
        }
    }

    #[inline(always)]
    unsafe fn lookup_tile_b<const B: usize>(
        l: &LutLinear,
        rows: Range<usize>,
        c0: usize,
        width: usize,
        out: &mut [f32],
    ) {
        let lookup = Lookup::<B>::new(&l.table);
        let (first, steps) = (c0 / 16, width / 16);
        for (o, dst) in rows.zip(out.chunks_exact_mut(width)) {
            let codes = l.words.as_ptr().add(o * l.row_words) as *const u8;
            for s in 0..steps {
                _mm512_storeu_ps(dst.as_mut_ptr().add(16 * s), lookup.step(codes, first + s));
            }
            let row = &l.words[o * l.row_words..(o + 1) * l.row_words];
            for (j, v) in dst.iter_mut().enumerate().skip(16 * steps) {
                *v = l.table[bits::get(row, B as u8, c0 + j) as usize];
            }
        }
    }
}

/// The tiled GEMM's view of a layer: a tile's codes looked up, then scaled per run of a
/// group's columns, or per column on an act-order layer (its columns scatter over groups).
impl TileSource for LutLinear {
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn padded_in(&self) -> usize {
        self.in_features
    }
    fn dequantize_tile(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        let width = cols.len();
        self.lookup_tile(rows.clone(), cols.start, out);
        for (o, dst) in rows.zip(out.chunks_exact_mut(width.max(1))) {
            let scales = &self.scales[o * self.n_groups..(o + 1) * self.n_groups];
            if let Some(col_group) = &self.col_group {
                for (v, &g) in dst.iter_mut().zip(&col_group[cols.clone()]) {
                    *v *= scales[g as usize];
                }
                continue;
            }
            let mut j = cols.start;
            while j < cols.end {
                let g = j / self.group_cols;
                let end = ((g + 1) * self.group_cols).min(cols.end);
                let s = scales[g];
                dst[j - cols.start..end - cols.start].iter_mut().for_each(|v| *v *= s);
                j = end;
            }
        }
    }
}

impl HostMatmul for LutLinear {
    fn matmul_host(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        assert_eq!(x.len(), rows * self.in_features, "x is not [{rows}, in]");
        assert_eq!(y.len(), rows * self.out_features, "y is not [{rows}, out]");
        if rows > MAX_GEMV_ROWS {
            return gemm::gemm(self, x, rows, y);
        }
        for (xc, yc) in x
            .chunks(MAX_GEMV_ROWS * self.in_features.max(1))
            .zip(y.chunks_mut(MAX_GEMV_ROWS * self.out_features.max(1)))
        {
            self.gemv(xc, xc.len() / self.in_features.max(1), yc);
        }
    }
}

impl PackedMatmul for LutLinear {
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (_, k) = x.dims2()?;
        ensure!(
            k == self.in_features,
            "input has {k} features, the layer takes {}",
            self.in_features
        );
        match x.device() {
            Device::Cpu => {}
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => return cuda::matmul(self, &self.cuda, x),
            #[cfg(feature = "metal")]
            Device::Metal(_) => return metal::matmul(self, &self.metal, x),
            other => anyhow::bail!(
                "the lookup-table kernels run on the CPU{}{}; load codebook models \
                 dequantized on {other:?}",
                if cfg!(feature = "cuda") { ", CUDA" } else { "" },
                if cfg!(feature = "metal") { ", Metal" } else { "" }
            ),
        }
        // GEMV, or the tiled GEMM (`matmul_host`)
        host_matmul_tensor(self, x, self.out_features)
    }
    fn resident_bytes(&self) -> usize {
        4 * (self.words.len() + self.scales.len() + self.table.len())
            + self
                .groups
                .as_ref()
                .map_or(0, |g| 8 * self.in_features + 24 * g.len()) // columns and col_group
    }
    fn describe(&self) -> String {
        format!(
            "bitsmith lut w{} g{} ({})",
            self.bits,
            if self.n_groups == 1 {
                -1
            } else {
                self.group_cols as i64
            },
            match self.path() {
                Path::Nibble512 => "avx512 vpermps",
                Path::Nibble256 => "avx2 vpermps",
                Path::Vbmi => "avx512 vpermb",
                Path::Portable => "portable",
            },
        )
    }
    fn host(&self) -> Option<&dyn HostMatmul> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::GroupSize;
    use half::f16;

    fn layer(
        n: usize,
        k: usize,
        b: u8,
        group: GroupSize,
        act_order: bool,
    ) -> CodebookQuantizedLinear {
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (n * 31 + k * 7 + b as usize) as u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let ng = group.n_groups(k);
        let gc = group.columns(k);
        let mut g_idx: Vec<u32> = (0..k).map(|j| (j / gc) as u32).collect();
        if act_order {
            // any assignment of columns to groups
            g_idx
                .iter_mut()
                .for_each(|g| *g = (next() % ng as u64) as u32);
        }
        CodebookQuantizedLinear {
            out_features: n,
            in_features: k,
            bits: b,
            group_size: group,
            exponent: 0.6,
            table: (0..1 << b)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .collect(),
            codes: (0..n * k).map(|_| (next() % (1 << b)) as u8).collect(),
            scales: (0..ng * n)
                .map(|_| f16::from_f32(0.01 + (next() % 100) as f32 / 1000.0))
                .collect(),
            g_idx,
        }
    }

    /// float64 reference: dequantize, then multiply.
    fn reference(q: &CodebookQuantizedLinear, x: &[f32], rows: usize) -> Vec<f64> {
        let (n, k) = (q.out_features, q.in_features);
        let w = q.dequantize();
        let mut y = vec![0f64; rows * n];
        for r in 0..rows {
            for o in 0..n {
                y[r * n + o] = (0..k)
                    .map(|j| x[r * k + j] as f64 * w[o * k + j] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn lookup_gemv_and_gemm_match_dequantize_then_matmul() {
        for b in 2..=8u8 {
            for (n, k, group, act) in [
                (5, 96, GroupSize::Columns(32), false),
                (7, 100, GroupSize::Columns(48), false),
                (3, 70, GroupSize::PerChannel, false),
                (4, 64, GroupSize::Columns(16), true),
                (9, 200, GroupSize::Columns(64), false),
                (6, 37, GroupSize::PerChannel, false),
                // 8-column slots (AVX2's) but not 16-column ones (AVX-512's)
                (4, 72, GroupSize::Columns(24), false),
                // the tiled GEMM's column tiles (512): a partial last tile, a group
                // across a tile boundary, odd widths starting mid-word
                (70, 1100, GroupSize::Columns(96), false),
                (66, 700, GroupSize::Columns(64), true),
                (3, 600, GroupSize::PerChannel, false),
            ] {
                let q = layer(n, k, b, group, act);
                for isa in Isa::available() {
                    let lut = LutLinear::from_codebook(&q).unwrap().with_isa(isa).unwrap();
                    assert_eq!(lut.dequantize(), q.dequantize(), "bits {b}");
                    assert_eq!(lut.g_idx(), q.g_idx, "bits {b} act {act}");
                    // the kernel the rules pick (see `LutLinear::path`) really runs
                    let aligned = |step: usize| {
                        !act && (group.n_groups(k) == 1 || group.columns(k) % step == 0)
                    };
                    let want = match isa {
                        Isa::Avx512 if b == 4 && aligned(32) => "avx512 vpermps",
                        Isa::Avx512 if vbmi() && aligned(16) => "avx512 vpermb",
                        Isa::Avx2 if b == 4 && aligned(16) => "avx2 vpermps",
                        _ => "portable",
                    };
                    assert!(lut.describe().contains(want), "{} vs {want}", lut.describe());
                    for rows in [1usize, 3, 8, 13, 40] {
                        let x: Vec<f32> = (0..rows * k)
                            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                            .collect();
                        let want = reference(&q, &x, rows);
                        let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
                        let got: Vec<f32> = lut
                            .matmul(&xt)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        // the host entry (the fused decode step's) as well
                        let mut host = vec![0f32; rows * n];
                        lut.matmul_host(&x, rows, &mut host);
                        let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                        for (i, ((g, h), w)) in got.iter().zip(&host).zip(&want).enumerate() {
                            assert!(
                                (*g as f64 - w).abs() <= 1e-5 * scale
                                    && (*h as f64 - w).abs() <= 1e-5 * scale,
                                "bits {b} {n}x{k} rows {rows} act {act} {isa:?}: y[{i}] {g} \
                                 (host {h}) vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
