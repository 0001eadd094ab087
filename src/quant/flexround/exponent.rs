//! The power grid's exponent learned with FlexRound's factors (learned NUPES,
//! methods.md §5.2): every unit level is `±f^{1/a}` with `f` fixed by its code
//! (`|k|/(Q+½)` or `|k|/Q`), so a layer's whole table moves with `a` and
//! `∂level/∂a = −level · ln f / a²`. The codes are held by the straight-through estimator
//! (the gradient reaches `a` through the levels the weights round to), and `ln f` is
//! bounded: the zero level (`f = 0`) does not move and takes no part, so the `ln|w|`
//! terms that diverge in the companding view (methods.md §5.2) never arise.

use super::layout::CodebookLevels;
use crate::quant::grid::EXPONENT_RANGE;
use anyhow::{ensure, Result};

/// A codebook's table as a function of the exponent.
#[derive(Debug, Clone)]
pub struct ExponentTable {
    /// `ln f` of every table entry (0 for a zero entry, which stays 0).
    ln_f: Vec<f32>,
    /// The sign of every entry (0 for a zero entry).
    sign: Vec<f32>,
}

impl ExponentTable {
    /// From a table built at exponent `a0`: `f = |v|^{a0}`.
    pub fn new(table: &[f32], a0: f32) -> Result<Self> {
        ensure!(
            a0.is_finite() && a0 > 0.0,
            "a codebook's exponent must be positive to be learned, got {a0}"
        );
        let ln_f = table
            .iter()
            .map(|&v| if v == 0.0 { 0.0 } else { a0 * v.abs().ln() })
            .collect();
        let sign = table
            .iter()
            .map(|&v| if v == 0.0 { 0.0 } else { v.signum() })
            .collect();
        Ok(Self { ln_f, sign })
    }

    /// The table at exponent `a`.
    pub fn table(&self, a: f32) -> Vec<f32> {
        self.ln_f
            .iter()
            .zip(&self.sign)
            .map(|(&l, &s)| s * (l / a).exp())
            .collect()
    }

    /// `levels` moved to exponent `a`.
    pub fn levels(&self, levels: &CodebookLevels, a: f32) -> CodebookLevels {
        levels.rebuilt(self.table(a), a)
    }

    /// `∂v/∂a` of every table entry at exponent `a`.
    pub fn derivative(&self, a: f32) -> Vec<f32> {
        self.table(a)
            .iter()
            .zip(&self.ln_f)
            .map(|(&v, &l)| -v * l / (a * a))
            .collect()
    }
}

/// Keep a learned exponent where the power grid's search would look.
pub fn clamp_exponent(a: f32) -> f32 {
    a.clamp(EXPONENT_RANGE.0, EXPONENT_RANGE.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{GroupSize, PowerGrid, PowerLevels};

    /// The table at a new exponent equals the power grid's own table there, and the
    /// derivative matches central differences, for every kind of levels.
    #[test]
    fn moves_like_the_power_grids_own_table() {
        for levels in [
            PowerLevels::Extended,
            PowerLevels::All,
            PowerLevels::Symmetric,
        ] {
            let at = |a: f32| {
                PowerGrid::new(3, GroupSize::PerChannel, levels, Some(a))
                    .unwrap()
                    .table()
                    .to_vec()
            };
            let e = ExponentTable::new(&at(0.7), 0.7).unwrap();
            for (a, b) in e.table(0.55).iter().zip(at(0.55)) {
                assert!((a - b).abs() <= 1e-5, "{levels:?}: {a} vs {b}");
            }
            let h = 1e-3f32;
            let (up, down) = (e.table(0.6 + h), e.table(0.6 - h));
            for (i, d) in e.derivative(0.6).iter().enumerate() {
                let fd = (up[i] - down[i]) / (2.0 * h);
                assert!((fd - d).abs() <= 2e-3 * d.abs().max(1e-2), "{levels:?} {i}: {d} vs {fd}");
            }
        }
    }
}
