//! Lookup-table kernels for codebook layers (NUPES' power grid, `bitsmith_codebook`): a
//! weight is `scale[group, row] · table[code]`, so unpacking a code is a table lookup
//! instead of `scale · (code − zero)`.
//!
//! The layer stays in the file's `row-codes-v1` form (each output row's codes an LSB-first
//! `b`-bit stream, [`crate::pack::bits`]). GEMV (1..=8 rows, the decode step): per output
//! row, the codes of one group are looked up into a buffer and dotted with every input
//! row, then scaled once per group. Larger batches dequantize the layer into a transient
//! dense matrix for candle's GEMM. At 4 bits on AVX-512 the 16-entry table is one
//! register: 16 codes are widened to 16 lanes and looked up with one `vpermps`
//! (`_mm512_permutexvar_ps`), scaled by their group's scale and accumulated with FMA;
//! other widths and CPUs run the portable loop.

use super::Isa;
use crate::model::{host_matmul_tensor, HostMatmul, PackedMatmul, MAX_GEMV_ROWS};
use crate::pack::bits;
use crate::quant::CodebookQuantizedLinear;
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
mod cuda;

/// A codebook layer run by lookup-table kernels.
#[derive(Debug)]
pub struct LutLinear {
    out_features: usize,
    in_features: usize,
    bits: u8,
    /// `u32` words per output row.
    row_words: usize,
    /// `[out, row_words]`.
    words: Vec<u32>,
    /// `[out, n_groups]` (row-major per output row: one row's scales are contiguous).
    scales: Vec<f32>,
    n_groups: usize,
    table: Vec<f32>,
    /// Columns of each group in order: `None` when groups are contiguous runs of
    /// `group_cols` columns (no act-order), else the original columns of every group.
    groups: Option<Vec<Vec<u32>>>,
    group_cols: usize,
    isa: Isa,
    /// The layer uploaded to each CUDA device it ran on (`cuda` feature).
    #[cfg(feature = "cuda")]
    cuda: cuda::CudaCache,
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
        let mut words = vec![0u32; n * row_words];
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
            groups,
            group_cols,
            isa: Isa::detect(),
            #[cfg(feature = "cuda")]
            cuda: Default::default(),
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

    /// The register lookup that runs this layer, if any: 4-bit codes in contiguous groups
    /// whose boundaries fall on the kernel's slots (16 columns on AVX-512, 8 on AVX2).
    fn simd_4bit(&self) -> Option<Isa> {
        let slot = match self.isa {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
            Isa::Portable => return None,
        };
        (self.bits == 4
            && self.groups.is_none()
            && (self.group_cols.is_multiple_of(slot) || self.n_groups == 1))
            .then_some(self.isa)
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
        let words = &self.words[o * self.row_words..(o + 1) * self.row_words];
        match self.bits {
            // whole codes per word: one shift and mask each
            2 | 4 | 8 => {
                let b = self.bits as usize;
                let per = 32 / b;
                let mask = (1u32 << b) - 1;
                for (chunk, &w) in out.chunks_mut(per).zip(words) {
                    for (i, v) in chunk.iter_mut().enumerate() {
                        *v = self.table[((w >> (i * b)) & mask) as usize];
                    }
                }
            }
            b => {
                for (j, v) in out.iter_mut().enumerate() {
                    *v = self.table[bits::get(words, b, j) as usize];
                }
            }
        }
    }

