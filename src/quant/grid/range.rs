//! How a uniform grid's scale and zero point are fitted to a group: from its min and max
//! (methods.md §2.1), the symmetric grid's full code range (the value of largest magnitude
//! on the extra negative level `−2^(b−1)`, as GGML's Q4_0 does), or a search for the range
//! that minimises the importance-weighted reconstruction error `Σ_j h_j |w_j − ŵ_j|^p`
//! (GPTQ's `mse` option, llama.cpp's importance-weighted scale search).

use super::uniform::{code_f32, to_f16_exact, GroupParams, UniformGrid};
use half::f16;
use serde::{Deserialize, Serialize};

/// The range fit of a uniform grid.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RangeFit {
    /// `[min, max]` of the group (widened to include 0).
    #[default]
    MinMax,
    /// Symmetric grids: the value of largest magnitude `v` gets the code of `−2^(b−1)`
    /// (`scale = v / −2^(b−1)`, negative when `v > 0`), so all `2^b` codes are used.
    /// Asymmetric grids already use every code: same as `min_max`.
    FullRange,
    /// Search over `steps` shrink factors `1 − i/steps` of the min–max range down to
    /// `1 − max_shrink` (symmetric grids: both conventions above at each factor;
    /// asymmetric: both ends together, then each end alone), minimising
    /// `Σ h_j |w_j − ŵ_j|^norm` with `h` the importance of each column (the Hessian's
    /// diagonal when calibration is available, 1 otherwise).
    ///
    /// With `refit_scale`, every candidate is also tried with the scale that is the
    /// weighted least-squares optimum for the codes it chose (`s = Σ h w a / Σ h a²`,
    /// `a = q − z`, as llama.cpp's `make_qx_quants` does), and the best candidate is then
    /// refined by alternating code choice and that refit until it stops improving.
    /// Recipes written before this option read it as `false`.
    Search {
        #[serde(default = "default_norm")]
        norm: f32,
        #[serde(default = "default_steps")]
        steps: u16,
        #[serde(default = "default_max_shrink")]
        max_shrink: f32,
        #[serde(default)]
        refit_scale: bool,
    },
}

fn default_norm() -> f32 {
    2.0
}
fn default_steps() -> u16 {
    100
}
fn default_max_shrink() -> f32 {
    0.8
}

impl RangeFit {
    /// The search with its default settings (the least-squares scale refit included).
    pub fn search() -> Self {
        Self::Search {
            norm: default_norm(),
            steps: default_steps(),
            max_shrink: default_max_shrink(),
            refit_scale: true,
        }
    }

    /// The search over shrink factors alone, without the least-squares scale refit.
    pub fn shrink_search() -> Self {
        match Self::search() {
            Self::Search {
                norm,
                steps,
                max_shrink,
                ..
            } => Self::Search {
                norm,
                steps,
                max_shrink,
                refit_scale: false,
            },
            _ => unreachable!("search() is a Search"),
        }
    }

    pub fn is_min_max(&self) -> bool {
        *self == Self::MinMax
    }
}

/// Lanes of the error sum: independent f64 accumulators, so the per-value work vectorises
/// instead of waiting on one serial chain of f64 additions.
const LANES: usize = 8;
/// Values between two checks of the running sum against the bound.
const CHECK_EVERY: usize = 4 * LANES;

/// `Σ h_j |w_j − ŵ_j|^norm` of `values` on `p`.
fn weighted_error(
    grid: &UniformGrid,
    values: &[f32],
    importance: Option<&[f32]>,
    p: GroupParams,
    norm: f32,
) -> f64 {
    bounded_error(grid, values, importance, p, norm, f64::INFINITY)
}

/// [`weighted_error`], abandoned as soon as the running sum reaches `bound` (the value
/// returned is then some partial sum `≥ bound`, never below the full sum's verdict). Exact:
/// every lane only grows, and the check reduces the lanes the way the final sum does, so a
/// candidate is cut only when its full error could not be below `bound` either.
fn bounded_error(
    grid: &UniformGrid,
    values: &[f32],
    importance: Option<&[f32]>,
    p: GroupParams,
    norm: f32,
    bound: f64,
) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has just been found to support AVX-512F
        return unsafe { bounded_error_avx512(grid, values, importance, p, norm, bound) };
    }
    bounded_error_portable(grid, values, importance, p, norm, bound)
}

