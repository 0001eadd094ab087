//! Round-to-nearest: every weight to its nearest grid point, no calibration.

use super::allocation::LayerPlan;
use super::grid::{Grid, RangeFit};
use super::quantized::{fit_mixed, mixed_groups};
use super::rounding::LayerRounding;
use super::{
    GridCodes, GroupSize, LayerCodes, LayerQuantizer, LayerResult, LayerToQuantize,
    MixedQuantizedLinear, QuantizedLinear, UniformGrid,
};
use anyhow::{ensure, Result};
use half::f16;
use rayon::prelude::*;

/// Round-to-nearest on grid `G`.
pub struct Rtn<G: Grid = UniformGrid> {
    pub grid: G,
}

impl<G: Grid> LayerQuantizer for Rtn<G>
where
    GridCodes<G>: Into<LayerCodes>,
{
    fn name(&self) -> &'static str {
        "rtn"
    }

    fn needs_hessian(&self) -> bool {
        false
    }

    fn quantize(&self, layer: &LayerToQuantize) -> Result<LayerResult> {
        Ok(LayerResult {
            codes: self.round(layer)?.into(),
            column_loss: None,
            trained_loss: None,
        })
    }
}

impl<G: Grid> Rtn<G> {
    /// Round every weight of `layer` to its nearest point of the grid.
    pub fn round(&self, layer: &LayerToQuantize) -> Result<GridCodes<G>> {
        let (n, k) = (layer.out_features, layer.in_features);
        ensure!(
            layer.weight.len() == n * k,
            "{}: weight has {} values, expected {n}x{k}",
            layer.name,
            layer.weight.len()
        );
        // with calibration, a searched range (or exponent) weighs each column's error by
        // its Hessian
        let importance = layer.hessian.map(|h| hessian_diagonal(h, k));
        let grid = self
            .grid
            .for_layer_weighted(layer.weight, n, k, importance.as_deref())?;
        let group_size = grid.group_size();
        let g = group_size.columns(k);
        let n_groups = group_size.n_groups(k);
        let mut codes = vec![0u8; n * k];
        // per row: the parameters of each group; transposed to [group, row] below
        let row_params: Vec<Vec<G::Params>> = codes
            .par_chunks_mut(k)
            .zip(layer.weight.par_chunks(k))
            .map(|(code_row, w_row)| {
                (0..n_groups)
                    .map(|gi| {
                        let cols = gi * g..((gi + 1) * g).min(k);
                        let imp = importance.as_ref().map(|h| &h[cols.clone()]);
                        let p = grid.fit_weighted(&w_row[cols.clone()], imp);
                        for j in cols {
                            code_row[j] = grid.encode(w_row[j], &p, j - gi * g);
                        }
                        p
                    })
                    .collect()
            })
            .collect();
        let mut params = vec![G::Params::default(); n_groups * n];
        for (row, ps) in row_params.iter().enumerate() {
            for (gi, &p) in ps.iter().enumerate() {
                params[gi * n + row] = p;
            }
        }
        Ok(GridCodes {
            grid,
            out_features: n,
            in_features: k,
            codes,
            params,
            g_idx: contiguous_g_idx(k, group_size),
        })
    }
}

impl Rtn<UniformGrid> {
    /// [`Rtn::round`] in the uniform grid's stored form.
    pub fn quantize_layer(&self, layer: &LayerToQuantize) -> Result<QuantizedLinear> {
        Ok(self.round(layer)?.into())
    }
}

/// RTN as a rounding stage: every weight to its nearest point of its planned grid.
pub struct RtnRounding;

impl LayerRounding for RtnRounding {
    fn name(&self) -> &'static str {
        "rtn"
    }

    fn needs_hessian(&self) -> bool {
        false
    }

    fn round(&self, layer: &LayerToQuantize, plan: &LayerPlan) -> Result<LayerResult> {
        let codes = match plan {
            LayerPlan::Uniform(grid) => Rtn { grid: *grid }.round(layer)?.into(),
            LayerPlan::Power(grid) => Rtn { grid: grid.clone() }.round(layer)?.into(),
            LayerPlan::Ggml(grid) => Rtn { grid: *grid }.round(layer)?.into(),
            LayerPlan::Mixed {
                widths,
                group_size,
                sym,
                range,
            } => LayerCodes::Mixed(rtn_mixed(layer, widths, *group_size, *sym, *range)?),
            LayerPlan::MixedPower {
                widths,
                group_size,
                levels,
                range,
            } => LayerCodes::MixedCodebook(crate::quant::baq::codebook::rtn_mixed_power(
                layer,
                widths,
                *group_size,
                *levels,
                *range,
            )?),
        };
        Ok(LayerResult {
            codes,
            column_loss: None,
            trained_loss: None,
        })
    }
}

/// Round to nearest with a width per input column (0 = pruned), ranges fitted as
/// [`crate::quant::gptq_mixed`] fits them.
pub fn rtn_mixed(
    layer: &LayerToQuantize,
    widths: &[u8],
    group_size: Option<usize>,
    sym: bool,
    range: RangeFit,
) -> Result<MixedQuantizedLinear> {
    let (n, k) = (layer.out_features, layer.in_features);
    ensure!(
        layer.weight.len() == n * k && widths.len() == k,
        "{}: weight/widths sizes do not match {n}x{k}",
        layer.name
    );
    ensure!(
        widths.iter().all(|&b| b <= 8),
        "column widths must be 0..=8"
    );
    let groups = mixed_groups(widths, group_size);
    let grids: Vec<UniformGrid> = groups
        .group_width
        .iter()
        .map(|&bits| UniformGrid {
            bits,
            group_size: GroupSize::PerChannel,
            sym,
            range,
        })
        .collect();
    let importance = layer.hessian.map(|h| hessian_diagonal(h, k));
    let params = fit_mixed(
        layer.weight,
        n,
        k,
        &groups,
        &grids,
        group_size.is_some(),
        importance.as_deref(),
    );
    let mut codes = vec![0u8; n * k];
    codes.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
        for (j, c) in row.iter_mut().enumerate() {
            let g = groups.group_of_column[j];
            if g != u32::MAX {
                let g = g as usize;
                *c = grids[g].encode(layer.weight[r * k + j], params[g * n + r]);
            }
        }
    });
    Ok(MixedQuantizedLinear {
        out_features: n,
        in_features: k,
        sym,
        widths: widths.to_vec(),
        group_size,
        codes,
        scales: params.iter().map(|p| f16::from_f32(p.scale)).collect(),
        zeros: params.iter().map(|p| p.zero).collect(),
    })
}

/// The diagonal of a `[k, k]` Hessian.
pub(crate) fn hessian_diagonal(h: &[f32], k: usize) -> Vec<f32> {
    (0..k).map(|j| h[j * k + j]).collect()
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