    /// `y` `[rows, out]` = `x` `[rows, in]` · Wᵀ for `rows ≤` [`MAX_GEMV_ROWS`].
    fn gemv(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (n, k) = (self.out_features, self.in_features);
        let simd = self.simd_4bit();
        let cols: Vec<[f32; MAX_GEMV_ROWS]> = (0..n)
            .into_par_iter()
            .map_init(
                || vec![0f32; k],
                |unit, o| {
                    // SAFETY: `simd_4bit` checked the instruction set (detected, or forced
                    // from `Isa::available`), 4-bit codes and slot-aligned groups.
                    #[cfg(target_arch = "x86_64")]
                    match simd {
                        Some(Isa::Avx512) => return unsafe { avx512::row_4bit(self, o, x, rows) },
                        Some(Isa::Avx2) => return unsafe { avx2::row_4bit(self, o, x, rows) },
                        _ => {}
                    }
                    let _ = simd;
                    self.lookup_row(o, unit);
                    let scales = &self.scales[o * self.n_groups..(o + 1) * self.n_groups];
                    let mut acc = [0f32; MAX_GEMV_ROWS];
                    for (g, &s) in scales.iter().enumerate() {
                        for (r, a) in acc.iter_mut().enumerate().take(rows) {
                            let xr = &x[r * k..(r + 1) * k];
                            let dot: f32 = match &self.groups {
                                None => {
                                    let c = g * self.group_cols..((g + 1) * self.group_cols).min(k);
                                    unit[c.clone()].iter().zip(&xr[c]).map(|(u, v)| u * v).sum()
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
                },
            )
            .collect();
        for r in 0..rows {
            for (o, c) in cols.iter().enumerate() {
                y[r * n + o] = c[r];
            }
        }
    }

    /// The dense weights `[out, in]` (what [`CodebookQuantizedLinear::dequantize`] gives).
    fn dequantize(&self) -> Vec<f32> {
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::LutLinear;
    use crate::model::MAX_GEMV_ROWS;
    use std::arch::x86_64::*;

    /// Output row `o` of `x · Wᵀ` for `rows` input rows: 16 codes per step, looked up
    /// in the table register, scaled by their group's scale, FMA'd into one accumulator
    /// per input row; a tail of fewer than 16 columns is done in scalar code.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn row_4bit(
        l: &LutLinear,
        o: usize,
        x: &[f32],
        rows: usize,
    ) -> [f32; MAX_GEMV_ROWS] {
        let k = l.in_features;
        let words = &l.words[o * l.row_words..(o + 1) * l.row_words];
        let scales = &l.scales[o * l.n_groups..(o + 1) * l.n_groups];
        let table = _mm512_loadu_ps(l.table.as_ptr());
        let low = _mm_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); MAX_GEMV_ROWS];
        let full = k / 16;
        for s in 0..full {
            // 16 codes = 2 words = 8 bytes, low nibble first
            let bytes = _mm_loadl_epi64(words.as_ptr().add(2 * s) as *const __m128i);
            let lo = _mm_and_si128(bytes, low);
            let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
            let codes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
            let unit = _mm512_permutexvar_ps(codes, table);
            let w = _mm512_mul_ps(unit, _mm512_set1_ps(scales[16 * s / l.group_cols]));
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                let xv = _mm512_loadu_ps(x.as_ptr().add(r * k + 16 * s));
                *a = _mm512_fmadd_ps(w, xv, *a);
            }
        }
        let mut out = [0f32; MAX_GEMV_ROWS];
        for (r, v) in out.iter_mut().enumerate().take(rows) {
            *v = _mm512_reduce_add_ps(acc[r]);
            for j in 16 * full..k {
                let code = (words[j / 8] >> (4 * (j % 8))) & 0xf;
                *v += scales[j / l.group_cols] * l.table[code as usize] * x[r * k + j];
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::LutLinear;
    use crate::model::MAX_GEMV_ROWS;
    use std::arch::x86_64::*;

    /// [`super::avx512::row_4bit`] in 8-lane registers: the 16-entry table is two
    /// registers, each code looked up in both (`vpermps` reads its low 3 bits) and the
    /// right one picked by bit 3, moved to the sign bit for `vblendvps`. One `u32` word
    /// holds the 8 codes of a step.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_4bit(
        l: &LutLinear,
        o: usize,
        x: &[f32],
        rows: usize,
    ) -> [f32; MAX_GEMV_ROWS] {
        let k = l.in_features;
        let words = &l.words[o * l.row_words..(o + 1) * l.row_words];
        let scales = &l.scales[o * l.n_groups..(o + 1) * l.n_groups];
        let table_lo = _mm256_loadu_ps(l.table.as_ptr());
        let table_hi = _mm256_loadu_ps(l.table.as_ptr().add(8));
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let nibble = _mm256_set1_epi32(0xf);
        let mut acc = [_mm256_setzero_ps(); MAX_GEMV_ROWS];
        let full = k / 8;
        for s in 0..full {
            let word = _mm256_set1_epi32(words[s] as i32);
            let codes = _mm256_and_si256(_mm256_srlv_epi32(word, shifts), nibble);
            let from_lo = _mm256_permutevar8x32_ps(table_lo, codes);
            let from_hi = _mm256_permutevar8x32_ps(table_hi, codes);
            let high = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));
            let unit = _mm256_blendv_ps(from_lo, from_hi, high);
            let w = _mm256_mul_ps(unit, _mm256_set1_ps(scales[8 * s / l.group_cols]));
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                let xv = _mm256_loadu_ps(x.as_ptr().add(r * k + 8 * s));
                *a = _mm256_fmadd_ps(w, xv, *a);
            }
        }
        let mut out = [0f32; MAX_GEMV_ROWS];
        for (r, v) in out.iter_mut().enumerate().take(rows) {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]);
            *v = lanes.iter().sum();
            for j in 8 * full..k {
                let code = (words[j / 8] >> (4 * (j % 8))) & 0xf;
                *v += scales[j / l.group_cols] * l.table[code as usize] * x[r * k + j];
            }
        }
        out
    }
}