/// The same operations in the same order on 512-bit registers (one register holds the
/// eight f64 lanes): the result is bit for bit the portable one's. Baseline x86-64 has
/// only SSE2; with this, a CI-sized per-channel BAQ run with the search (fixture, 4 × 256)
/// went from 154.7 s to 63.0 s, same model bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bounded_error_avx512(
    grid: &UniformGrid,
    values: &[f32],
    importance: Option<&[f32]>,
    p: GroupParams,
    norm: f32,
    bound: f64,
) -> f64 {
    bounded_error_portable(grid, values, importance, p, norm, bound)
}

#[inline(always)]
fn bounded_error_portable(
    grid: &UniformGrid,
    values: &[f32],
    importance: Option<&[f32]>,
    p: GroupParams,
    norm: f32,
    bound: f64,
) -> f64 {
    let (scale, zero, max) = (p.scale, p.zero as f32, grid.max_code() as f32);
    // `fake_quant` written out without the u8 round trip (exact: the code is an integer
    // in [0, max] either way), so it vectorises
    let err = |w: f32| {
        let q = code_f32(w, scale, zero, max);
        let d = (w - scale * (q - zero)).abs();
        if norm == 2.0 {
            d * d
        } else {
            d.powf(norm)
        }
    };
    let reduce =
        |l: &[f64; LANES]| ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    let mut lanes = [0f64; LANES];
    let mut weights = [1f32; LANES];
    for start in (0..values.len()).step_by(CHECK_EVERY) {
        let end = (start + CHECK_EVERY).min(values.len());
        let mut blocks = values[start..end].chunks_exact(LANES);
        for (b, w) in (&mut blocks).enumerate() {
            if let Some(h) = importance {
                let j = start + b * LANES;
                weights.copy_from_slice(&h[j..j + LANES]);
            }
            for ((acc, &h), &w) in lanes.iter_mut().zip(&weights).zip(w) {
                *acc += (h * err(w)) as f64;
            }
        }
        let tail = blocks.remainder();
        let j = end - tail.len();
        for (l, (acc, &w)) in lanes.iter_mut().zip(tail).enumerate() {
            let h = importance.map_or(1.0, |h| h[j + l]);
            *acc += (h * err(w)) as f64;
        }
        let sum = reduce(&lanes);
        if sum >= bound {
            return sum;
        }
    }
    reduce(&lanes)
}

/// The weighted least-squares scale for the codes `p` gives `values` (zero point held):
/// `argmin_s Σ h_j (w_j − s·a_j)²` with `a_j = q_j − z`, rounded to the nearest f16.
/// `None` when every code sits on the zero point or the optimum is not a usable scale.
fn least_squares_scale(
    grid: &UniformGrid,
    values: &[f32],
    importance: Option<&[f32]>,
    p: GroupParams,
) -> Option<GroupParams> {
    let (mut num, mut den) = (0f64, 0f64);
    for (j, &w) in values.iter().enumerate() {
        let a = grid.encode(w, p) as f64 - p.zero as f64;
        let h = importance.map_or(1.0, |h| h[j] as f64);
        num += h * w as f64 * a;
        den += h * a * a;
    }
    if den <= 0.0 {
        return None;
    }
    let scale = f16::from_f64(num / den).to_f32();
    (scale.is_finite() && scale != 0.0).then_some(GroupParams { scale, ..p })
}

/// Symmetric full-range params: `v` (the signed value of largest magnitude) on code 0.
fn full_range_params(grid: &UniformGrid, v: f32) -> GroupParams {
    let half = (1u16 << (grid.bits - 1)) as f32;
    let v = if v == 0.0 { 1.0 } else { v };
    let magnitude = to_f16_exact(v.abs() / half);
    GroupParams {
        scale: if v > 0.0 { -magnitude } else { magnitude },
        zero: half as u8,
    }
}

