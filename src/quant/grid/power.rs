//! NUPES' power grid (methods.md §5.1): a codebook of `2^bits` unit levels
//! `±(k/Q)^{1/a}` shared by every row of a layer, scaled per group by `M = max|w|`. The
//! exponent `a ∈ [0.2, 1]` is one per layer, fitted in [`Grid::for_layer_weighted`] by
//! minimising the (importance-weighted) round-to-nearest error; `a = 1` is symmetric
//! uniform, `a < 1` puts more levels near zero, where bell-shaped weights are dense.
//!
//! A code is an index into the layer's table (sorted ascending), so a packed layer is
//! codes + f16 scales + one table of `2^bits` f32 values: a codebook format, dequantized by
//! lookup.

use super::range::RangeFit;
use super::uniform::to_f16_exact;
use super::{Grid, GridSpec, GroupSize};
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Exponents the search may choose from.
pub const EXPONENT_RANGE: (f32, f32) = (0.2, 1.0);

/// Which of the `2^bits` codes carry a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerLevels {
    /// methods.md §5.1: `±(k/Q)^{1/a}`, `k = 0..Q`, `Q = 2^(bits−1) − 1`: zero is a level,
    /// `2^bits − 1` codes are used and the last one is spare.
    Symmetric,
    /// All `2^bits` codes: `±((k+½)/(Q+½))^{1/a}`, `k = 0..=Q`, no level at zero.
    All,
    /// All `2^bits` codes with zero a level: `sign(k)·(|k|/(Q+½))^{1/a}`,
    /// `k = −(Q+1)..=Q`. At `a = 1` this is exactly the symmetric uniform grid (step
    /// `2M/(2^bits − 1)`, the extra level on the negative side), so the searched exponent
    /// can only lower the error of symmetric round-to-nearest.
    #[default]
    Extended,
}

/// The power grid of one layer (after [`Grid::for_layer_weighted`]) or as a recipe names
/// it (before, exponent 1 unless fixed).
#[derive(Debug, Clone, PartialEq)]
pub struct PowerGrid {
    pub bits: u8,
    pub group_size: GroupSize,
    pub levels: PowerLevels,
    /// A fixed exponent, or `None` to search one per layer.
    pub fixed_exponent: Option<f32>,
    /// How each group's scale is fitted: its largest magnitude, or searched
    /// ([`Self::fit_scale`]).
    pub range: RangeFit,
    /// The exponent the table was built with.
    exponent: f32,
    /// Unit levels by code (`2^bits`, ascending over the used codes; a spare code is 0).
    table: Arc<[f32]>,
    /// Midpoints between consecutive used levels: a value's code is how many lie below it.
    thresholds: Arc<[f32]>,
}

/// One group's scale `M` (an f16 value held as f32: what the file stores).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PowerParams {
    pub scale: f32,
}

impl PowerGrid {
    pub fn new(
        bits: u8,
        group_size: GroupSize,
        levels: PowerLevels,
        fixed_exponent: Option<f32>,
    ) -> Result<Self> {
        ensure!(
            (2..=8).contains(&bits),
            "unsupported bit width {bits} for the power grid; supported: 2 to 8"
        );
        if let GroupSize::Columns(0) = group_size {
            bail!("group size must be positive (or -1 for per-channel)");
        }
        if let Some(a) = fixed_exponent {
            let (lo, hi) = EXPONENT_RANGE;
            ensure!(
                a.is_finite() && (lo..=hi).contains(&a),
                "power-grid exponent {a} is outside [{lo}, {hi}]"
            );
        }
        Ok(Self::with_exponent(
            bits,
            group_size,
            levels,
            fixed_exponent,
            fixed_exponent.unwrap_or(1.0),
        ))
    }

    fn with_exponent(
        bits: u8,
        group_size: GroupSize,
        levels: PowerLevels,
        fixed_exponent: Option<f32>,
        exponent: f32,
    ) -> Self {
        let table = unit_levels(bits, levels, exponent as f64);
        let used = used_codes(bits, levels);
        let thresholds: Vec<f32> = table[..used]
            .windows(2)
            .map(|p| ((p[0] as f64 + p[1] as f64) / 2.0) as f32)
            .collect();
        Self {
            bits,
            group_size,
            levels,
            fixed_exponent,
            range: RangeFit::MinMax,
            exponent,
            table: table.into(),
            thresholds: thresholds.into(),
        }
    }

