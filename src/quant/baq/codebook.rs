//! BAQ's widths on NUPES' power codebooks: every width present in a layer gets its own
//! power table, its exponent fitted on the columns that width rounds (the Hessian-weighted
//! round-to-nearest error with calibration, as GPTQ on one power grid fits it), then the
//! columns are rounded by GPTQ's mixed-width solve or to nearest on those tables.

use crate::quant::gptq::{gptq_mixed_on, MixedGridOutput};
use crate::quant::grid::{Grid, GroupSize, PowerGrid, PowerLevels, RangeFit};
use crate::quant::quantized::{fit_mixed, mixed_groups, MixedGroups};
use crate::quant::rtn::hessian_diagonal;
use crate::quant::{LayerToQuantize, MixedCodebookQuantizedLinear, WidthCodebook};
use anyhow::{ensure, Result};
use half::f16;
use rayon::prelude::*;

/// The power grid of every width present in `groups`, by width (index = bits): each
/// exponent fitted on that width's columns of `weight` (`[n, k]`), gathered in stored order
/// so their scale groups are exactly the layout's range groups.
#[allow(clippy::too_many_arguments)]
fn width_grids(
    weight: &[f32],
    n: usize,
    k: usize,
    groups: &MixedGroups,
    group_size: Option<usize>,
    levels: PowerLevels,
    range: RangeFit,
    importance: Option<&[f32]>,
) -> Result<Vec<Option<PowerGrid>>> {
    let mut grids: Vec<Option<PowerGrid>> = vec![None; 9];
    for (b, run) in groups.runs() {
        let cols = groups.run_columns(&run);
        let kb = cols.len();
        let sub: Vec<f32> = (0..n)
            .flat_map(|r| cols.iter().map(move |&j| weight[r * k + j]))
            .collect();
        let imp: Option<Vec<f32>> = importance.map(|h| cols.iter().map(|&j| h[j]).collect());
        let scale_groups = match group_size {
            Some(size) => GroupSize::Columns(size),
            None => GroupSize::PerChannel,
        };
        let grid = PowerGrid::new(b, scale_groups, levels, None)?
            .with_range(range)
            .for_layer_weighted(&sub, n, kb, imp.as_deref())?;
        grids[b as usize] = Some(grid);
    }
    Ok(grids)
}

/// The grid-for-width function the mixed solvers take: the fitted grid of a width present,
/// any valid grid for one that is not (the solvers ask for one they never use).
fn grid_for(grids: &[Option<PowerGrid>], levels: PowerLevels) -> impl Fn(u8) -> PowerGrid + '_ {
    move |b: u8| {
        grids[b as usize].clone().unwrap_or_else(|| {
            PowerGrid::new(b.clamp(2, 8), GroupSize::PerChannel, levels, Some(1.0))
                .expect("2..=8 bits and exponent 1 are valid")
        })
    }
}

/// The layer in its stored form: codes, f16 scales (exact: the power grid's scales are f16
/// values) and the table of every width present.
fn to_layer(
    n: usize,
    k: usize,
    widths: &[u8],
    group_size: Option<usize>,
    out: &MixedGridOutput<PowerGrid>,
    grids: &[Option<PowerGrid>],
) -> MixedCodebookQuantizedLinear {
    MixedCodebookQuantizedLinear {
        out_features: n,
        in_features: k,
        widths: widths.to_vec(),
        group_size,
        codes: out.codes.clone(),
        scales: out.params.iter().map(|p| f16::from_f32(p.scale)).collect(),
        tables: grids
            .iter()
            .flatten()
            .map(|g| WidthCodebook {
                bits: g.bits,
                exponent: g.exponent(),
                table: g.table().to_vec(),
            })
            .collect(),
    }
}

/// A mixed-codebook layer and GPTQ's per-column losses.
pub struct MixedPowerOutput {
    pub quantized: MixedCodebookQuantizedLinear,
    pub column_loss: Vec<f64>,
}

