//! A quantized linear layer in its format-independent form: integer codes plus per-group
//! scales and zero points. Every packer (GPTQ layout, later GGUF) reads from this.

use super::grid::{GroupParams, UniformGrid};
use half::f16;
use rayon::prelude::*;

#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub grid: UniformGrid,
    /// `[out_features, in_features]`, row-major.
    pub codes: Vec<u8>,
    /// `[n_groups, out_features]`.
    pub scales: Vec<f16>,
    /// `[n_groups, out_features]`, the true zero point.
    pub zeros: Vec<u8>,
    /// Group of every input column (`[in_features]`); `k / group_size` unless act-order.
    pub g_idx: Vec<u32>,
}

impl QuantizedLinear {
    pub fn n_groups(&self) -> usize {
        self.scales.len() / self.out_features.max(1)
    }

    pub fn params(&self, group: usize, row: usize) -> GroupParams {
        let i = group * self.out_features + row;
        GroupParams {
            scale: self.scales[i].to_f32(),
            zero: self.zeros[i],
        }
    }

    /// The f32 weights `[out, in]` these codes stand for; the exact values a fake-quantized
    /// model computes with.
    pub fn dequantize(&self) -> Vec<f32> {
        let k = self.in_features;
        let mut out = vec![0f32; self.out_features * k];
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(n, row)| {
                let codes = &self.codes[n * k..(n + 1) * k];
                for (j, w) in row.iter_mut().enumerate() {
                    *w = UniformGrid::decode(codes[j], self.params(self.g_idx[j] as usize, n));
                }
            });
        out
    }

    /// Storage of the packed layer in bits per weight (codes, f16 scales, packed zeros,
    /// i32 `g_idx`), as the GPTQ layout stores them.
    pub fn stored_bits_per_weight(&self) -> f64 {
        let bits = self.grid.bits as usize;
        let k_words = (self.in_features * bits).div_ceil(32);
        let n_words = (self.out_features * bits).div_ceil(32);
        let bytes = 4 * k_words * self.out_features
            + 4 * n_words * self.n_groups()
            + 2 * self.scales.len()
            + 4 * self.in_features;
        8.0 * bytes as f64 / (self.out_features * self.in_features) as f64
    }
}

/// A linear with its own bit width per input column (0 = pruned) and, per output row, one
/// range shared by all widths: the scale/zero of width `b` for row `n` are at
/// `n · 9 + b`. Produced by BAQ's mixed-width GPTQ pass; its packed layout is not built yet.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedQuantizedLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub sym: bool,
    /// `[in_features]`.
    pub widths: Vec<u8>,
    /// `[out_features, in_features]`.
    pub codes: Vec<u8>,
    /// `[out_features, 9]`.
    pub scales: Vec<f16>,
    /// `[out_features, 9]`.
    pub zeros: Vec<u8>,
}

impl MixedQuantizedLinear {
    /// The f32 weights `[out, in]` the codes stand for (pruned columns are 0).
    pub fn dequantize(&self) -> Vec<f32> {
        let k = self.in_features;
        let mut out = vec![0f32; self.out_features * k];
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(n, row)| {
                for (j, w) in row.iter_mut().enumerate() {
                    let b = self.widths[j] as usize;
                    if b > 0 {
                        let p = GroupParams {
                            scale: self.scales[n * 9 + b].to_f32(),
                            zero: self.zeros[n * 9 + b],
                        };
                        *w = UniformGrid::decode(self.codes[n * k + j], p);
                    }
                }
            });
        out
    }

    /// Average code width over all weights (what the widths cost before metadata).
    pub fn mean_width(&self) -> f64 {
        self.widths.iter().map(|&b| b as f64).sum::<f64>() / self.in_features.max(1) as f64
    }
}