    /// This grid with its table built for exponent `a`.
    pub fn at_exponent(&self, a: f32) -> Self {
        Self {
            range: self.range,
            ..Self::with_exponent(
                self.bits,
                self.group_size,
                self.levels,
                self.fixed_exponent,
                a,
            )
        }
    }

    /// This grid with its group scales fitted as `range` says (min–max: the largest
    /// magnitude; a search: see [`Self::fit_scale`]; full range is a uniform-grid fit).
    pub fn with_range(self, range: RangeFit) -> Self {
        Self { range, ..self }
    }

    /// The unit level of `code`.
    #[inline]
    pub(super) fn level(&self, code: u8) -> f32 {
        self.table[code as usize]
    }

    /// The code nearest `w` on a group with params `p`.
    #[inline]
    pub(super) fn code_of(&self, w: f32, p: PowerParams) -> u8 {
        self.nearest(w / p.scale)
    }

    /// The exponent the table is built with.
    pub fn exponent(&self) -> f32 {
        self.exponent
    }

    /// Unit level of every code (`2^bits` values; what the file stores).
    pub fn table(&self) -> &[f32] {
        &self.table
    }

    #[inline]
    fn nearest(&self, u: f32) -> u8 {
        self.thresholds.partition_point(|&t| t < u) as u8
    }

    /// Squared error of rounding every group of `weight` (`[n, k]`) to nearest at exponent
    /// `a`, each column weighed by `importance` when given; `scales` are the groups' `M`
    /// (`[n, n_groups]`).
    fn layer_error(
        &self,
        weight: &[f32],
        k: usize,
        scales: &[f32],
        importance: Option<&[f32]>,
    ) -> f64 {
        let g = self.group_size.columns(k);
        let ng = self.group_size.n_groups(k);
        weight
            .par_chunks(k)
            .enumerate()
            .map(|(r, row)| {
                let mut e = 0f64;
                for (j, &w) in row.iter().enumerate() {
                    let m = scales[r * ng + j / g];
                    let d = (w - m * self.table[self.nearest(w / m) as usize]) as f64;
                    e += d * d * importance.map_or(1.0, |h| h[j] as f64);
                }
                e
            })
            .sum()
    }
}

/// Codes that carry a level.
fn used_codes(bits: u8, levels: PowerLevels) -> usize {
    match levels {
        PowerLevels::Symmetric => (1usize << bits) - 1,
        PowerLevels::All | PowerLevels::Extended => 1usize << bits,
    }
}

/// The unit levels by code, computed in f64 and stored in f32.
fn unit_levels(bits: u8, levels: PowerLevels, a: f64) -> Vec<f32> {
    let half = 1usize << (bits - 1);
    let mut table = vec![0f32; 1 << bits];
    match levels {
        PowerLevels::Symmetric => {
            let q = (half - 1) as f64;
            for (c, t) in table.iter_mut().take(2 * half - 1).enumerate() {
                let k = c as f64 - q;
                *t = (k.signum() * (k.abs() / q).powf(1.0 / a)) as f32;
            }
        }
        PowerLevels::All => {
            let q = (half - 1) as f64;
            for i in 0..half {
                let l = ((i as f64 + 0.5) / (q + 0.5)).powf(1.0 / a) as f32;
                table[half + i] = l;
                table[half - 1 - i] = -l;
            }
        }
        PowerLevels::Extended => {
            let q = (half - 1) as f64;
            for (c, t) in table.iter_mut().enumerate() {
                let k = c as f64 - half as f64;
                *t = (k.signum() * (k.abs() / (q + 0.5)).powf(1.0 / a)) as f32;
            }
        }
    }
    table
}

/// A group's `M`: its largest magnitude rounded up to f16 (1 for an all-zero group).
fn group_scale(values: &[f32]) -> f32 {
    let m = values.iter().fold(0f32, |a, &w| a.max(w.abs()));
    if m == 0.0 {
        1.0
    } else {
        to_f16_exact(m)
    }
}

impl Grid for PowerGrid {
    type Params = PowerParams;

    fn group_size(&self) -> GroupSize {
        self.group_size
    }

