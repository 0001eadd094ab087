//! A quantized linear layer in its format-independent form: integer codes plus per-group
//! grid parameters. [`GridCodes`] is what a rounding method produces on any grid;
//! [`QuantizedLinear`] (uniform grid: f16 scales, integer zeros),
//! [`MixedQuantizedLinear`] (a uniform width per column) and [`CodebookQuantizedLinear`]
//! (NUPES' power grid: a table per layer) are what the packers read.

use super::grid::ggml::dequantize_row;
use super::grid::{GgmlGrid, GgmlType, Grid, GroupParams, GroupSize, PowerGrid, UniformGrid};
use half::f16;
use rayon::prelude::*;

/// One layer's codes on grid `G`, with the parameters of every group of every row.
#[derive(Debug, Clone)]
pub struct GridCodes<G: Grid> {
    /// The grid the layer was solved on (after [`Grid::for_layer`]).
    pub grid: G,
    pub out_features: usize,
    pub in_features: usize,
    /// `[out_features, in_features]`, row-major.
    pub codes: Vec<u8>,
    /// `[n_groups, out_features]`.
    pub params: Vec<G::Params>,
    /// Group of every input column (`[in_features]`); `k / group_size` unless act-order.
    pub g_idx: Vec<u32>,
}

impl<G: Grid> GridCodes<G> {
    pub fn n_groups(&self) -> usize {
        self.params.len() / self.out_features.max(1)
    }

    /// Each column's offset inside its group (columns of a group in their original order),
    /// the `col` argument of [`Grid::decode`].
    fn offsets_in_group(&self) -> Vec<usize> {
        let mut seen = vec![0usize; self.n_groups()];
        self.g_idx
            .iter()
            .map(|&g| {
                let o = seen[g as usize];
                seen[g as usize] += 1;
                o
            })
            .collect()
    }

    /// The f32 weights `[out, in]` the codes stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let (n, k) = (self.out_features, self.in_features);
        let offsets = self.offsets_in_group();
        let mut out = vec![0f32; n * k];
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let codes = &self.codes[r * k..(r + 1) * k];
                for (j, w) in row.iter_mut().enumerate() {
                    let p = &self.params[self.g_idx[j] as usize * n + r];
                    *w = self.grid.decode(codes[j], p, offsets[j]);
                }
            });
        out
    }
}

impl From<GridCodes<UniformGrid>> for QuantizedLinear {
    fn from(c: GridCodes<UniformGrid>) -> Self {
        Self {
            out_features: c.out_features,
            in_features: c.in_features,
            grid: c.grid,
            codes: c.codes,
            scales: c.params.iter().map(|p| f16::from_f32(p.scale)).collect(),
            zeros: c.params.iter().map(|p| p.zero).collect(),
            g_idx: c.g_idx,
        }
    }
}

/// A layer in GGML blocks: `[out_features]` rows of `in_features / block` blocks of `ty`,
/// exactly the bytes of its GGUF tensor (in the checkpoint's row order).
#[derive(Debug, Clone, PartialEq)]
pub struct GgmlQuantizedLinear {
    pub ty: GgmlType,
    pub out_features: usize,
    pub in_features: usize,
    pub data: Vec<u8>,
}

impl GgmlQuantizedLinear {
    /// The f32 weights `[out, in]` the blocks stand for (the consumer's arithmetic).
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_row(self.ty, &self.data).expect("whole blocks by construction")
    }
}

impl From<GridCodes<GgmlGrid>> for GgmlQuantizedLinear {
    fn from(c: GridCodes<GgmlGrid>) -> Self {
        Self {
            ty: c.grid.ty,
            out_features: c.out_features,
            in_features: c.in_features,
            data: c
                .grid
                .pack_rows(&c.codes, &c.params, c.out_features, c.in_features),
        }
    }
}