/// GPTQ with a width per input column (`widths[j]` in `0..=8`, 0 pruned, 1 refused), each
/// width on its own power codebook.
#[allow(clippy::too_many_arguments)]
pub fn gptq_mixed_power(
    weight: &[f32],
    n: usize,
    k: usize,
    hessian: &[f32],
    widths: &[u8],
    group_size: Option<usize>,
    levels: PowerLevels,
    range: RangeFit,
    damp: f64,
    block_size: usize,
) -> Result<MixedPowerOutput> {
    check(weight, n, k, widths)?;
    ensure!(
        hessian.len() == k * k,
        "Hessian has {} values, expected {k}x{k}",
        hessian.len()
    );
    let groups = mixed_groups(widths, group_size);
    let diag = hessian_diagonal(hessian, k);
    let grids = width_grids(
        weight,
        n,
        k,
        &groups,
        group_size,
        levels,
        range,
        Some(&diag),
    )?;
    let out = gptq_mixed_on(
        weight,
        n,
        k,
        hessian,
        widths,
        group_size,
        damp,
        block_size,
        &grid_for(&grids, levels),
    )?;
    Ok(MixedPowerOutput {
        quantized: to_layer(n, k, widths, group_size, &out, &grids),
        column_loss: out.column_loss,
    })
}

/// Round-to-nearest with a width per input column, each width on its own power codebook
/// (exponents and scales weighed by the Hessian's diagonal when the layer has one).
pub fn rtn_mixed_power(
    layer: &LayerToQuantize,
    widths: &[u8],
    group_size: Option<usize>,
    levels: PowerLevels,
    range: RangeFit,
) -> Result<MixedCodebookQuantizedLinear> {
    let (n, k) = (layer.out_features, layer.in_features);
    check(layer.weight, n, k, widths)?;
    let groups = mixed_groups(widths, group_size);
    let importance = layer.hessian.map(|h| hessian_diagonal(h, k));
    let grids = width_grids(
        layer.weight,
        n,
        k,
        &groups,
        group_size,
        levels,
        range,
        importance.as_deref(),
    )?;
    let grid_of = grid_for(&grids, levels);
    let group_grid: Vec<PowerGrid> = groups.group_width.iter().map(|&b| grid_of(b)).collect();
    let params = fit_mixed(
        layer.weight,
        n,
        k,
        &groups,
        &group_grid,
        group_size.is_some(),
        importance.as_deref(),
    );
    let mut codes = vec![0u8; n * k];
    codes.par_chunks_mut(k.max(1)).enumerate().for_each(|(r, row)| {
        for (j, c) in row.iter_mut().enumerate() {
            let g = groups.group_of_column[j];
            if g != u32::MAX {
                let g = g as usize;
                *c = group_grid[g].encode(layer.weight[r * k + j], &params[g * n + r], 0);
            }
        }
    });
    let out = MixedGridOutput {
        codes,
        group_grid,
        params,
        column_loss: vec![],
    };
    Ok(to_layer(n, k, widths, group_size, &out, &grids))
}