/// Fit `grid`'s params to `values` as `fit` says.
pub fn fit_range(
    grid: &UniformGrid,
    fit: RangeFit,
    values: &[f32],
    importance: Option<&[f32]>,
) -> GroupParams {
    let (lo, hi) = values
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &w| (lo.min(w), hi.max(w)));
    // the signed value of largest magnitude (ties: the negative one, which the classic
    // symmetric grid already reaches)
    let extreme = if hi > -lo { hi } else { lo };
    let classic = |f_lo: f32, f_hi: f32| {
        let (mut l, mut h) = (lo * f_lo, hi * f_hi);
        grid.params_from_range(&mut l, &mut h)
    };
    match fit {
        RangeFit::MinMax => classic(1.0, 1.0),
        RangeFit::FullRange if grid.sym => full_range_params(grid, extreme),
        RangeFit::FullRange => classic(1.0, 1.0),
        RangeFit::Search {
            norm,
            steps,
            max_shrink,
            refit_scale,
        } => {
            let steps = steps.max(1) as usize;
            let shrinks: Vec<f32> = (0..steps)
                .map(|i| 1.0 - i as f32 / steps as f32)
                .take_while(|&f| f >= 1.0 - max_shrink - 1e-6)
                .collect();
            // (error, params, lo factor, hi factor) of the best shrink so far: it steers the
            // end-by-end refinement exactly as without the refit, so the refit only adds
            // candidates and can never end worse
            let mut path = (f64::INFINITY, classic(1.0, 1.0), 1.0f32, 1.0f32);
            // (error, params) of the best candidate, refits included
            let mut best = (f64::INFINITY, path.1);
            let mut consider = |path: &mut (f64, GroupParams, f32, f32), p, f_lo, f_hi| {
                // a candidate no better than the path's best is of no use (the best
                // overall is never worse than the path's), so its sum may stop there
                let e = bounded_error(grid, values, importance, p, norm, path.0);
                if e < path.0 {
                    *path = (e, p, f_lo, f_hi);
                }
                if e < best.0 {
                    best = (e, p);
                }
                if refit_scale {
                    if let Some(q) = least_squares_scale(grid, values, importance, p) {
                        let e = bounded_error(grid, values, importance, q, norm, best.0);
                        if e < best.0 {
                            best = (e, q);
                        }
                    }
                }
            };
            for &f in &shrinks {
                consider(&mut path, classic(f, f), f, f);
                if grid.sym {
                    consider(&mut path, full_range_params(grid, extreme * f), f, f);
                }
            }
            if !grid.sym {
                // each end alone, the other held at the best factor so far
                let f_hi = path.3;
                for &f in &shrinks {
                    consider(&mut path, classic(f, f_hi), f, f_hi);
                }
                let f_lo = path.2;
                for &f in &shrinks {
                    consider(&mut path, classic(f_lo, f), f_lo, f);
                }
            }
            if refit_scale {
                best = alternate_refit(
                    best,
                    |p| least_squares_scale(grid, values, importance, p),
                    |p| weighted_error(grid, values, importance, p, norm),
                );
            }
            best.1
        }
    }
}

/// Rounds of code choice and scale refit after the search (each one lowers the error or
/// stops it; in practice two or three suffice).
const MAX_REFIT_ROUNDS: usize = 8;