impl HostMatmul for LutLinear {
    fn matmul_host(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        assert_eq!(x.len(), rows * self.in_features, "x is not [{rows}, in]");
        assert_eq!(y.len(), rows * self.out_features, "y is not [{rows}, out]");
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
        let (rows, k) = x.dims2()?;
        ensure!(
            k == self.in_features,
            "input has {k} features, the layer takes {}",
            self.in_features
        );
        match x.device() {
            Device::Cpu => {}
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => return cuda::matmul(self, &self.cuda, x),
            other => anyhow::bail!(
                "the lookup-table kernels run on the CPU{}; load codebook models dequantized \
                 on {other:?}",
                if cfg!(feature = "cuda") { " and CUDA" } else { "" }
            ),
        }
        if rows <= MAX_GEMV_ROWS {
            return host_matmul_tensor(self, x, self.out_features);
        }
        // a batch: dequantize once into a transient dense matrix for candle's GEMM
        let w = Tensor::from_vec(
            self.dequantize(),
            (self.out_features, self.in_features),
            x.device(),
        )?;
        Ok(x.to_dtype(candle_core::DType::F32)?
            .matmul(&w.t()?)?
            .to_dtype(x.dtype())?)
    }
    fn resident_bytes(&self) -> usize {
        4 * (self.words.len() + self.scales.len() + self.table.len())
            + self
                .groups
                .as_ref()
                .map_or(0, |g| 4 * self.in_features + 24 * g.len())
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
            match self.simd_4bit() {
                Some(Isa::Avx512) => "avx512 vpermps",
                Some(Isa::Avx2) => "avx2 vpermps",
                _ => "portable",
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
            ] {
                let q = layer(n, k, b, group, act);
                for isa in Isa::available() {
                    let lut = LutLinear::from_codebook(&q).unwrap().with_isa(isa).unwrap();
                    assert_eq!(lut.dequantize(), q.dequantize(), "bits {b}");
                    assert_eq!(lut.g_idx(), q.g_idx, "bits {b} act {act}");
                    // the lookup register path really runs where it applies
                    let register = match isa {
                        Isa::Avx512 => "avx512 vpermps",
                        Isa::Avx2 => "avx2 vpermps",
                        Isa::Portable => "portable",
                    };
                    let slot = if isa == Isa::Avx512 { 16 } else { 8 };
                    let aligned = group.n_groups(k) == 1 || group.columns(k) % slot == 0;
                    assert_eq!(
                        lut.describe().contains(register),
                        isa == Isa::Portable || (b == 4 && !act && aligned),
                        "{}",
                        lut.describe()
                    );
                    for rows in [1usize, 3, 8, 13] {
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
                        let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (*g as f64 - w).abs() <= 1e-5 * scale,
                                "bits {b} {n}x{k} rows {rows} act {act} {isa:?}: y[{i}] {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
