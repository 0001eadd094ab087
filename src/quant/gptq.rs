//! GPTQ (methods.md §2): quantize columns one at a time, feeding each column's rounding
//! error forward to the not-yet-quantized columns through the inverse Hessian, with lazy
//! block updates. Generic over the [`Grid`] (one monomorphised solve per grid); the
//! uniform grid (bits, group size, sym/asym) is the GPTQ paper's.
//!
//! Rows (output channels) are independent given `H`, so they are split across threads; the
//! whole solve runs in f64 (the Cholesky factors and the error feedback), which makes the
//! result insensitive to summation order.

use super::allocation::LayerPlan;
use super::grid::{Grid, GroupSize, RangeFit, UniformGrid};
use super::quantized::{fit_mixed, mixed_groups, GridCodes, MixedQuantizedLinear};
use super::recipe::GptqSpec;
use super::refit::refit_scales;
use super::rounding::LayerRounding;
use super::{LayerCodes, LayerQuantizer, LayerResult, LayerToQuantize};
use anyhow::{anyhow, ensure, Result};
use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};
use gemm::Parallelism;
use half::f16;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct GptqOptions<G: Grid = UniformGrid> {
    pub grid: G,
    /// Added to the diagonal as a fraction of its mean (`--damp`, default 0.01).
    pub damp: f64,
    /// Columns per lazy-update block (128).
    pub block_size: usize,
    /// Visit columns by descending Hessian diagonal (`--act-order`).
    pub act_order: bool,
    /// With act-order: fit group parameters up front on the original column order, so
    /// groups stay contiguous (`g_idx = k / G`).
    pub static_groups: bool,
}

impl<G: Grid> GptqOptions<G> {
    pub fn new(grid: G) -> Self {
        Self {
            grid,
            damp: 0.01,
            block_size: 128,
            act_order: false,
            static_groups: false,
        }
    }
}

/// A GPTQ result with its per-column losses (`ℓ_j = Σ_rows (w − q)² / (2 U_jj²)`, original
/// column order), which BAQ's bit allocation consumes.
#[derive(Debug, Clone)]
pub struct GptqOutput<G: Grid = UniformGrid> {
    pub quantized: GridCodes<G>,
    pub column_loss: Vec<f64>,
}

impl<G: Grid> GptqOutput<G> {
    pub fn total_loss(&self) -> f64 {
        self.column_loss.iter().sum()
    }
}

pub struct Gptq<G: Grid = UniformGrid> {
    pub options: GptqOptions<G>,
}

impl<G: Grid> LayerQuantizer for Gptq<G>
where
    GridCodes<G>: Into<LayerCodes>,
{
    fn name(&self) -> &'static str {
        "gptq"
    }

    fn needs_hessian(&self) -> bool {
        true
    }

    fn quantize(&self, layer: &LayerToQuantize) -> Result<LayerResult> {
        let h = layer
            .hessian
            .ok_or_else(|| anyhow!("GPTQ needs the layer's Hessian"))?;
        let out = gptq(
            layer.weight,
            layer.out_features,
            layer.in_features,
            h,
            &self.options,
        )?;
        Ok(LayerResult {
            codes: out.quantized.into(),
            column_loss: Some(out.column_loss),
            trained_loss: None,
        })
    }
}

/// GPTQ as a rounding stage, on a uniform or mixed-width plan.
pub struct GptqRounding {
    pub spec: GptqSpec,
}

impl LayerRounding for GptqRounding {
    fn name(&self) -> &'static str {
        "gptq"
    }

    fn needs_hessian(&self) -> bool {
        true
    }

    fn round(&self, layer: &LayerToQuantize, plan: &LayerPlan) -> Result<LayerResult> {
        let h = layer
            .hessian
            .ok_or_else(|| anyhow!("GPTQ needs the layer's Hessian"))?;
        let (n, k, s) = (layer.out_features, layer.in_features, &self.spec);
        Ok(match plan {
            LayerPlan::Uniform(grid) => {
                let mut out = gptq(layer.weight, n, k, h, &s.options(*grid))?;
                if s.refit {
                    refit_scales(&mut out.quantized, layer.weight, h)?;
                }
                solved(out)
            }
            LayerPlan::Power(grid) => {
                ensure!(
                    !s.refit,
                    "--refit refits uniform scales; the power grid has no refit"
                );
                solved(gptq(layer.weight, n, k, h, &s.options(grid.clone()))?)
            }
            LayerPlan::Ggml(grid) => {
                ensure!(
                    !s.refit,
                    "--refit refits uniform scales; a GGML type's scales are its own"
                );
                ensure!(
                    !s.act_order || s.static_groups,
                    "GPTQ with --act-order on a GGML type needs --static-groups: a block's \
                     columns must stay together"
                );
                solved(gptq(layer.weight, n, k, h, &s.options(*grid))?)
            }
            LayerPlan::Mixed {
                widths,
                group_size,
                sym,
                range,
            } => {
                let out = gptq_mixed_uniform(
                    layer.weight,
                    n,
                    k,
                    h,
                    widths,
                    *group_size,
                    *sym,
                    *range,
                    s.damp,
                    s.block_size,
                )?;
                LayerResult {
                    codes: LayerCodes::Mixed(out.quantized),
                    column_loss: Some(out.column_loss),
                    trained_loss: None,
                }
            }
            LayerPlan::MixedPower {
                widths,
                group_size,
                levels,
                range,
            } => {
                ensure!(
                    !s.refit && !s.act_order,
                    "--refit and --act-order are not supported on BAQ's widths"
                );
                let out = crate::quant::baq::codebook::gptq_mixed_power(
                    layer.weight,
                    n,
                    k,
                    h,
                    widths,
                    *group_size,
                    *levels,
                    *range,
                    s.damp,
                    s.block_size,
                )?;
                LayerResult {
                    codes: LayerCodes::MixedCodebook(out.quantized),
                    column_loss: Some(out.column_loss),
                    trained_loss: None,
                }
            }
        })
    }
}

