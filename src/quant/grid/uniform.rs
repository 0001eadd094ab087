//! The uniform integer grid (methods.md §2.1): `2^bits` evenly spaced levels per group,
//! `scale · (code − zero)`, fitted from the group's min and max.

use super::range::{fit_range, RangeFit};
use super::{Grid, GridSpec, GroupSize};
use anyhow::{bail, Result};
use half::f16;

/// Bit widths the GPTQ-layout packer can store.
pub const SUPPORTED_BITS: &[u8] = &[2, 3, 4, 8];

/// A uniform grid: `bits`, group size, symmetric or asymmetric, and how a group's range is
/// fitted (min–max unless [`UniformGrid::with_range`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UniformGrid {
    pub bits: u8,
    pub group_size: GroupSize,
    pub sym: bool,
    pub range: RangeFit,
}

/// Scale and zero point of one group of one output row. The scale is always exactly
/// representable in f16, the precision it is stored in, so packing is lossless.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GroupParams {
    pub scale: f32,
    pub zero: u8,
}

impl UniformGrid {
    pub fn new(bits: u8, group_size: GroupSize, sym: bool) -> Result<Self> {
        if !SUPPORTED_BITS.contains(&bits) {
            bail!(
                "unsupported bit width {bits}; supported: {}",
                SUPPORTED_BITS
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let GroupSize::Columns(0) = group_size {
            bail!("group size must be positive (or -1 for per-channel)");
        }
        Ok(Self {
            bits,
            group_size,
            sym,
            range: RangeFit::MinMax,
        })
    }

    /// This grid with its ranges fitted as `range` says.
    pub fn with_range(self, range: RangeFit) -> Self {
        Self { range, ..self }
    }

    /// Largest code, `2^bits − 1`.
    pub fn max_code(&self) -> u8 {
        ((1u16 << self.bits) - 1) as u8
    }

    /// Min–max fit of one group's values (methods.md §2.1).
    pub fn fit(&self, values: &[f32]) -> GroupParams {
        let (mut lo, mut hi) = values
            .iter()
            .fold((0f32, 0f32), |(lo, hi), &w| (lo.min(w), hi.max(w)));
        self.params_from_range(&mut lo, &mut hi)
    }

    /// Params for the range `[lo, hi]` (already widened to include 0).
    pub fn params_from_range(&self, lo: &mut f32, hi: &mut f32) -> GroupParams {
        let maxq = self.max_code() as f32;
        if self.sym {
            *hi = hi.max(lo.abs());
            *lo = -*hi;
        }
        if *lo == 0.0 && *hi == 0.0 {
            *lo = -1.0;
            *hi = 1.0;
        }
        let scale = to_f16_exact((*hi - *lo) / maxq);
        if self.sym {
            return GroupParams {
                scale,
                zero: 1u8 << (self.bits - 1),
            };
        }
        match (-*lo / scale).round_ties_even().clamp(0.0, maxq) as u8 {
            // Zero point 0 is re-solved as zero point 1 with the scale that still reaches
            // `hi` in the top code. GPTQ's v1 checkpoints store `zero − 1`, and gptqmodel
            // converts them by adding 1 to the packed word as an integer
            // (`convert_gptq_v1_to_v2_format_module` in gptqmodel/utils/model.py, 2/4/8
            // bits): a stored field of 2^b − 1 carries into the next row's zero point. A
            // grid that never has zero 0 is read right by every loader, in every layout.
            // The cost: such a group (its minimum within half a step of 0) spans its
            // range with 2^b − 2 steps instead of 2^b − 1; `lo` stays on the grid, as
            // `|lo| < scale / 2` before and the new scale is larger.
            0 => GroupParams {
                scale: to_f16_exact(*hi / (maxq - 1.0)),
                zero: 1,
            },
            zero => GroupParams { scale, zero },
        }
    }

    /// Nearest code for `w` (round half to even, clamped to the grid).
    #[inline]
    pub fn encode(&self, w: f32, p: GroupParams) -> u8 {
        code_f32(w, p.scale, p.zero as f32, self.max_code() as f32) as u8
    }

    /// The value a code stands for.
    #[inline]
    pub fn decode(code: u8, p: GroupParams) -> f32 {
        p.scale * (code as f32 - p.zero as f32)
    }

    /// `decode(encode(w))`.
    #[inline]
    pub fn fake_quant(&self, w: f32, p: GroupParams) -> f32 {
        Self::decode(self.encode(w, p), p)
    }
}

/// `round_half_even(w / scale) + zero`, clamped to `[0, max]`, as an f32 (the code
/// [`UniformGrid::encode`] picks). Clamped before it is rounded — exact, as both bounds are
/// integers and rounding is monotone — so the rounding can be the add and subtract of
/// 1.5·2²³, which is round-half-even for |x| < 2²² in the default rounding mode and
/// vectorises, where `round_ties_even` is a libm call (`rintf`) on baseline x86-64: it was
/// a fifth of a range search's time.
#[inline(always)]
pub(crate) fn code_f32(w: f32, scale: f32, zero: f32, max: f32) -> f32 {
    const ROUNDER: f32 = 12_582_912.0;
    let x = (w / scale).clamp(-zero, max - zero);
    ((x + ROUNDER) - ROUNDER) + zero
}

impl Grid for UniformGrid {
    type Params = GroupParams;

    fn group_size(&self) -> GroupSize {
        self.group_size
    }

    #[inline]
    fn fit(&self, values: &[f32]) -> GroupParams {
        self.fit_weighted(values, None)
    }

    fn searches_fit(&self) -> bool {
        !self.range.is_min_max()
    }

    fn fit_weighted(&self, values: &[f32], importance: Option<&[f32]>) -> GroupParams {
        match self.range {
            // the min–max fit, bit for bit as before ranges could be searched
            RangeFit::MinMax => UniformGrid::fit(self, values),
            range => fit_range(self, range, values, importance),
        }
    }

    #[inline]
    fn encode(&self, w: f32, p: &GroupParams, _col: usize) -> u8 {
        UniformGrid::encode(self, w, *p)
    }

    #[inline]
    fn decode(&self, code: u8, p: &GroupParams, _col: usize) -> f32 {
        UniformGrid::decode(code, *p)
    }

    fn spec(&self) -> GridSpec {
        GridSpec::Uniform {
            bits: self.bits,
            group_size: self.group_size,
            sym: self.sym,
            range: self.range,
        }
    }
}

/// Round a positive scale *up* to an f16 value (never zero or infinity). Rounding up keeps
/// `max_code · scale ≥ hi − lo`, so every value of the group stays within half a step of
/// the grid, and the f32 fake-quant values equal exactly what the f16 file stores.
pub(super) fn to_f16_exact(s: f32) -> f32 {
    let h = f16::from_f32(s);
    let h = if h.to_f32() < s {
        f16::from_bits(h.to_bits() + 1)
    } else {
        h
    };
    if h.to_f32() == 0.0 {
        f16::from_bits(1).to_f32() // smallest positive subnormal
    } else if h.is_infinite() {
        f16::MAX.to_f32()
    } else {
        h.to_f32()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_f32_rounds_exactly_as_round_ties_even_then_clamp() {
        let reference = |w: f32, scale: f32, zero: f32, max: f32| {
            ((w / scale).round_ties_even() + zero).clamp(0.0, max)
        };
        let mut x = 0x2545F4914F6CDD1Du64;
        let mut cases: Vec<(f32, f32)> = vec![
            (0.5, 1.0),
            (1.5, 1.0),
            (2.5, 1.0),
            (-0.5, 1.0),
            (-1.5, 1.0),
            (0.49999997, 1.0),
            (-0.49999997, 1.0),
            (8388607.5, 1.0),
            (1e30, 1e-30),
            (-1e30, 1e-30),
            (f32::INFINITY, 1.0),
            (f32::NEG_INFINITY, 1.0),
            (3.0, -0.25),
            (0.0, -1.0),
        ];
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32;
            let half = ((x >> 8) % 600) as f32 * 0.5 - 150.0; // exact halves
            cases.push((half, 1.0));
            cases.push(((u - 0.5) * 40.0, 0.1 + (x % 7) as f32 * 0.03));
        }
        for bits in [2u8, 3, 4, 8] {
            let max = ((1u16 << bits) - 1) as f32;
            for zero in [0.0, 1.0, (max / 2.0).ceil(), max] {
                for &(w, s) in &cases {
                    let (a, b) = (code_f32(w, s, zero, max), reference(w, s, zero, max));
                    assert!(
                        a == b,
                        "w {w} scale {s} zero {zero} bits {bits}: {a} vs {b}"
                    );
                }
                assert!(code_f32(f32::NAN, 1.0, zero, max).is_nan());
            }
        }
    }

    /// Deterministic pseudo-random values (no RNG crate needed).
    fn values(seed: u64, n: usize, spread: f64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) as f32 * spread as f32
                    + if seed.is_multiple_of(3) {
                        0.3 * spread as f32
                    } else {
                        0.0
                    }
            })
            .collect()
    }

    #[test]
    fn rejects_unsupported_bits() {
        let e = UniformGrid::new(5, GroupSize::PerChannel, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported bit width 5"), "{e}");
    }

    #[test]
    fn matches_f64_reference_and_error_bound() {
        for &bits in SUPPORTED_BITS {
            for sym in [false, true] {
                let grid = UniformGrid::new(bits, GroupSize::Columns(32), sym).unwrap();
                for seed in 0..50u64 {
                    let w = values(seed, 37, 0.05 * (1 + seed % 7) as f64);
                    let p = grid.fit(&w);
                    let maxq = grid.max_code() as f64;
                    // independent float64 reference of the same grid, using the stored scale
                    let lo = w.iter().fold(0f64, |a, &b| a.min(b as f64));
                    let hi = w.iter().fold(0f64, |a, &b| a.max(b as f64));
                    let s = p.scale as f64;
                    let (lo, hi) = if sym {
                        (-hi.max(-lo), hi.max(-lo))
                    } else {
                        (lo, hi)
                    };
                    // an asymmetric zero point of 0 is re-solved as 1 (v1 checkpoints)
                    let min_max = to_f16_exact(((hi - lo) / maxq) as f32) as f64;
                    let resolved = !sym && (-lo / min_max).round_ties_even() <= 0.0;
                    let (want_s, want_z) = if resolved {
                        (hi / (maxq - 1.0), 1.0)
                    } else {
                        (
                            (hi - lo) / maxq,
                            (-lo / s).round_ties_even().clamp(0.0, maxq),
                        )
                    };
                    let rel = (want_s - s).abs() / s;
                    assert!(rel < 1e-3, "scale {s} vs {want_s} (f16 rounding only)");
                    if sym {
                        assert_eq!(p.zero as u32, 1 << (bits - 1), "symmetric zero point");
                    } else {
                        assert_eq!(p.zero as f64, want_z);
                    }
                    for &x in &w {
                        let q = grid.encode(x, p);
                        assert!(q as f64 <= maxq);
                        let r = ((x as f64 / s).round_ties_even() + p.zero as f64).clamp(0.0, maxq);
                        assert_eq!(q as f64, r, "code of {x}");
                        let err = (UniformGrid::decode(q, p) as f64 - x as f64).abs();
                        assert!(
                            err <= s / 2.0 * (1.0 + 2e-3) + 1e-9,
                            "error {err} > scale/2 = {}",
                            s / 2.0
                        );
                    }
                }
            }
        }
    }

    /// A group whose minimum is within half a step of 0 (here: all positive) gets zero
    /// point 1, never 0, and still holds every value within half a step, its largest on
    /// the top code.
    #[test]
    fn asymmetric_zero_point_is_never_zero() {
        for &bits in SUPPORTED_BITS {
            let grid = UniformGrid::new(bits, GroupSize::Columns(32), false).unwrap();
            for lo in [0.0f32, 0.001, -0.001] {
                let w: Vec<f32> = (0..32).map(|i| lo + 0.01 * i as f32).collect();
                let p = grid.fit(&w);
                assert_eq!(p.zero, 1, "w{bits} lo {lo}");
                assert_eq!(grid.encode(w[31], p), grid.max_code());
                for &x in &w {
                    let err = (grid.fake_quant(x, p) - x).abs();
                    assert!(
                        err <= p.scale / 2.0 * (1.0 + 1e-6),
                        "w{bits}: {x} off by {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn all_zero_group_is_well_defined() {
        let grid = UniformGrid::new(4, GroupSize::PerChannel, false).unwrap();
        let p = grid.fit(&[0.0; 8]);
        assert!(p.scale > 0.0);
        assert_eq!(grid.fake_quant(0.0, p), 0.0);
    }
}