/// A layer on a per-layer codebook: `w = scale[group, row] · table[code]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CodebookQuantizedLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u8,
    pub group_size: GroupSize,
    /// The power grid's exponent `a` the table was built with.
    pub exponent: f32,
    /// Unit value of every code (`2^bits`).
    pub table: Vec<f32>,
    /// `[out_features, in_features]`, row-major.
    pub codes: Vec<u8>,
    /// `[n_groups, out_features]`.
    pub scales: Vec<f16>,
    /// Group of every input column (`[in_features]`).
    pub g_idx: Vec<u32>,
}

impl From<GridCodes<PowerGrid>> for CodebookQuantizedLinear {
    fn from(c: GridCodes<PowerGrid>) -> Self {
        Self {
            out_features: c.out_features,
            in_features: c.in_features,
            bits: c.grid.bits,
            group_size: c.grid.group_size,
            exponent: c.grid.exponent(),
            table: c.grid.table().to_vec(),
            codes: c.codes,
            // the grid's scales are f16 values already: exact
            scales: c.params.iter().map(|p| f16::from_f32(p.scale)).collect(),
            g_idx: c.g_idx,
        }
    }
}

impl CodebookQuantizedLinear {
    pub fn n_groups(&self) -> usize {
        self.scales.len() / self.out_features.max(1)
    }

    /// The f32 weights `[out, in]` the codes stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let (n, k) = (self.out_features, self.in_features);
        let mut out = vec![0f32; n * k];
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let codes = &self.codes[r * k..(r + 1) * k];
                for (j, w) in row.iter_mut().enumerate() {
                    let s = self.scales[self.g_idx[j] as usize * n + r].to_f32();
                    *w = s * self.table[codes[j] as usize];
                }
            });
        out
    }
}

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

/// A linear with its own bit width per input column (0 = pruned). Columns are arranged
/// into runs of equal width (see [`mixed_groups`]) and every run into range groups; each
/// group has one scale/zero per output row.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedQuantizedLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub sym: bool,
    /// `[in_features]`.
    pub widths: Vec<u8>,
    /// Columns per range group inside a run; `None`: one group per run (a range per row
    /// and width, fitted on the whole row as the BAQ paper does).
    pub group_size: Option<usize>,
    /// `[out_features, in_features]`.
    pub codes: Vec<u8>,
    /// `[n_groups, out_features]`, groups in [`mixed_groups`] order.
    pub scales: Vec<f16>,
    /// `[n_groups, out_features]`.
    pub zeros: Vec<u8>,
}

/// How a mixed-width layer's columns are stored: sorted by (width, column), so pruned
/// columns come first and every width present forms one contiguous run; each run is cut
/// into range groups of `group_size` stored columns (one group per run without a size).
#[derive(Debug, Clone, PartialEq)]
pub struct MixedGroups {
    /// Original column at every stored position.
    pub order: Vec<usize>,
    /// Group of every original column (`u32::MAX` for pruned columns).
    pub group_of_column: Vec<u32>,
    /// Width of every group.
    pub group_width: Vec<u8>,
    /// Stored positions of every group's columns: `group_start[g]..group_start[g + 1]`.
    pub group_start: Vec<usize>,
}

impl MixedGroups {
    pub fn n_groups(&self) -> usize {
        self.group_width.len()
    }

    /// Original columns of group `g`, in stored order.
    pub fn columns(&self, g: usize) -> &[usize] {
        &self.order[self.group_start[g]..self.group_start[g + 1]]
    }

    /// Every width's run, ascending: its width and its range groups (consecutive).
    pub fn runs(&self) -> Vec<(u8, std::ops::Range<usize>)> {
        let mut runs = vec![];
        let mut g = 0;
        while g < self.n_groups() {
            let (b, first) = (self.group_width[g], g);
            while g < self.n_groups() && self.group_width[g] == b {
                g += 1;
            }
            runs.push((b, first..g));
        }
        runs
    }

    /// Original columns of the range groups `groups` (a run), in stored order.
    pub fn run_columns(&self, groups: &std::ops::Range<usize>) -> &[usize] {
        &self.order[self.group_start[groups.start]..self.group_start[groups.end]]
    }
}

