//! The power grid's per-group scale fitted by search (issue 18 on NUPES' grid): the scale
//! `M` of a group is `max|w|` by default (methods.md §5.1); with a [`RangeFit::Search`] it
//! is the candidate among the shrunk maxima `M·f` — and, with `refit_scale`, each
//! candidate's weighted least-squares scale for the codes it chose,
//! `M* = Σ h w t / Σ h t²` with `t` the codes' unit levels — that minimises
//! `Σ h_j |w_j − ŵ_j|^norm`. The layer's exponent is searched before, on the max scales.

use super::power::{PowerGrid, PowerParams};
use super::range::{alternate_refit, RangeFit};
use half::f16;

impl PowerGrid {
    /// `group_scale`-fitted params of `values`, improved as `range` says.
    pub(super) fn fit_scale(
        &self,
        values: &[f32],
        importance: Option<&[f32]>,
        max_scale: f32,
        range: RangeFit,
    ) -> PowerParams {
        let start = PowerParams { scale: max_scale };
        let RangeFit::Search {
            norm,
            steps,
            max_shrink,
            refit_scale,
        } = range
        else {
            return start;
        };
        let error = |p: PowerParams| -> f64 {
            values
                .iter()
                .enumerate()
                .map(|(j, &w)| {
                    let d = (w - p.scale * self.level(self.code_of(w, p))).abs();
                    let e = if norm == 2.0 { d * d } else { d.powf(norm) };
                    (e * importance.map_or(1.0, |h| h[j])) as f64
                })
                .sum()
        };
        let refit = |p: PowerParams| -> Option<PowerParams> {
            let (mut num, mut den) = (0f64, 0f64);
            for (j, &w) in values.iter().enumerate() {
                let t = self.level(self.code_of(w, p)) as f64;
                let h = importance.map_or(1.0, |h| h[j] as f64);
                num += h * w as f64 * t;
                den += h * t * t;
            }
            let scale = f16::from_f64(num / den).to_f32();
            (den > 0.0 && scale.is_finite() && scale > 0.0).then_some(PowerParams { scale })
        };
        let mut best = (error(start), start);
        let steps = steps.max(1) as usize;
        for i in 1..steps {
            let f = 1.0 - i as f32 / steps as f32;
            if f < 1.0 - max_shrink - 1e-6 {
                break;
            }
            let scale = f16::from_f32(max_scale * f).to_f32();
            if scale <= 0.0 {
                break;
            }
            let p = PowerParams { scale };
            let e = error(p);
            if e < best.0 {
                best = (e, p);
            }
            if let Some(q) = refit_scale.then(|| refit(p)).flatten() {
                let e = error(q);
                if e < best.0 {
                    best = (e, q);
                }
            }
        }
        if refit_scale {
            best = alternate_refit(best, refit, error);
        }
        best.1
    }
}

#[cfg(test)]
mod tests {
    use super::super::power::PowerLevels;
    use super::super::{Grid, GroupSize};
    use super::*;

    fn heavy(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0;
                if i % 13 == 5 {
                    u * 0.4
                } else {
                    u * u * u * 0.05
                }
            })
            .collect()
    }

    #[test]
    fn searched_scale_never_loses_to_the_max_and_often_wins() {
        for bits in [2u8, 3, 4] {
            let base = PowerGrid::new(
                bits,
                GroupSize::Columns(32),
                PowerLevels::Extended,
                Some(0.6),
            )
            .unwrap();
            let searched = base.clone().with_range(RangeFit::search());
            let mut wins = 0;
            for seed in 1..50u64 {
                let w = heavy(seed, 32);
                let h: Vec<f32> = heavy(seed + 5, 32).iter().map(|v| v.abs() + 0.05).collect();
                let e = |p: PowerParams| -> f64 {
                    w.iter()
                        .zip(&h)
                        .map(|(&x, &h)| {
                            let d = (x - base.decode(base.encode(x, &p, 0), &p, 0)) as f64;
                            h as f64 * d * d
                        })
                        .sum()
                };
                let max = base.fit_weighted(&w, Some(&h));
                let got = searched.fit_weighted(&w, Some(&h));
                assert!(e(got) <= e(max), "bits {bits} seed {seed}");
                wins += (e(got) < e(max)) as usize;
                // the stored scale is an f16 value
                assert_eq!(f16::from_f32(got.scale).to_f32(), got.scale);
            }
            assert!(wins > 10, "bits {bits}: the search won only {wins} times");
        }
    }
}