    fn for_layer(&self, weight: &[f32], n: usize, k: usize) -> Result<Self> {
        self.for_layer_weighted(weight, n, k, None)
    }

    /// The exponent minimising the layer's round-to-nearest error `Σ h_j (w − ŵ_a)²`: a
    /// scan of `[0.2, 1]` in steps of 0.025 finds the basin (the error is only locally
    /// convex in `a`), golden-section search refines it to ~1e-4.
    fn for_layer_weighted(
        &self,
        weight: &[f32],
        n: usize,
        k: usize,
        importance: Option<&[f32]>,
    ) -> Result<Self> {
        ensure!(
            weight.len() == n * k,
            "weight has {} values, expected {n}x{k}",
            weight.len()
        );
        if let Some(a) = self.fixed_exponent {
            return Ok(self.at_exponent(a));
        }
        let g = self.group_size.columns(k);
        let scales: Vec<f32> = weight
            .chunks(k.max(1))
            .flat_map(|row| row.chunks(g).map(group_scale))
            .collect();
        let err = |a: f32| {
            self.at_exponent(a)
                .layer_error(weight, k, &scales, importance)
        };
        let a = minimise(err);
        if self.range.is_min_max() {
            return Ok(self.at_exponent(a));
        }
        // searched scales shrink the groups' ranges, and the exponent that suits the shrunk
        // ranges is not the one fitted on the maxima: fit the scales at `a`, then the
        // exponent on those scales (one alternation; the scales are fitted again on the
        // final table where the layer is rounded). BAQ's power codebooks at 3.206 bits on
        // the fixture: 35.53 → 34.59 perplexity.
        let at = self.at_exponent(a);
        let searched: Vec<f32> = weight
            .par_chunks(k.max(1))
            .flat_map_iter(|row| {
                let at = &at;
                row.chunks(g).enumerate().map(move |(gi, vals)| {
                    let imp = importance.map(|h| &h[gi * g..gi * g + vals.len()]);
                    at.fit_weighted(vals, imp).scale
                })
            })
            .collect();
        let refitted = |a: f32| {
            self.at_exponent(a)
                .layer_error(weight, k, &searched, importance)
        };
        Ok(self.at_exponent(minimise(refitted)))
    }

    #[inline]
    fn fit(&self, values: &[f32]) -> PowerParams {
        self.fit_weighted(values, None)
    }

    fn searches_fit(&self) -> bool {
        !self.range.is_min_max()
    }

    fn fit_weighted(&self, values: &[f32], importance: Option<&[f32]>) -> PowerParams {
        self.fit_scale(values, importance, group_scale(values), self.range)
    }

    #[inline]
    fn encode(&self, w: f32, p: &PowerParams, _col: usize) -> u8 {
        self.nearest(w / p.scale)
    }

    #[inline]
    fn decode(&self, code: u8, p: &PowerParams, _col: usize) -> f32 {
        p.scale * self.table[code as usize]
    }

    fn spec(&self) -> GridSpec {
        GridSpec::Power {
            bits: self.bits,
            group_size: self.group_size,
            levels: self.levels,
            exponent: self.fixed_exponent,
            range: self.range,
        }
    }
}