pub fn mixed_groups(widths: &[u8], group_size: Option<usize>) -> MixedGroups {
    let k = widths.len();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by_key(|&j| (widths[j], j));
    let mut group_of_column = vec![u32::MAX; k];
    let (mut group_width, mut group_start) = (vec![], vec![]);
    let mut pos = widths.iter().filter(|&&b| b == 0).count();
    while pos < k {
        let b = widths[order[pos]];
        let run_end = pos + order[pos..].iter().take_while(|&&j| widths[j] == b).count();
        let g = group_size.unwrap_or(run_end - pos).max(1);
        let mut start = pos;
        while start < run_end {
            let end = (start + g).min(run_end);
            let id = group_width.len() as u32;
            order[start..end]
                .iter()
                .for_each(|&j| group_of_column[j] = id);
            group_width.push(b);
            group_start.push(start);
            start = end;
        }
        pos = run_end;
    }
    group_start.push(k);
    MixedGroups {
        order,
        group_of_column,
        group_width,
        group_start,
    }
}

/// The parameters of every range group of every row (`[n_groups, n]`) of a mixed-width
/// layer `weight` (`[n, k]`): fitted on the group's own columns (`per_group`), or on the
/// whole row (one range per row and width, the BAQ paper); `importance` weighs each
/// column's error for grids that search their range. A searched fit always sees only the
/// columns its width rounds: on the whole row it would weigh errors the other widths'
/// columns never make (and cost one whole-row search per width).
pub fn fit_mixed<G: Grid>(
    weight: &[f32],
    n: usize,
    k: usize,
    groups: &MixedGroups,
    group_grid: &[G],
    per_group: bool,
    importance: Option<&[f32]>,
) -> Vec<G::Params> {
    (0..groups.n_groups())
        .into_par_iter()
        .flat_map_iter(|g| {
            let (grid, cols) = (&group_grid[g], groups.columns(g));
            let imp: Option<Vec<f32>> = importance.map(|h| cols.iter().map(|&j| h[j]).collect());
            (0..n).map(move |r| {
                let row = &weight[r * k..(r + 1) * k];
                if per_group || grid.searches_fit() {
                    let vals: Vec<f32> = cols.iter().map(|&j| row[j]).collect();
                    grid.fit_weighted(&vals, imp.as_deref())
                } else {
                    grid.fit_weighted(row, importance)
                }
            })
        })
        .collect()
}

impl MixedQuantizedLinear {
    pub fn groups(&self) -> MixedGroups {
        mixed_groups(&self.widths, self.group_size)
    }

    /// The f32 weights `[out, in]` the codes stand for (pruned columns are 0).
    pub fn dequantize(&self) -> Vec<f32> {
        let k = self.in_features;
        let n = self.out_features;
        let groups = self.groups();
        let mut out = vec![0f32; n * k];
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                for (j, w) in row.iter_mut().enumerate() {
                    let g = groups.group_of_column[j];
                    if g != u32::MAX {
                        let i = g as usize * n + r;
                        let p = GroupParams {
                            scale: self.scales[i].to_f32(),
                            zero: self.zeros[i],
                        };
                        *w = UniformGrid::decode(self.codes[r * k + j], p);
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

/// One width's codebook in a [`MixedCodebookQuantizedLinear`]: NUPES' power table of that
/// width, its exponent fitted on the columns the width rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct WidthCodebook {
    pub bits: u8,
    /// The power grid's exponent `a` the table was built with.
    pub exponent: f32,
    /// Unit value of every code (`2^bits`).
    pub table: Vec<f32>,
}

/// BAQ's widths on power codebooks: a width per input column (0 = pruned), the columns
/// arranged into runs and range groups as in [`MixedQuantizedLinear`], each range group
/// with one scale per output row and each width with its own table:
/// `w = scale[group, row] · table_of(width)[code]`.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedCodebookQuantizedLinear {
    pub out_features: usize,
    pub in_features: usize,
    /// `[in_features]`.
    pub widths: Vec<u8>,
    /// Columns per range group inside a run; `None`: one group per run.
    pub group_size: Option<usize>,
    /// `[out_features, in_features]`.
    pub codes: Vec<u8>,
    /// `[n_groups, out_features]`, groups in [`mixed_groups`] order.
    pub scales: Vec<f16>,
    /// One per width present, ascending.
    pub tables: Vec<WidthCodebook>,
}

impl MixedCodebookQuantizedLinear {
    pub fn groups(&self) -> MixedGroups {
        mixed_groups(&self.widths, self.group_size)
    }

    /// The codebook of width `bits`, if a column has that width.
    pub fn table_of(&self, bits: u8) -> Option<&WidthCodebook> {
        self.tables.iter().find(|t| t.bits == bits)
    }

    /// The f32 weights `[out, in]` the codes stand for (pruned columns are 0).
    pub fn dequantize(&self) -> Vec<f32> {
        let (n, k) = (self.out_features, self.in_features);
        let groups = self.groups();
        // the table of every column (empty for pruned ones)
        let empty: &[f32] = &[];
        let column_table: Vec<&[f32]> = self
            .widths
            .iter()
            .map(|&b| self.table_of(b).map_or(empty, |t| t.table.as_slice()))
            .collect();
        let mut out = vec![0f32; n * k];
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                for (j, w) in row.iter_mut().enumerate() {
                    let g = groups.group_of_column[j];
                    if g != u32::MAX {
                        let s = self.scales[g as usize * n + r].to_f32();
                        *w = s * column_table[j][self.codes[r * k + j] as usize];
                    }
                }
            });
        out
    }

