//! Lookup-table kernels for codebook layers (NUPES' power grid, `bitsmith_codebook`): a
//! weight is `scale[group, row] · table[code]`, so unpacking a code is a table lookup
//! instead of `scale · (code − zero)`.
//!
//! The layer stays in the file's `row-codes-v1` form (each output row's codes an LSB-first
//! `b`-bit stream, [`crate::pack::bits`]). GEMV (1..=8 rows, the decode step): per output
//! row, the codes of one group are looked up into a buffer and dotted with every input
//! row, then scaled once per group. Larger batches dequantize the layer into a transient
//! dense matrix for candle's GEMM. Portable Rust only so far (no SIMD table lookup).

use crate::model::{host_matmul_tensor, HostMatmul, PackedMatmul, MAX_GEMV_ROWS};
use crate::pack::bits;
use crate::quant::CodebookQuantizedLinear;
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

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
        })
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
        let cols: Vec<[f32; MAX_GEMV_ROWS]> = (0..n)
            .into_par_iter()
            .map_init(
                || vec![0f32; k],
                |unit, o| {
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
        ensure!(
            matches!(x.device(), Device::Cpu),
            "the lookup-table kernels run on the CPU only; load codebook models dequantized \
             on {:?}",
            x.device()
        );
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
            "bitsmith lut w{} g{} (portable)",
            self.bits,
            if self.n_groups == 1 {
                -1
            } else {
                self.group_cols as i64
            }
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
            ] {
                let q = layer(n, k, b, group, act);
                let lut = LutLinear::from_codebook(&q).unwrap();
                assert_eq!(lut.dequantize(), q.dequantize(), "bits {b}");
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
                            "bits {b} {n}x{k} rows {rows} act {act}: y[{i}] {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
