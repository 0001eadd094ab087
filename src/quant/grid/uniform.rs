//! The uniform integer grid (methods.md §2.1): `2^bits` evenly spaced levels per group,
//! `scale · (code − zero)`, fitted from the group's min and max.

use super::{Grid, GridSpec, GroupSize};
use anyhow::{bail, Result};
use half::f16;

/// Bit widths the GPTQ-layout packer can store.
pub const SUPPORTED_BITS: &[u8] = &[2, 3, 4, 8];

/// A uniform grid: `bits`, group size, symmetric or asymmetric min–max range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniformGrid {
    pub bits: u8,
    pub group_size: GroupSize,
    pub sym: bool,
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
        })
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
        let zero = if self.sym {
            1u8 << (self.bits - 1)
        } else {
            (-*lo / scale).round_ties_even().clamp(0.0, maxq) as u8
        };
        GroupParams { scale, zero }
    }

    /// Nearest code for `w` (round half to even, clamped to the grid).
    #[inline]
    pub fn encode(&self, w: f32, p: GroupParams) -> u8 {
        ((w / p.scale).round_ties_even() + p.zero as f32).clamp(0.0, self.max_code() as f32) as u8
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

impl Grid for UniformGrid {
    type Params = GroupParams;

    fn group_size(&self) -> GroupSize {
        self.group_size
    }

    #[inline]
    fn fit(&self, values: &[f32]) -> GroupParams {
        UniformGrid::fit(self, values)
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
        }
    }
}

/// Round a positive scale *up* to an f16 value (never zero or infinity). Rounding up keeps
/// `max_code · scale ≥ hi − lo`, so every value of the group stays within half a step of
/// the grid, and the f32 fake-quant values equal exactly what the f16 file stores.
fn to_f16_exact(s: f32) -> f32 {
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
                    let rel = ((hi - lo) / maxq - s).abs() / s;
                    assert!(
                        rel < 1e-3,
                        "scale {s} vs {} (f16 rounding only)",
                        (hi - lo) / maxq
                    );
                    if sym {
                        assert_eq!(p.zero as u32, 1 << (bits - 1), "symmetric zero point");
                    } else {
                        assert_eq!(p.zero as f64, (-lo / s).round_ties_even().clamp(0.0, maxq));
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

    #[test]
    fn all_zero_group_is_well_defined() {
        let grid = UniformGrid::new(4, GroupSize::PerChannel, false).unwrap();
        let p = grid.fit(&[0.0; 8]);
        assert!(p.scale > 0.0);
        assert_eq!(grid.fake_quant(0.0, p), 0.0);
    }
}