fn check(weight: &[f32], n: usize, k: usize, widths: &[u8]) -> Result<()> {
    ensure!(
        weight.len() == n * k && widths.len() == k,
        "weight/widths sizes do not match {n}x{k}"
    );
    ensure!(
        widths.iter().all(|&b| b == 0 || (2..=8).contains(&b)),
        "a power codebook's column widths must be 0 (pruned) or 2..=8"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Rtn, LayerToQuantize};

    /// Heavy-tailed weights (a cube of uniform noise) and a correlated Hessian.
    fn layer(n: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) as f32 - 0.5
        };
        let w: Vec<f32> = (0..n * k).map(|_| 0.3 * next().powi(3)).collect();
        // H = XᵀX / m of random inputs with a shared component (correlated columns)
        let m = 4 * k;
        let x: Vec<f32> = (0..m)
            .flat_map(|_| {
                let common = next();
                (0..k).map(|_| next() + 0.7 * common).collect::<Vec<_>>()
            })
            .collect();
        let mut h = vec![0f32; k * k];
        for r in 0..m {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += x[r * k + i] * x[r * k + j] / m as f32;
                }
            }
        }
        (w, h)
    }

    /// `tr(ΔW H ΔWᵀ)` in f64.
    fn hessian_loss(w: &[f32], q: &[f32], h: &[f32], n: usize, k: usize) -> f64 {
        (0..n)
            .map(|r| {
                let d: Vec<f64> = (0..k).map(|j| (w[r * k + j] - q[r * k + j]) as f64).collect();
                (0..k)
                    .map(|i| (0..k).map(|j| d[i] * h[i * k + j] as f64 * d[j]).sum::<f64>())
                    .sum::<f64>()
            })
            .sum()
    }

    #[test]
    fn one_width_is_the_one_grid_nupes_layer() {
        let (n, k) = (12, 96);
        let (w, h) = layer(n, k, 1);
        for group in [Some(32), None] {
            let layer = LayerToQuantize {
                name: "t",
                weight: &w,
                out_features: n,
                in_features: k,
                hessian: Some(&h),
            };
            let mixed = rtn_mixed_power(
                &layer,
                &vec![3; k],
                group,
                PowerLevels::Extended,
                RangeFit::MinMax,
            )
            .unwrap();
            let gs = group.map_or(GroupSize::PerChannel, GroupSize::Columns);
            let one = Rtn {
                grid: PowerGrid::new(3, gs, PowerLevels::Extended, None).unwrap(),
            }
            .round(&layer)
            .unwrap();
            assert_eq!(mixed.tables.len(), 1);
            assert_eq!(mixed.tables[0].exponent, one.grid.exponent(), "{group:?}");
            assert_eq!(mixed.dequantize(), one.dequantize(), "{group:?}");
        }
    }

    #[test]
    fn every_width_rounds_to_its_own_nearest_level_in_f64() {
        let (n, k) = (8, 120);
        let (w, _) = layer(n, k, 2);
        let widths: Vec<u8> = (0..k).map(|j| [0u8, 2, 3, 4, 6][j % 5]).collect();
        let layer = LayerToQuantize {
            name: "t",
            weight: &w,
            out_features: n,
            in_features: k,
            hessian: None,
        };
        let q = rtn_mixed_power(&layer, &widths, Some(8), PowerLevels::All, RangeFit::MinMax)
            .unwrap();
        let got: Vec<u8> = q.tables.iter().map(|t| t.bits).collect();
        assert_eq!(got, vec![2, 3, 4, 6]);
        // the widths fit different exponents (the narrower, the more the levels bunch up)
        assert!(q.tables.iter().any(|t| t.exponent != q.tables[0].exponent));
        let groups = q.groups();
        let deq = q.dequantize();
        for r in 0..n {
            for j in 0..k {
                let b = widths[j];
                if b == 0 {
                    assert_eq!(deq[r * k + j], 0.0);
                    continue;
                }
                let g = groups.group_of_column[j] as usize;
                let s = q.scales[g * n + r].to_f64();
                let table = &q.table_of(b).unwrap().table;
                let x = w[r * k + j] as f64;
                let best = table
                    .iter()
                    .map(|&t| (x - s * t as f64).abs())
                    .fold(f64::INFINITY, f64::min);
                let mine = (x - s * table[q.codes[r * k + j] as usize] as f64).abs();
                assert!(mine <= best + 1e-6 * s.abs(), "row {r} col {j}: {mine} > {best}");
                // the f32 product of the stored scale and level
                assert_eq!(deq[r * k + j], s as f32 * table[q.codes[r * k + j] as usize]);
            }
        }
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_the_same_codebooks() {
        let (n, k) = (16, 64);
        let (w, h) = layer(n, k, 3);
        let widths: Vec<u8> = (0..k).map(|j| [2u8, 3, 4][j % 3]).collect();
        let layer = LayerToQuantize {
            name: "t",
            weight: &w,
            out_features: n,
            in_features: k,
            hessian: Some(&h),
        };
        for group in [None, Some(16)] {
            let rtn = rtn_mixed_power(&layer, &widths, group, PowerLevels::Extended, RangeFit::MinMax)
                .unwrap();
            let gptq = gptq_mixed_power(
                &w,
                n,
                k,
                &h,
                &widths,
                group,
                PowerLevels::Extended,
                RangeFit::MinMax,
                0.01,
                16,
            )
            .unwrap();
            // the same tables (fitted before the solve), different codes
            assert_eq!(gptq.quantized.tables, rtn.tables);
            let (lr, lg) = (
                hessian_loss(&w, &rtn.dequantize(), &h, n, k),
                hessian_loss(&w, &gptq.quantized.dequantize(), &h, n, k),
            );
            assert!(lg < 0.9 * lr, "{group:?}: GPTQ {lg} vs RTN {lr}");
        }
    }

    #[test]
    fn a_one_bit_width_is_refused() {
        let (n, k) = (2, 8);
        let (w, h) = layer(n, k, 4);
        let e = gptq_mixed_power(
            &w,
            n,
            k,
            &h,
            &[1; 8],
            None,
            PowerLevels::Extended,
            RangeFit::MinMax,
            0.01,
            8,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("0 (pruned) or 2..=8"), "{e}");
    }
}