impl GptqSpec {
    /// GPTQ's options on `grid`.
    fn options<G: Grid>(&self, grid: G) -> GptqOptions<G> {
        GptqOptions {
            grid,
            damp: self.damp,
            block_size: self.block_size,
            act_order: self.act_order,
            static_groups: self.static_groups,
        }
    }
}

/// A layer GPTQ solved on one grid, as a rounding stage's result.
fn solved<G: Grid>(out: GptqOutput<G>) -> LayerResult
where
    LayerCodes: From<GridCodes<G>>,
{
    LayerResult {
        codes: out.quantized.into(),
        column_loss: Some(out.column_loss),
        trained_loss: None,
    }
}

/// Upper-triangular `U` with `(H + damp)⁻¹ = Uᵀ U`, row-major `[k, k]`.
fn inverse_cholesky_upper(h: &[f64], k: usize) -> Result<Vec<f64>> {
    let m = Mat::<f64>::from_fn(k, k, |i, j| h[i * k + j]);
    let not_pd = |_| anyhow!("the damped Hessian is not positive definite; raise --damp");
    let inv = m.llt(Side::Lower).map_err(not_pd)?.inverse();
    let l = inv.llt(Side::Lower).map_err(not_pd)?;
    let l = l.L();
    let mut u = vec![0f64; k * k];
    for i in 0..k {
        for j in i..k {
            u[i * k + j] = l[(j, i)];
        }
    }
    Ok(u)
}

/// Mixed-width mode: every visited position's range group, and every group's width and
/// per-row ranges.
struct MixedGrids<G: Grid> {
    /// `[k]` in visiting order; `u32::MAX` for a pruned column.
    group_by_pos: Vec<u32>,
    /// `[n_groups]`.
    group_grid: Vec<G>,
    /// `[n_groups, n]`.
    params: Vec<G::Params>,
    n: usize,
}

/// GPTQ with its own bit width per input column (`widths[j]` in `0..=8`, 0 = pruned)
/// (BAQ's second pass, methods.md §3.2 step 4, with `L_j = 2^{b_j}` levels), visiting
/// columns in their natural order, on the uniform grid (`sym` or asymmetric, min–max ranges)
/// of each width. See [`gptq_mixed_on`].
#[allow(clippy::too_many_arguments)]
pub fn gptq_mixed(
    weight: &[f32],
    n: usize,
    k: usize,
    hessian: &[f32],
    widths: &[u8],
    group_size: Option<usize>,
    sym: bool,
    damp: f64,
    block_size: usize,
) -> Result<MixedOutput> {
    gptq_mixed_uniform(
        weight,
        n,
        k,
        hessian,
        widths,
        group_size,
        sym,
        RangeFit::MinMax,
        damp,
        block_size,
    )
}

/// [`gptq_mixed`] with each range fitted as `range` says.
#[allow(clippy::too_many_arguments)]
pub fn gptq_mixed_uniform(
    weight: &[f32],
    n: usize,
    k: usize,
    hessian: &[f32],
    widths: &[u8],
    group_size: Option<usize>,
    sym: bool,
    range: RangeFit,
    damp: f64,
    block_size: usize,
) -> Result<MixedOutput> {
    let uniform = |bits: u8| UniformGrid {
        bits,
        group_size: GroupSize::PerChannel,
        sym,
        range,
    };
    let out = gptq_mixed_on(
        weight, n, k, hessian, widths, group_size, damp, block_size, &uniform,
    )?;
    Ok(MixedOutput {
        quantized: MixedQuantizedLinear {
            out_features: n,
            in_features: k,
            sym,
            widths: widths.to_vec(),
            group_size,
            codes: out.codes,
            scales: out.params.iter().map(|p| f16::from_f32(p.scale)).collect(),
            zeros: out.params.iter().map(|p| p.zero).collect(),
        },
        column_loss: out.column_loss,
    })
}