    /// Average code width over all weights.
    pub fn mean_width(&self) -> f64 {
        self.widths.iter().map(|&b| b as f64).sum::<f64>() / self.in_features.max(1) as f64
    }
}

/// Fake quantization in memory: replace each named linear's weights of `model` by the
/// values its codes stand for (exactly what a packed model holds after loading).
pub fn apply_quantized(
    model: &mut crate::model::CausalLm,
    layers: &[(crate::model::LinearSpec, QuantizedLinear)],
) -> anyhow::Result<()> {
    for (spec, q) in layers {
        model.set_linear_weights(&spec.name, q.dequantize())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::grid::RangeFit;

    #[test]
    fn per_row_searched_fits_see_only_their_widths_columns() {
        let (n, k) = (3usize, 40usize);
        // width 2 on even columns, 4 on odd ones; the row's extremes sit in the 4-bit ones
        let widths: Vec<u8> = (0..k).map(|j| if j % 2 == 0 { 2 } else { 4 }).collect();
        let weight: Vec<f32> = (0..n * k)
            .map(|i| {
                let j = i % k;
                let v = ((i * 37 % 23) as f32 - 11.0) * 0.01;
                if j % 2 == 1 && j % 9 == 1 {
                    v * 20.0
                } else {
                    v
                }
            })
            .collect();
        let importance: Vec<f32> = (0..k).map(|j| 1.0 + (j % 5) as f32).collect();
        let groups = mixed_groups(&widths, None);
        for range in [RangeFit::MinMax, RangeFit::shrink_search()] {
            let grids: Vec<UniformGrid> = groups
                .group_width
                .iter()
                .map(|&b| {
                    UniformGrid::new(b, GroupSize::PerChannel, false)
                        .unwrap()
                        .with_range(range)
                })
                .collect();
            let params = fit_mixed(&weight, n, k, &groups, &grids, false, Some(&importance));
            for g in 0..groups.n_groups() {
                let cols = groups.columns(g);
                for r in 0..n {
                    let row = &weight[r * k..(r + 1) * k];
                    let want = if range.is_min_max() {
                        // the paper: the whole row's range
                        grids[g].fit(row)
                    } else {
                        let vals: Vec<f32> = cols.iter().map(|&j| row[j]).collect();
                        let imp: Vec<f32> = cols.iter().map(|&j| importance[j]).collect();
                        grids[g].fit_weighted(&vals, Some(&imp))
                    };
                    assert_eq!(params[g * n + r], want, "{range:?} group {g} row {r}");
                }
            }
        }
    }
}
