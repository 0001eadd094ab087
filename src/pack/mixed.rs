//! The mixed-width layout for BAQ layers (a bit width per input column). Columns are
//! grouped into runs of equal width, each run stored like a per-channel GPTQ linear at its
//! own width, so an unpacker (and a kernel) handles one width at a time:
//!
//! | tensor | dtype | shape | content |
//! |---|---|---|---|
//! | `<name>.col_perm` | I32 | `[K]` | original column of each stored position; runs by ascending width, original order inside a run |
//! | `<name>.col_widths` | U8 | `[K]` | width of each original column (0 = pruned, stores nothing) |
//! | `<name>.w<b>.qweight` | I32 | `[ceil(K_b·b/32), N]` | codes of the run's `K_b` columns, packed along the input dimension (GPTQ packing) |
//! | `<name>.w<b>.scales` | F16 | `[1, N]` | per-row scale of width `b` |
//! | `<name>.w<b>.qzeros` | I32 | `[1, ceil(N·b/32)]` | per-row zero point of width `b` (true value, GPTQ v2) |
//!
//! Every width present gets one run; `K_b` is the number of columns of width `b`.

use super::bits;

/// `quantization_config.quant_method` of a model holding mixed-width layers.
pub const MIXED_METHOD: &str = "bitsmith-mixed";
use crate::quant::MixedQuantizedLinear;
use anyhow::{bail, ensure, Result};
use half::f16;

/// One run of equal-width columns, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedRun {
    pub bits: u8,
    /// `[ceil(K_b·b/32), N]`.
    pub qweight: Vec<u32>,
    /// `[N]`.
    pub scales: Vec<f16>,
    /// `[ceil(N·b/32)]`.
    pub qzeros: Vec<u32>,
}

/// The tensors of one mixed-width linear.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedTensors {
    pub col_perm: Vec<i32>,
    pub col_widths: Vec<u8>,
    pub runs: Vec<MixedRun>,
}

impl MixedTensors {
    pub fn from_quantized(q: &MixedQuantizedLinear) -> Self {
        let (n, k) = (q.out_features, q.in_features);
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by_key(|&j| (q.widths[j], j));
        let mut runs = Vec::new();
        for b in 1..=8u8 {
            let cols: Vec<usize> = order
                .iter()
                .copied()
                .filter(|&j| q.widths[j] == b)
                .collect();
            if cols.is_empty() {
                continue;
            }
            let rows = bits::packed_words(cols.len(), b);
            let mut qweight = vec![0u32; rows * n];
            let mut column = vec![0u32; rows];
            for r in 0..n {
                column.iter_mut().for_each(|w| *w = 0);
                bits::pack_into(cols.iter().map(|&j| q.codes[r * k + j]), b, &mut column);
                for (i, &w) in column.iter().enumerate() {
                    qweight[i * n + r] = w;
                }
            }
            let slot = |r: usize| r * 9 + b as usize;
            runs.push(MixedRun {
                bits: b,
                qweight,
                scales: (0..n).map(|r| q.scales[slot(r)]).collect(),
                qzeros: bits::pack(&(0..n).map(|r| q.zeros[slot(r)]).collect::<Vec<u8>>(), b),
            });
        }
        Self {
            col_perm: order.iter().map(|&j| j as i32).collect(),
            col_widths: q.widths.clone(),
            runs,
        }
    }