/// A mixed-width solve on any grid: codes, the parameters of every range group of every
/// row (`[n_groups, n]`, groups in [`mixed_groups`] order) and the column losses.
#[derive(Debug, Clone)]
pub struct MixedGridOutput<G: Grid> {
    pub codes: Vec<u8>,
    /// The grid of every range group.
    pub group_grid: Vec<G>,
    pub params: Vec<G::Params>,
    pub column_loss: Vec<f64>,
}

/// GPTQ with a width per input column on the grids `grid_for_width(b)` (their group size is
/// ignored: the range groups are the mixed layout's). Ranges are fixed up front from the
/// original weights: with `group_size` `None` one per row and width, fitted on the whole
/// row (the paper); with `Some(g)` one per row and range group ([`mixed_groups`]: `g`
/// columns of equal width), fitted on the group's own columns.
#[allow(clippy::too_many_arguments)]
pub fn gptq_mixed_on<G: Grid>(
    weight: &[f32],
    n: usize,
    k: usize,
    hessian: &[f32],
    widths: &[u8],
    group_size: Option<usize>,
    damp: f64,
    block_size: usize,
    grid_for_width: &dyn Fn(u8) -> G,
) -> Result<MixedGridOutput<G>> {
    ensure!(
        weight.len() == n * k && hessian.len() == k * k,
        "weight/Hessian sizes do not match {n}x{k}"
    );
    ensure!(
        widths.len() == k,
        "{} column widths for {k} columns",
        widths.len()
    );
    ensure!(
        widths.iter().all(|&b| b <= 8),
        "column widths must be 0..=8"
    );
    ensure!(block_size > 0, "block size must be positive");
    ensure!(group_size != Some(0), "group size must be positive");
    let Prepared {
        w,
        perm,
        u,
        importance,
    } = prepare(weight, n, k, hessian, false, damp)?;
    let groups = mixed_groups(widths, group_size);
    let group_grid: Vec<G> = groups
        .group_width
        .iter()
        .map(|&b| grid_for_width(b))
        .collect();
    // natural order: visiting position = column
    let params = fit_mixed(
        &w,
        n,
        k,
        &groups,
        &group_grid,
        group_size.is_some(),
        Some(&importance),
    );
    let mixed = MixedGrids {
        group_by_pos: perm.iter().map(|&j| groups.group_of_column[j]).collect(),
        group_grid,
        params,
        n,
    };
    // the layer-wide grid is unused in mixed mode; any valid one keeps `solve_rows` simple
    let unused = grid_for_width(8);
    let chunks: Vec<ChunkResult<G::Params>> = (0..n.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .map(|c| {
            let rows = c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(n);
            solve_rows(
                &w,
                k,
                rows,
                &perm,
                &u,
                &importance,
                &unused,
                block_size,
                None,
                1,
                Some(&mixed),
            )
        })
        .collect();
    let mut codes = vec![0u8; n * k];
    let mut column_loss = vec![0f64; k];
    for (c, chunk) in chunks.iter().enumerate() {
        let nr = chunk.codes.len() / k;
        codes[c * ROW_CHUNK * k..(c * ROW_CHUNK + nr) * k].copy_from_slice(&chunk.codes);
        column_loss
            .iter_mut()
            .zip(&chunk.loss)
            .for_each(|(a, b)| *a += b);
    }
    Ok(MixedGridOutput {
        codes,
        group_grid: mixed.group_grid,
        params: mixed.params,
        column_loss,
    })
}

/// A mixed-width result and its per-column losses.
#[derive(Debug, Clone)]
pub struct MixedOutput {
    pub quantized: MixedQuantizedLinear,
    pub column_loss: Vec<f64>,
}

/// What every GPTQ variant starts from.
struct Prepared {
    /// The weights with dead columns zeroed, `[n, k]`.
    w: Vec<f32>,
    /// Visiting order of the columns.
    perm: Vec<usize>,
    /// Upper Cholesky factor of the damped, permuted `H⁻¹`, `[k, k]`.
    u: Vec<f64>,
    /// The Hessian's diagonal in visiting order: how much an error in each column costs,
    /// for grids whose fit weighs errors.
    importance: Vec<f32>,
}

fn prepare(
    weight: &[f32],
    n: usize,
    k: usize,
    hessian: &[f32],
    act_order: bool,
    damp: f64,
) -> Result<Prepared> {
    let mut h: Vec<f64> = hessian.iter().map(|&x| x as f64).collect();
    let mut w: Vec<f32> = weight.to_vec();
    // dead inputs (never active in calibration): any value is free, so quantize zeros
    for j in 0..k {
        if h[j * k + j] == 0.0 {
            h[j * k + j] = 1.0;
            for r in 0..n {
                w[r * k + j] = 0.0;
            }
        }
    }
    let mut perm: Vec<usize> = (0..k).collect();
    if act_order {
        perm.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
    }
    let mean_diag = (0..k).map(|j| h[j * k + j]).sum::<f64>() / k as f64;
    let mut hp = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..k {
            hp[i * k + j] = h[perm[i] * k + perm[j]];
        }
        hp[i * k + i] += damp * mean_diag;
    }
    let u = inverse_cholesky_upper(&hp, k)?;
    let importance = perm.iter().map(|&j| hessian[j * k + j]).collect();
    Ok(Prepared {
        w,
        perm,
        u,
        importance,
    })
}