/// Alternate from `best` = (error, params): the codes of the params, then the scale
/// `refit` gives those codes, kept while `error` falls. Shared by every grid whose search
/// refits its scale.
pub(super) fn alternate_refit<P: Copy>(
    mut best: (f64, P),
    refit: impl Fn(P) -> Option<P>,
    error: impl Fn(P) -> f64,
) -> (f64, P) {
    for _ in 0..MAX_REFIT_ROUNDS {
        let Some(q) = refit(best.1) else { break };
        let e = error(q);
        if e >= best.0 {
            break;
        }
        best = (e, q);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::grid::GroupSize;

    /// Heavy-tailed values: a few outliers among small weights.
    fn heavy(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0;
                if i % 17 == 3 {
                    u * 0.3
                } else {
                    u * u * u * 0.05
                }
            })
            .collect()
    }

    #[test]
    fn search_never_loses_to_min_max_and_equals_a_brute_force_scan() {
        for bits in [2u8, 3, 4, 8] {
            for sym in [false, true] {
                let grid = UniformGrid::new(bits, GroupSize::Columns(64), sym).unwrap();
                for seed in 1..40u64 {
                    let w = heavy(seed, 64);
                    let h: Vec<f32> = heavy(seed + 99, 64).iter().map(|v| v.abs() + 0.1).collect();
                    let search = RangeFit::Search {
                        norm: 2.0,
                        steps: 50,
                        max_shrink: 0.8,
                        refit_scale: false,
                    };
                    let got = fit_range(&grid, search, &w, Some(&h));
                    let e = |p| weighted_error(&grid, &w, Some(&h), p, 2.0);
                    let mm = fit_range(&grid, RangeFit::MinMax, &w, Some(&h));
                    assert!(
                        e(got) <= e(mm),
                        "bits {bits} sym {sym}: {} > {}",
                        e(got),
                        e(mm)
                    );
                    // brute force over the same candidates, written out independently
                    let (lo, hi) = w
                        .iter()
                        .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
                    let mut cands = vec![];
                    for i in 0..40 {
                        let f = 1.0 - i as f32 / 50.0;
                        let (mut l, mut u) = (lo * f, hi * f);
                        cands.push(grid.params_from_range(&mut l, &mut u));
                        if sym {
                            let v = if hi > -lo { hi } else { lo };
                            cands.push(full_range_params(&grid, v * f));
                        }
                    }
                    let brute = cands.iter().map(|&p| e(p)).fold(f64::INFINITY, f64::min);
                    if sym {
                        assert_eq!(
                            e(got),
                            brute,
                            "bits {bits}: search missed the scan's minimum"
                        );
                    } else {
                        // asymmetric: the end-by-end refinement can only improve on the scan
                        assert!(e(got) <= brute, "bits {bits}: {} > {brute}", e(got));
                    }
                }
            }
        }
    }

    #[test]
    fn the_error_sum_is_the_float64_sum_and_its_bound_is_exact() {
        for bits in [2u8, 3, 4] {
            let grid = UniformGrid::new(bits, GroupSize::Columns(128), false).unwrap();
            // lengths around the lane and check widths, the tails included
            for (seed, n) in
                (1..30u64).zip([1usize, 7, 8, 9, 31, 32, 33, 100, 128, 577].iter().cycle())
            {
                let w = heavy(seed, *n);
                let h: Vec<f32> = heavy(seed + 11, *n).iter().map(|v| v.abs() + 0.1).collect();
                let p = grid.fit(&w);
                // the definition, summed serially in float64
                let serial: f64 = w
                    .iter()
                    .zip(&h)
                    .map(|(&x, &h)| {
                        let d = (x - grid.fake_quant(x, p)) as f64;
                        h as f64 * d * d
                    })
                    .sum();
                let full = weighted_error(&grid, &w, Some(&h), p, 2.0);
                assert!(
                    (full - serial).abs() <= serial * 1e-6,
                    "n {n}: {full} vs {serial}"
                );
                for bound in [0.0, full * 0.3, full, full * (1.0 + 1e-12), f64::INFINITY] {
                    let b = bounded_error(&grid, &w, Some(&h), p, 2.0, bound);
                    let portable = bounded_error_portable(&grid, &w, Some(&h), p, 2.0, bound);
                    assert_eq!(
                        b.to_bits(),
                        portable.to_bits(),
                        "n {n}: dispatch vs portable"
                    );
                    if full < bound {
                        assert_eq!(b, full, "n {n}: cut below its bound");
                    } else {
                        assert!(b >= bound, "n {n}: {b} reported under the bound {bound}");
                    }
                }
            }
        }
    }

    #[test]
    fn full_range_decodes_as_q4_0() {
        // GGML's Q4_0 (ggml-quants.c, quantize_row_q4_0_ref): d = max / −8 where max is the
        // signed value of largest magnitude, q = clamp(round(x/d) + 8, 0, 15), x̂ = (q − 8)·d
        let grid = UniformGrid::new(4, GroupSize::Columns(32), true).unwrap();
        let block: Vec<f32> = (0..32).map(|i| (i as f32 - 11.0) * 0.013).collect();
        let p = fit_range(&grid, RangeFit::FullRange, &block, None);
        let max = block
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = half::f16::from_f32(max / -8.0).to_f32();
        assert!((p.scale - d).abs() <= d.abs() * 1e-3, "{} vs {d}", p.scale);
        for &x in &block {
            let q = ((x / p.scale).round_ties_even() + 8.0).clamp(0.0, 15.0);
            assert_eq!(grid.encode(x, p) as f32, q);
            assert_eq!(UniformGrid::decode(q as u8, p), (q - 8.0) * p.scale);
        }
        // the largest magnitude lands on the extra level exactly (up to f16 rounding)
        let top = grid.fake_quant(max, p);
        assert!((top - max).abs() <= max.abs() * 1e-3, "{top} vs {max}");
    }

    #[test]
    fn scale_refit_never_loses_to_the_shrink_search() {
        for bits in [2u8, 3, 4, 8] {
            for sym in [false, true] {
                let grid = UniformGrid::new(bits, GroupSize::Columns(32), sym).unwrap();
                let mut strictly_better = 0;
                for seed in 1..60u64 {
                    let w = heavy(seed, 32);
                    let h: Vec<f32> = heavy(seed + 7, 32).iter().map(|v| v.abs() + 0.05).collect();
                    let e = |p| weighted_error(&grid, &w, Some(&h), p, 2.0);
                    let shrink = fit_range(&grid, RangeFit::shrink_search(), &w, Some(&h));
                    let refit = fit_range(&grid, RangeFit::search(), &w, Some(&h));
                    assert!(e(refit) <= e(shrink), "bits {bits} sym {sym} seed {seed}");
                    strictly_better += (e(refit) < e(shrink)) as usize;
                }
                // the refit must actually do something on heavy-tailed groups
                if bits < 8 {
                    assert!(
                        strictly_better > 10,
                        "bits {bits} sym {sym}: {strictly_better}"
                    );
                }
            }
        }
    }

    #[test]
    fn least_squares_scale_is_the_float64_optimum_for_fixed_codes() {
        let grid = UniformGrid::new(3, GroupSize::Columns(32), false).unwrap();
        for seed in 1..20u64 {
            let w = heavy(seed, 32);
            let h: Vec<f32> = heavy(seed + 3, 32).iter().map(|v| v.abs() + 0.05).collect();
            let p = grid.fit(&w);
            let q = least_squares_scale(&grid, &w, Some(&h), p).unwrap();
            assert_eq!(q.zero, p.zero);
            // codes fixed at p's; the objective in float64 is a parabola in s
            let a: Vec<f64> = w
                .iter()
                .map(|&x| grid.encode(x, p) as f64 - p.zero as f64)
                .collect();
            let obj = |s: f64| -> f64 {
                w.iter()
                    .zip(&a)
                    .zip(&h)
                    .map(|((&x, &a), &h)| h as f64 * (x as f64 - s * a).powi(2))
                    .sum()
            };
            let s = q.scale as f64;
            // optimal up to the f16 rounding of the stored scale: no f16 neighbour is better
            let up = half::f16::from_f32(q.scale).to_bits() + 1;
            let down = half::f16::from_f32(q.scale).to_bits() - 1;
            for nb in [up, down] {
                let t = half::f16::from_bits(nb).to_f64();
                assert!(
                    obj(s) <= obj(t) + 1e-15,
                    "seed {seed}: s {s} worse than {t}"
                );
            }
            // and the unrounded optimum is the stationary point of the parabola
            let (num, den) = w
                .iter()
                .zip(&a)
                .zip(&h)
                .fold((0f64, 0f64), |(n, d), ((&x, &a), &h)| {
                    (n + h as f64 * x as f64 * a, d + h as f64 * a * a)
                });
            let exact = num / den;
            assert!((s - exact).abs() <= exact.abs() * 1e-3, "{s} vs {exact}");
            let eps = exact.abs() * 1e-6;
            assert!(obj(exact) <= obj(exact + eps) && obj(exact) <= obj(exact - eps));
        }
    }
}
