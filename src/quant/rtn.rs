//! Round-to-nearest: every weight to its nearest grid point, no calibration.

use super::{
    GroupSize, LayerCodes, LayerQuantizer, LayerResult, LayerToQuantize, QuantizedLinear,
    UniformGrid,
};
use anyhow::{ensure, Result};
use half::f16;
use rayon::prelude::*;

pub struct Rtn {
    pub grid: UniformGrid,
}

impl LayerQuantizer for Rtn {
    fn name(&self) -> &'static str {
        "rtn"
    }

    fn needs_hessian(&self) -> bool {
        false
    }

    fn quantize(&self, layer: &LayerToQuantize) -> Result<LayerResult> {
        Ok(LayerResult {
            codes: LayerCodes::Uniform(self.quantize_layer(layer)?),
            column_loss: None,
        })
    }
}

impl Rtn {
    /// Round every weight of `layer` to its nearest grid point.
    pub fn quantize_layer(&self, layer: &LayerToQuantize) -> Result<QuantizedLinear> {
        let (n, k) = (layer.out_features, layer.in_features);
        ensure!(
            layer.weight.len() == n * k,
            "{}: weight has {} values, expected {n}x{k}",
            layer.name,
            layer.weight.len()
        );
        let g = self.grid.group_size.columns(k);
        let n_groups = self.grid.group_size.n_groups(k);
        let mut codes = vec![0u8; n * k];
        // per row: (scale, zero) of each group; transposed to [group, row] below
        let row_params: Vec<Vec<(f16, u8)>> = codes
            .par_chunks_mut(k)
            .zip(layer.weight.par_chunks(k))
            .map(|(code_row, w_row)| {
                (0..n_groups)
                    .map(|gi| {
                        let cols = gi * g..((gi + 1) * g).min(k);
                        let p = self.grid.fit(&w_row[cols.clone()]);
                        for j in cols {
                            code_row[j] = self.grid.encode(w_row[j], p);
                        }
                        (f16::from_f32(p.scale), p.zero)
                    })
                    .collect()
            })
            .collect();
        let mut scales = vec![f16::ZERO; n_groups * n];
        let mut zeros = vec![0u8; n_groups * n];
        for (row, params) in row_params.iter().enumerate() {
            for (gi, &(s, z)) in params.iter().enumerate() {
                scales[gi * n + row] = s;
                zeros[gi * n + row] = z;
            }
        }
        Ok(QuantizedLinear {
            out_features: n,
            in_features: k,
            grid: self.grid,
            codes,
            scales,
            zeros,
            g_idx: contiguous_g_idx(k, self.grid.group_size),
        })
    }
}

/// `g_idx[k] = k / group_size`: groups of consecutive input columns.
pub fn contiguous_g_idx(in_features: usize, group_size: GroupSize) -> Vec<u32> {
    let g = group_size.columns(in_features);
    (0..in_features).map(|j| (j / g) as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtn_dequantizes_within_half_a_step_and_handles_partial_groups() {
        let (n, k) = (5, 70); // 70 = two groups of 32 and a partial one of 6
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0)
            .collect();
        let grid = UniformGrid::new(3, GroupSize::Columns(32), false).unwrap();
        let q = Rtn { grid }
            .quantize_layer(&LayerToQuantize {
                name: "t",
                weight: &w,
                out_features: n,
                in_features: k,
                hessian: None,
            })
            .unwrap();
        assert_eq!(q.n_groups(), 3);
        let d = q.dequantize();
        for row in 0..n {
            for j in 0..k {
                let p = q.params(j / 32, row);
                assert!((d[row * k + j] - w[row * k + j]).abs() <= p.scale * 0.5 * 1.002);
            }
        }
    }
}