/// Output rows per parallel task.
const ROW_CHUNK: usize = 32;

/// Quantize `weight` (`[n, k]`) given `hessian` (`[k, k]`, the `2/N Σ x xᵀ` proxy).
pub fn gptq<G: Grid>(
    weight: &[f32],
    n: usize,
    k: usize,
    hessian: &[f32],
    opts: &GptqOptions<G>,
) -> Result<GptqOutput<G>> {
    ensure!(
        weight.len() == n * k,
        "weight has {} values, expected {n}x{k}",
        weight.len()
    );
    ensure!(
        hessian.len() == k * k,
        "Hessian has {} values, expected {k}x{k}",
        hessian.len()
    );
    ensure!(opts.block_size > 0, "block size must be positive");
    // a per-layer parameter (the power grid's exponent) is fitted to the rounding error
    // weighed by the Hessian's diagonal, the part of GPTQ's loss known before the solve
    let diag: Vec<f32> = (0..k).map(|j| hessian[j * k + j]).collect();
    let grid = opts.grid.for_layer_weighted(weight, n, k, Some(&diag))?;
    let Prepared {
        w,
        perm,
        u,
        importance,
    } = prepare(weight, n, k, hessian, opts.act_order, opts.damp)?;
    let group_size = grid.group_size();
    let gsize = group_size.columns(k);
    let grouped = !matches!(group_size, GroupSize::PerChannel);
    let n_groups = group_size.n_groups(k);
    // static groups: parameters of original-order groups from the unmodified weights
    let static_params: Option<Vec<G::Params>> = (opts.static_groups && grouped).then(|| {
        (0..n)
            .flat_map(|r| {
                let row = &w[r * k..(r + 1) * k];
                let grid = &grid;
                (0..n_groups).map(move |g| {
                    let cols = g * gsize..((g + 1) * gsize).min(k);
                    let diag: Vec<f32> = cols.clone().map(|j| hessian[j * k + j]).collect();
                    grid.fit_weighted(&row[cols], Some(&diag))
                })
            })
            .collect()
    });

    // groups are formed along the visiting order; `g_idx` maps original columns to them
    let group_of_pos = |pos: usize| -> usize {
        if static_params.is_some() {
            perm[pos] / gsize
        } else {
            pos / gsize
        }
    };
    let chunks: Vec<ChunkResult<G::Params>> = (0..n.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .map(|c| {
            let rows = c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(n);
            solve_rows(
                &w,
                k,
                rows,
                &perm,
                &u,
                &importance,
                &grid,
                opts.block_size,
                static_params.as_deref(),
                n_groups,
                None,
            )
        })
        .collect();

    let mut codes = vec![0u8; n * k];
    let mut params = vec![G::Params::default(); n_groups * n];
    let mut column_loss = vec![0f64; k];
    for (c, chunk) in chunks.iter().enumerate() {
        let r0 = c * ROW_CHUNK;
        let nr = chunk.codes.len() / k;
        for lr in 0..nr {
            let r = r0 + lr;
            for pos in 0..k {
                codes[r * k + perm[pos]] = chunk.codes[lr * k + pos];
            }
            for g in 0..n_groups {
                params[g * n + r] = chunk.params[lr * n_groups + g];
            }
        }
        for pos in 0..k {
            column_loss[perm[pos]] += chunk.loss[pos];
        }
    }
    let mut g_idx = vec![0u32; k];
    for pos in 0..k {
        g_idx[perm[pos]] = if grouped { group_of_pos(pos) as u32 } else { 0 };
    }
    Ok(GptqOutput {
        quantized: GridCodes {
            grid,
            out_features: n,
            in_features: k,
            codes,
            params,
            g_idx,
        },
        column_loss,
    })
}

struct ChunkResult<P> {
    /// `[rows, k]` in visiting order.
    codes: Vec<u8>,
    /// `[rows, n_groups]`.
    params: Vec<P>,
    /// Per visiting position, summed over this chunk's rows.
    loss: Vec<f64>,
}

/// GPTQ on a set of rows. Works on `wt` = the rows transposed (`[k, rows]`, visiting order),
/// so a column is a contiguous slice and the lazy update is one GEMM.
#[allow(clippy::too_many_arguments)]
fn solve_rows<G: Grid>(
    w: &[f32],
    k: usize,
    rows: std::ops::Range<usize>,
    perm: &[usize],
    u: &[f64],
    importance: &[f32],
    grid: &G,
    block_size: usize,
    static_params: Option<&[G::Params]>,
    n_groups: usize,
    mixed: Option<&MixedGrids<G>>,
) -> ChunkResult<G::Params> {
    let nr = rows.len();
    let group_size = grid.group_size();
    let gsize = group_size.columns(k);
    let grouped = !matches!(group_size, GroupSize::PerChannel);
    let mut wt = vec![0f64; k * nr];
    for (lr, r) in rows.clone().enumerate() {
        for pos in 0..k {
            wt[pos * nr + lr] = w[r * k + perm[pos]] as f64;
        }
    }
    let mut codes = vec![0u8; nr * k];
    // placeholders: every group's parameters are fitted before its first column
    let mut params = vec![G::Params::default(); nr * n_groups];
    let mut loss = vec![0f64; k];
    let mut current = vec![G::Params::default(); nr];
    let mut err = vec![0f64; block_size * nr];
    let mut scratch = vec![0f32; gsize];

    if let Some(sp) = static_params {
        for (lr, r) in rows.clone().enumerate() {
            params[lr * n_groups..(lr + 1) * n_groups]
                .copy_from_slice(&sp[r * n_groups..(r + 1) * n_groups]);
        }
    } else if !grouped && mixed.is_none() {
        // per-channel: one range per row from the (dead-zeroed) weights, as GPTQ does
        for lr in 0..nr {
            for (pos, s) in scratch.iter_mut().enumerate().take(k) {
                *s = wt[pos * nr + lr] as f32;
            }
            let p = grid.fit_weighted(&scratch[..k], Some(importance));
            params[lr * n_groups] = p;
            current[lr] = p;
        }
    }

    let mut i1 = 0;
    while i1 < k {
        let i2 = (i1 + block_size).min(k);
        for pos in i1..i2 {
            let mut col_grid = Some(grid);
            // the column's offset inside its group (see `GridCodes::dequantize`)
            let mut offset = if !grouped {
                perm[pos]
            } else if static_params.is_some() {
                perm[pos] % gsize
            } else {
                pos % gsize
            };
            if let Some(m) = mixed {
                let g = m.group_by_pos[pos];
                col_grid = (g != u32::MAX).then(|| &m.group_grid[g as usize]);
                offset = 0;
                if g != u32::MAX {
                    for (lr, r) in rows.clone().enumerate() {
                        current[lr] = m.params[g as usize * m.n + r];
                    }
                }
            } else if grouped && static_params.is_none() && pos % gsize == 0 {
                // fit on the current, already error-compensated columns of the group
                let end = (pos + gsize).min(k);
                for lr in 0..nr {
                    for (t, s) in scratch.iter_mut().enumerate().take(end - pos) {
                        *s = wt[(pos + t) * nr + lr] as f32;
                    }
                    let p = grid.fit_weighted(&scratch[..end - pos], Some(&importance[pos..end]));
                    params[lr * n_groups + pos / gsize] = p;
                    current[lr] = p;
                }
            }
            if let (Some(sp), None) = (static_params, mixed) {
                let g = perm[pos] / gsize;
                for (lr, r) in rows.clone().enumerate() {
                    current[lr] = sp[r * n_groups + g];
                }
            }
            let d = u[pos * k + pos];
            let column = &wt[pos * nr..(pos + 1) * nr];
            let e = &mut err[(pos - i1) * nr..(pos - i1 + 1) * nr];
            let mut col_loss = 0.0;
            for lr in 0..nr {
                let x = column[lr];
                // a width-0 column (mixed widths) is pruned: code 0, value 0
                let (q, dq) = match col_grid {
                    Some(g) => {
                        let q = g.encode(x as f32, &current[lr], offset);
                        (q, g.decode(q, &current[lr], offset) as f64)
                    }
                    None => (0, 0.0),
                };
                codes[lr * k + pos] = q;
                col_loss += (x - dq) * (x - dq) / (d * d) / 2.0;
                e[lr] = (x - dq) / d;
            }
            loss[pos] = col_loss;
            // feed the error into the remaining columns of this block
            let ev = &err[(pos - i1) * nr..(pos - i1 + 1) * nr];
            for j in pos + 1..i2 {
                let f = u[pos * k + j];
                for (x, &e) in wt[j * nr..(j + 1) * nr].iter_mut().zip(ev) {
                    *x -= e * f;
                }
            }
        }
        // lazy update of all later columns: wt[i2.., :] -= U[i1..i2, i2..]ᵀ · err
        if i2 < k {
            let (m, kk) = (k - i2, i2 - i1);
            // SAFETY: dst `[m, nr]` at wt[i2·nr..], lhs = U[i1..i2, i2..k]ᵀ (row stride 1,
            // column stride k), rhs = err `[kk, nr]`; all in bounds.
            unsafe {
                gemm::gemm(
                    m,
                    nr,
                    kk,
                    wt.as_mut_ptr().add(i2 * nr),
                    1,
                    nr as isize,
                    true,
                    u.as_ptr().add(i1 * k + i2),
                    k as isize,
                    1,
                    err.as_ptr(),
                    1,
                    nr as isize,
                    1.0,
                    -1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
        i1 = i2;
    }
    ChunkResult {
        codes,
        params,
        loss,
    }
}

/// `tr((W − Ŵ) H (W − Ŵ)ᵀ)`: the layer-output error a quantization causes on the
/// calibration inputs (up to the `2/N` scale of `H`).
pub fn output_error(
    weight: &[f32],
    dequantized: &[f32],
    n: usize,
    k: usize,
    hessian: &[f32],
) -> f64 {
    (0..n)
        .into_par_iter()
        .map(|r| {
            let d: Vec<f64> = (0..k)
                .map(|j| (weight[r * k + j] - dequantized[r * k + j]) as f64)
                .collect();
            let mut s = 0.0;
            for i in 0..k {
                if d[i] == 0.0 {
                    continue;
                }
                let hi = &hessian[i * k..(i + 1) * k];
                s += d[i] * d.iter().zip(hi).map(|(a, &b)| a * b as f64).sum::<f64>();
            }
            s
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Rtn;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }
    }

    /// Random positive-definite `H = XᵀX / m` with unequal column scales (and optionally a
    /// dead column), plus a random weight.
    fn problem(seed: u64, n: usize, k: usize, dead: bool) -> (Vec<f32>, Vec<f32>) {
        let mut r = Rng(seed);
        let m = 2 * k + 7;
        let scales: Vec<f64> = (0..k).map(|_| 0.2 + 2.0 * r.next().abs()).collect();
        let x: Vec<f64> = (0..m * k)
            .map(|i| r.next() * scales[i % k] + 0.3 * r.next())
            .collect();
        let mut h = vec![0f32; k * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] = ((0..m).map(|t| x[t * k + i] * x[t * k + j]).sum::<f64>() * 2.0
                    / m as f64) as f32;
            }
        }
        if dead {
            for j in 0..k {
                h[3 * k + j] = 0.0;
                h[j * k + 3] = 0.0;
            }
        }
        let w = (0..n * k).map(|_| (r.next() * 0.05) as f32).collect();
        (w, h)
    }

    /// Plain float64 Cholesky `A = L Lᵀ` (lower, row-major).
    fn cholesky(a: &[f64], k: usize) -> Vec<f64> {
        let mut l = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..=i {
                let s: f64 =
                    a[i * k + j] - (0..j).map(|t| l[i * k + t] * l[j * k + t]).sum::<f64>();
                l[i * k + j] = if i == j { s.sqrt() } else { s / l[j * k + j] };
            }
        }
        l
    }

    #[allow(clippy::needless_range_loop)] // index loops mirror the math
    /// Float64 GPTQ written from methods.md §2.2 with immediate (unblocked) updates and an
    /// independent Cholesky; returns the dequantized weights in original column order.
    fn reference(w: &[f32], n: usize, k: usize, h: &[f32], o: &GptqOptions) -> Vec<f32> {
        reference_with_widths(w, n, k, h, o, None, None)
    }

    /// With `widths`: BAQ's mixed mode, each column on its own width (0 = pruned), with
    /// per-row ranges of the original row (`mixed_group` `None`) or, with `Some(g)`, of the
    /// column's range group: the `g`-column chunks of the equal-width columns in column
    /// order (derived here independently of `mixed_groups`).
    #[allow(clippy::needless_range_loop)]
    fn reference_with_widths(
        w: &[f32],
        n: usize,
        k: usize,
        h: &[f32],
        o: &GptqOptions,
        widths: Option<&[u8]>,
        mixed_group: Option<usize>,
    ) -> Vec<f32> {
        let mut h: Vec<f64> = h.iter().map(|&x| x as f64).collect();
        let mut w: Vec<f64> = w.iter().map(|&x| x as f64).collect();
        for j in 0..k {
            if h[j * k + j] == 0.0 {
                h[j * k + j] = 1.0;
                (0..n).for_each(|r| w[r * k + j] = 0.0);
            }
        }
        let mut perm: Vec<usize> = (0..k).collect();
        if o.act_order {
            perm.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
        }
        let damp = o.damp * (0..k).map(|j| h[j * k + j]).sum::<f64>() / k as f64;
        let mut hp: Vec<f64> = (0..k * k)
            .map(|i| h[perm[i / k] * k + perm[i % k]])
            .collect();
        (0..k).for_each(|i| hp[i * k + i] += damp);
        // H⁻¹ = L⁻ᵀ L⁻¹ from the Cholesky factor, then U = chol(H⁻¹)ᵀ
        let l = cholesky(&hp, k);
        let mut linv = vec![0f64; k * k];
        for c in 0..k {
            for i in c..k {
                let s: f64 = (if i == c { 1.0 } else { 0.0 })
                    - (c..i).map(|t| l[i * k + t] * linv[t * k + c]).sum::<f64>();
                linv[i * k + c] = s / l[i * k + i];
            }
        }
        let hinv: Vec<f64> = (0..k * k)
            .map(|idx| {
                (0..k)
                    .map(|t| linv[t * k + idx / k] * linv[t * k + idx % k])
                    .sum()
            })
            .collect();
        let lu = cholesky(&hinv, k);
        let u = |i: usize, j: usize| lu[j * k + i];
        let g = o.grid.group_size.columns(k);
        let grouped = !matches!(o.grid.group_size, GroupSize::PerChannel);
        let mut out = vec![0f32; n * k];
        for r in 0..n {
            let orig: Vec<f32> = (0..k).map(|j| w[r * k + j] as f32).collect();
            let mut row: Vec<f64> = (0..k).map(|p| w[r * k + perm[p]]).collect();
            let mut p = o.grid.fit(&orig);
            for pos in 0..k {
                if let Some(ws) = widths {
                    let j = perm[pos];
                    let b = ws[j];
                    let g = UniformGrid {
                        bits: b.max(1),
                        group_size: GroupSize::PerChannel,
                        ..o.grid
                    };
                    let range: Vec<f32> = match mixed_group {
                        None => orig.clone(),
                        Some(size) => {
                            let same: Vec<usize> = (0..k).filter(|&c| ws[c] == b).collect();
                            let at = same.iter().position(|&c| c == j).unwrap();
                            same[at / size * size..((at / size + 1) * size).min(same.len())]
                                .iter()
                                .map(|&c| orig[c])
                                .collect()
                        }
                    };
                    let dq = if b == 0 {
                        0.0
                    } else {
                        g.fake_quant(row[pos] as f32, g.fit(&range)) as f64
                    };
                    let e = (row[pos] - dq) / u(pos, pos);
                    for j in pos + 1..k {
                        row[j] -= e * u(pos, j);
                    }
                    out[r * k + perm[pos]] = dq as f32;
                    continue;
                }
                if grouped {
                    if o.static_groups {
                        let gi = perm[pos] / g;
                        p = o.grid.fit(&orig[gi * g..((gi + 1) * g).min(k)]);
                    } else if pos % g == 0 {
                        let cur: Vec<f32> = row[pos..(pos + g).min(k)]
                            .iter()
                            .map(|&x| x as f32)
                            .collect();
                        p = o.grid.fit(&cur);
                    }
                }
                let dq = o.grid.fake_quant(row[pos] as f32, p) as f64;
                let e = (row[pos] - dq) / u(pos, pos);
                for j in pos + 1..k {
                    row[j] -= e * u(pos, j);
                }
                out[r * k + perm[pos]] = dq as f32;
            }
        }
        out
    }

    #[test]
    fn matches_float64_reference_and_beats_rtn() {
        let cases = [
            (
                24,
                64,
                4,
                GroupSize::Columns(32),
                false,
                false,
                false,
                128,
                false,
            ),
            (
                17,
                70,
                3,
                GroupSize::PerChannel,
                true,
                false,
                false,
                16,
                true,
            ),
            (
                40,
                96,
                2,
                GroupSize::Columns(16),
                false,
                true,
                false,
                32,
                false,
            ),
            (
                33,
                96,
                4,
                GroupSize::Columns(32),
                false,
                true,
                true,
                24,
                true,
            ),
            (
                8,
                48,
                8,
                GroupSize::Columns(48),
                true,
                false,
                false,
                128,
                false,
            ),
        ];
        for (i, &(n, k, bits, group, sym, act_order, static_groups, block, dead)) in
            cases.iter().enumerate()
        {
            let (w, h) = problem(i as u64 + 1, n, k, dead);
            let grid = UniformGrid::new(bits, group, sym).unwrap();
            let opts = GptqOptions {
                grid,
                damp: 0.01,
                block_size: block,
                act_order,
                static_groups,
            };
            let got = gptq(&w, n, k, &h, &opts).unwrap();
            let deq = got.quantized.dequantize();
            let want = reference(&w, n, k, &h, &opts);
            let e_got = output_error(&w, &deq, n, k, &h);
            let e_want = output_error(&w, &want, n, k, &h);
            assert!(
                (e_got - e_want).abs() <= 1e-6 * e_want,
                "case {i}: objective {e_got} vs reference {e_want}"
            );
            let same = deq.iter().zip(&want).filter(|(a, b)| a == b).count();
            assert!(
                same as f64 >= 0.999 * (n * k) as f64,
                "case {i}: only {same}/{} codes agree",
                n * k
            );
            let rtn = Rtn { grid }
                .quantize_layer(&LayerToQuantize {
                    name: "t",
                    weight: &w,
                    out_features: n,
                    in_features: k,
                    hessian: None,
                })
                .unwrap()
                .dequantize();
            let e_rtn = output_error(&w, &rtn, n, k, &h);
            assert!(e_got <= e_rtn, "case {i}: GPTQ {e_got} > RTN {e_rtn}");
            // the recorded column losses add up to the GPTQ objective's own accounting
            assert!(got.total_loss() > 0.0 && got.column_loss.len() == k);
        }
    }

    /// GPTQ through the grid seam on NUPES' power grid: every weight lands on the layer's
    /// codebook, and the Hessian objective is at or below round-to-nearest on the same grid.
    #[test]
    fn power_grid_gptq_beats_power_grid_rtn() {
        use crate::quant::{PowerGrid, PowerLevels};
        for (seed, bits, group, levels) in [
            (41u64, 3u8, GroupSize::Columns(32), PowerLevels::All),
            (42, 4, GroupSize::PerChannel, PowerLevels::Symmetric),
            (43, 2, GroupSize::Columns(16), PowerLevels::Extended),
        ] {
            let (n, k) = (24, 96);
            let (w, h) = problem(seed, n, k, false);
            let grid = PowerGrid::new(bits, group, levels, None).unwrap();
            let got = gptq(&w, n, k, &h, &GptqOptions::new(grid.clone())).unwrap();
            let q = &got.quantized;
            let deq = q.dequantize();
            for r in 0..n {
                for j in 0..k {
                    let s = q.params[q.g_idx[j] as usize * n + r].scale;
                    let on_grid = q.grid.table().iter().any(|&t| s * t == deq[r * k + j]);
                    assert!(on_grid, "seed {seed}: w[{r},{j}] is off the codebook");
                }
            }
            let layer = LayerToQuantize {
                name: "t",
                weight: &w,
                out_features: n,
                in_features: k,
                hessian: Some(&h),
            };
            // RTN with the same Hessian-weighted exponent fit
            let rtn = Rtn { grid }.round(&layer).unwrap();
            let e_gptq = output_error(&w, &deq, n, k, &h);
            let e_rtn = output_error(&w, &rtn.dequantize(), n, k, &h);
            assert!(e_gptq <= e_rtn, "seed {seed}: GPTQ {e_gptq} > RTN {e_rtn}");
        }
    }

    #[test]
    fn mixed_widths_match_reference_and_uniform_gptq() {
        let (n, k) = (20, 80);
        let (w, h) = problem(31, n, k, true);
        for sym in [false, true] {
            // every column at the same width is exactly per-channel GPTQ
            for bits in [2u8, 3, 4, 8] {
                let grid = UniformGrid::new(bits, GroupSize::PerChannel, sym).unwrap();
                let uniform = gptq(
                    &w,
                    n,
                    k,
                    &h,
                    &GptqOptions {
                        block_size: 32,
                        ..GptqOptions::new(grid)
                    },
                )
                .unwrap();
                let mixed = gptq_mixed(&w, n, k, &h, &vec![bits; k], None, sym, 0.01, 32).unwrap();
                assert_eq!(
                    mixed.quantized.codes, uniform.quantized.codes,
                    "bits {bits} sym {sym}"
                );
                assert_eq!(mixed.quantized.dequantize(), uniform.quantized.dequantize());
                assert_eq!(mixed.column_loss, uniform.column_loss);
            }
            // a real mix, pruned columns included, against the float64 reference
            let widths: Vec<u8> = (0..k)
                .map(|j| [0u8, 2, 3, 4, 5, 6, 7, 8][(j * 7 + 3) % 8])
                .collect();
            for group in [None, Some(4), Some(7), Some(64)] {
                let got = gptq_mixed(&w, n, k, &h, &widths, group, sym, 0.01, 24).unwrap();
                let deq = got.quantized.dequantize();
                let grid = UniformGrid::new(8, GroupSize::PerChannel, sym).unwrap();
                let want = reference_with_widths(
                    &w,
                    n,
                    k,
                    &h,
                    &GptqOptions::new(grid),
                    Some(&widths),
                    group,
                );
                let (e_got, e_want) = (
                    output_error(&w, &deq, n, k, &h),
                    output_error(&w, &want, n, k, &h),
                );
                assert!(
                    (e_got - e_want).abs() <= 1e-6 * e_want,
                    "group {group:?}: objective {e_got} vs reference {e_want}"
                );
                for j in (0..k).filter(|&j| widths[j] == 0) {
                    assert!((0..n).all(|r| deq[r * k + j] == 0.0), "pruned column {j}");
                }
            }
        }
    }

    #[test]
    fn act_order_g_idx_maps_columns_to_visited_groups() {
        let (n, k) = (8, 64);
        let (w, h) = problem(9, n, k, false);
        let grid = UniformGrid::new(4, GroupSize::Columns(16), false).unwrap();
        let opts = GptqOptions {
            act_order: true,
            ..GptqOptions::new(grid)
        };
        let q = gptq(&w, n, k, &h, &opts).unwrap().quantized;
        let mut counts = [0; 4];
        q.g_idx.iter().for_each(|&g| counts[g as usize] += 1);
        assert_eq!(counts, [16; 4]);
        // the column with the largest Hessian diagonal is visited first → group 0
        let top = (0..k)
            .max_by(|&a, &b| h[a * k + a].total_cmp(&h[b * k + b]))
            .unwrap();
        assert_eq!(q.g_idx[top], 0);
        assert!(
            q.g_idx.windows(2).any(|p| p[0] > p[1]),
            "act-order should scramble groups"
        );
    }
}