/// The minimiser of `f` on [`EXPONENT_RANGE`]: the best point of a 0.025 scan, refined by
/// golden-section search between its neighbours.
fn minimise(f: impl Fn(f32) -> f64) -> f32 {
    let (lo, hi) = EXPONENT_RANGE;
    let steps = 32;
    let step = (hi - lo) / steps as f32;
    let scan: Vec<(f32, f64)> = (0..=steps)
        .map(|i| {
            let a = lo + step * i as f32;
            (a, f(a))
        })
        .collect();
    let (best, _) = scan
        .iter()
        .copied()
        .fold((lo, f64::INFINITY), |b, x| if x.1 < b.1 { x } else { b });
    let (mut a, mut b) = ((best - step).max(lo), (best + step).min(hi));
    let r = (5f32.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - r * (b - a), a + r * (b - a));
    let (mut fc, mut fd) = (f(c), f(d));
    while b - a > 1e-4 {
        if fc < fd {
            (b, d, fd) = (d, c, fc);
            c = b - r * (b - a);
            fc = f(c);
        } else {
            (a, c, fc) = (c, d, fd);
            d = a + r * (b - a);
            fd = f(d);
        }
    }
    // the refined point, unless the scan's best is better (a flat or noisy basin)
    let refined = (a + b) / 2.0;
    if f(refined) <= f(best) {
        refined
    } else {
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heavy-tailed pseudo-random values: Student-t with 3 degrees of freedom, scaled.
    fn heavy_tailed(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut uniform = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let mut normal = move || {
            let (u, v) = (uniform(), uniform());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        };
        (0..n)
            .map(|_| {
                let z = normal();
                let chi2: f64 = (0..3).map(|_| normal().powi(2)).sum();
                (0.02 * z / (chi2 / 3.0).sqrt()) as f32
            })
            .collect()
    }

    /// float64 reference of the table: methods.md §5.1 written out directly.
    fn reference_level(bits: u8, levels: PowerLevels, a: f64, code: usize) -> Option<f64> {
        let q = ((1usize << (bits - 1)) - 1) as f64;
        match levels {
            PowerLevels::Symmetric => {
                let k = code as f64 - q;
                (k.abs() <= q).then(|| k.signum() * (k.abs() / q).powf(1.0 / a))
            }
            PowerLevels::All => {
                let half = q + 1.0;
                let (s, i) = if code as f64 >= half {
                    (1.0, code as f64 - half)
                } else {
                    (-1.0, half - 1.0 - code as f64)
                };
                Some(s * ((i + 0.5) / (q + 0.5)).powf(1.0 / a))
            }
            PowerLevels::Extended => {
                let k = code as f64 - (q + 1.0);
                Some(k.signum() * (k.abs() / (q + 0.5)).powf(1.0 / a))
            }
        }
    }

    #[test]
    fn encode_decode_match_f64_reference() {
        for bits in 2..=8u8 {
            for levels in [
                PowerLevels::Symmetric,
                PowerLevels::All,
                PowerLevels::Extended,
            ] {
                for a in [0.3f32, 0.55, 0.8, 1.0] {
                    let grid = PowerGrid::new(bits, GroupSize::Columns(64), levels, Some(a))
                        .unwrap()
                        .for_layer(&[0.0; 64], 1, 64)
                        .unwrap();
                    assert_eq!(grid.exponent(), a);
                    for (c, &t) in grid.table().iter().enumerate() {
                        let want = reference_level(bits, levels, a as f64, c).unwrap_or(0.0);
                        assert!((t as f64 - want).abs() <= 1e-6, "level {c}: {t} vs {want}");
                    }
                    let used = used_codes(bits, levels);
                    for seed in 0..8 {
                        let w = heavy_tailed(seed + 100 * bits as u64, 64);
                        let p = grid.fit(&w);
                        let m = w.iter().fold(0f64, |x, &y| x.max(y.abs() as f64));
                        assert!(p.scale as f64 >= m && (p.scale as f64 - m) / m < 1e-3);
                        for &x in &w {
                            let code = grid.encode(x, &p, 0) as usize;
                            assert!(code < used, "code {code} is not a level");
                            let err = |c: usize| {
                                (x as f64 - p.scale as f64 * grid.table()[c] as f64).abs()
                            };
                            let best = (0..used).map(err).fold(f64::INFINITY, f64::min);
                            assert!(
                                err(code) <= best + 1e-6 * p.scale as f64,
                                "{x}: code {code} error {} vs nearest {best}",
                                err(code)
                            );
                            let d = grid.decode(code as u8, &p, 0);
                            assert_eq!(d, p.scale * grid.table()[code]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn symmetric_exponent_one_is_symmetric_uniform() {
        let grid =
            PowerGrid::new(4, GroupSize::PerChannel, PowerLevels::Symmetric, Some(1.0)).unwrap();
        let want: Vec<f32> = (0..15).map(|k| (k as f32 - 7.0) / 7.0).collect();
        for (t, w) in grid.table().iter().zip(&want) {
            assert!((t - w).abs() < 1e-6);
        }
    }

    #[test]
    fn exponent_search_finds_the_brute_force_minimum() {
        let (n, k) = (64, 512);
        for levels in [
            PowerLevels::Symmetric,
            PowerLevels::All,
            PowerLevels::Extended,
        ] {
            for (bits, seed) in [(3u8, 1u64), (4, 2), (2, 3)] {
                let w = heavy_tailed(seed, n * k);
                let imp: Vec<f32> = (0..k).map(|j| 0.5 + (j % 7) as f32).collect();
                for importance in [None, Some(imp.as_slice())] {
                    let base = PowerGrid::new(bits, GroupSize::Columns(64), levels, None).unwrap();
                    let found = base.for_layer_weighted(&w, n, k, importance).unwrap();
                    let scales: Vec<f32> = w
                        .chunks(k)
                        .flat_map(|r| r.chunks(64).map(group_scale))
                        .collect();
                    let err = |a: f32| base.at_exponent(a).layer_error(&w, k, &scales, importance);
                    let brute = (0..=800)
                        .map(|i| err(0.2 + i as f32 * 0.001))
                        .fold(f64::INFINITY, f64::min);
                    let got = err(found.exponent());
                    assert!(
                        got <= brute * (1.0 + 1e-3),
                        "bits {bits} {levels:?}: a = {} error {got} vs scan minimum {brute}",
                        found.exponent()
                    );
                    // heavy tails: the optimum is well below uniform
                    assert!(found.exponent() < 0.95, "a = {}", found.exponent());
                }
            }
        }
    }

    /// With searched scales the exponent is fitted again on the scales searched at the
    /// first exponent: rounding with the final table and scales searched for it has no
    /// more error than the exponent fitted on the maxima (the same search after it).
    #[test]
    fn searched_scales_refit_the_exponent() {
        let (n, k) = (48, 384);
        let imp: Vec<f32> = (0..k).map(|j| 0.5 + (j % 5) as f32).collect();
        for (bits, seed) in [(2u8, 4u64), (3, 5)] {
            let w = heavy_tailed(seed, n * k);
            let base = PowerGrid::new(bits, GroupSize::Columns(64), PowerLevels::Extended, None)
                .unwrap()
                .with_range(RangeFit::shrink_search());
            // rounding error of a table with each group's scale searched for that table
            let rounded = |g: &PowerGrid| -> f64 {
                let scales: Vec<f32> = w
                    .chunks(k)
                    .flat_map(|r| {
                        r.chunks(64)
                            .enumerate()
                            .map(|(gi, v)| g.fit_weighted(v, Some(&imp[gi * 64..gi * 64 + v.len()])).scale)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                g.layer_error(&w, k, &scales, Some(&imp))
            };
            let alternated = base.for_layer_weighted(&w, n, k, Some(&imp)).unwrap();
            let on_maxima = base
                .clone()
                .with_range(RangeFit::MinMax)
                .for_layer_weighted(&w, n, k, Some(&imp))
                .unwrap();
            let first = base.at_exponent(on_maxima.exponent());
            assert_ne!(alternated.exponent(), on_maxima.exponent(), "bits {bits}");
            let (e_alt, e_first) = (rounded(&alternated), rounded(&first));
            assert!(e_alt <= e_first, "bits {bits}: {e_alt} > {e_first}");
        }
    }

    #[test]
    fn extended_exponent_one_is_the_uniform_symmetric_grid() {
        use crate::quant::UniformGrid;
        for bits in [2u8, 3, 4, 8] {
            let power = PowerGrid::new(
                bits,
                GroupSize::PerChannel,
                PowerLevels::Extended,
                Some(1.0),
            )
            .unwrap();
            let uniform = UniformGrid::new(bits, GroupSize::PerChannel, true).unwrap();
            let p = uniform.fit(&[1.0, -0.5]);
            for c in 0..=uniform.max_code() {
                let want = UniformGrid::decode(c, p) as f64
                    / (p.scale as f64 * ((1u32 << bits) - 1) as f64 / 2.0);
                let got = power.table()[c as usize] as f64;
                assert!(
                    (got - want).abs() < 1e-6,
                    "bits {bits} code {c}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(PowerGrid::new(9, GroupSize::PerChannel, PowerLevels::All, None).is_err());
        assert!(PowerGrid::new(1, GroupSize::PerChannel, PowerLevels::All, None).is_err());
        let e = PowerGrid::new(4, GroupSize::PerChannel, PowerLevels::All, Some(1.5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exponent 1.5"), "{e}");
    }
}