    /// Unpack, validating shapes, the permutation and the widths.
    pub fn to_quantized(
        &self,
        out_features: usize,
        in_features: usize,
        sym: bool,
    ) -> Result<MixedQuantizedLinear> {
        let (n, k) = (out_features, in_features);
        ensure!(
            self.col_perm.len() == k && self.col_widths.len() == k,
            "col_perm/col_widths must have {k} entries"
        );
        ensure!(
            self.col_widths.iter().all(|&b| b <= 8),
            "column widths must be 0..=8"
        );
        let mut seen = vec![false; k];
        for &j in &self.col_perm {
            let j = usize::try_from(j).ok().filter(|&j| j < k && !seen[j]);
            let Some(j) = j else {
                bail!("col_perm is not a permutation of 0..{k}")
            };
            seen[j] = true;
        }
        let mut codes = vec![0u8; n * k];
        let mut scales = vec![f16::ZERO; n * 9];
        let mut zeros = vec![0u8; n * 9];
        let mut pos = 0;
        // runs follow the permutation: pruned columns first, then ascending widths
        pos += self.col_widths.iter().filter(|&&b| b == 0).count();
        let mut expected_bits = 1u8;
        for run in &self.runs {
            let b = run.bits;
            ensure!(
                (expected_bits..=8).contains(&b),
                "runs must have distinct ascending widths (got {b})"
            );
            expected_bits = b + 1;
            let cols: Vec<usize> = self.col_perm[pos..]
                .iter()
                .map(|&j| j as usize)
                .take_while(|&j| self.col_widths[j] == b)
                .collect();
            ensure!(!cols.is_empty(), "run of width {b} has no columns");
            let rows = bits::packed_words(cols.len(), b);
            ensure!(
                run.qweight.len() == rows * n,
                "w{b}.qweight has {} words, expected {rows}x{n}",
                run.qweight.len()
            );
            ensure!(
                run.scales.len() == n,
                "w{b}.scales has {} entries, expected {n}",
                run.scales.len()
            );
            ensure!(
                run.qzeros.len() == bits::packed_words(n, b),
                "w{b}.qzeros has the wrong size"
            );
            let mut column = vec![0u32; rows];
            for r in 0..n {
                for (i, w) in column.iter_mut().enumerate() {
                    *w = run.qweight[i * n + r];
                }
                for (t, &j) in cols.iter().enumerate() {
                    codes[r * k + j] = bits::get(&column, b, t);
                }
                scales[r * 9 + b as usize] = run.scales[r];
                zeros[r * 9 + b as usize] = bits::get(&run.qzeros, b, r);
            }
            pos += cols.len();
        }
        ensure!(pos == k, "runs cover {pos} of {k} columns");
        Ok(MixedQuantizedLinear {
            out_features: n,
            in_features: k,
            sym,
            widths: self.col_widths.clone(),
            codes,
            scales,
            zeros,
        })
    }

    /// Stored bytes: codes, scales, zeros, permutation and widths.
    pub fn byte_len(&self) -> usize {
        let runs: usize = self
            .runs
            .iter()
            .map(|r| 4 * r.qweight.len() + 2 * r.scales.len() + 4 * r.qzeros.len())
            .sum();
        runs + 4 * self.col_perm.len() + self.col_widths.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gptq_mixed;

    #[test]
    fn mixed_layout_round_trips() {
        let (n, k) = (40, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| (((i * 7919) % 1013) as f32 / 1013.0 - 0.45) * 0.1)
            .collect();
        let h: Vec<f32> = (0..k * k)
            .map(|i| {
                if i / k == i % k {
                    1.0 + (i % 7) as f32
                } else {
                    0.01
                }
            })
            .collect();
        for pattern in [
            vec![0u8, 2, 3, 4, 5, 6, 7, 8],
            vec![3],
            vec![2, 4],
            vec![1, 8, 0],
        ] {
            let widths: Vec<u8> = (0..k)
                .map(|j| pattern[(j * 5 + 1) % pattern.len()])
                .collect();
            for sym in [false, true] {
                let q = gptq_mixed(&w, n, k, &h, &widths, sym, 0.01, 32)
                    .unwrap()
                    .quantized;
                let t = MixedTensors::from_quantized(&q);
                let back = t.to_quantized(n, k, sym).unwrap();
                // parameter slots of absent widths are not stored; compare what is
                assert_eq!(back.codes, q.codes);
                assert_eq!(back.dequantize(), q.dequantize(), "{pattern:?} sym {sym}");
                let code_bits: usize = widths.iter().map(|&b| b as usize).sum::<usize>() * n;
                assert!(8 * t.byte_len() >= code_bits);
            }
        }
    }

    #[test]
    fn corrupt_permutation_is_an_error() {
        let (n, k) = (4, 32);
        let w = vec![0.01f32; n * k];
        let h: Vec<f32> = (0..k * k)
            .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
            .collect();
        let q = gptq_mixed(&w, n, k, &h, &vec![4; k], false, 0.01, 32)
            .unwrap()
            .quantized;
        let mut t = MixedTensors::from_quantized(&q);
        t.col_perm[1] = t.col_perm[0];
        assert!(t
            .to_quantized(n, k, false)
            .unwrap_err()
            .to_string()
            .contains("permutation"));
    }
}
