//! What a quantized layer must satisfy before anything multiplies with it: every scale
//! finite and non-zero, every code and zero point inside its bit width, shapes and group
//! indices consistent. Checked on every read of a packed model and before every repack
//! into the kernels' layout, so a corrupt file or a hand-built layer is an error that says
//! what is wrong and where, instead of NaN perplexity or garbage text with exit code 0.
//!
//! Negative scales are allowed: the formats store a sign-free `scale · (code − zero)`, and
//! a grid that uses the whole code range symmetrically may store a negative scale.

use crate::quant::{mixed_groups, MixedQuantizedLinear, QuantizedLinear};
use anyhow::{bail, ensure, Result};
use half::f16;

/// `scales` `[groups, n]`: each finite and non-zero.
pub fn check_scales(scales: &[f16], n: usize) -> Result<()> {
    if let Some(i) = scales
        .iter()
        .position(|s| !s.is_finite() || s.to_f32() == 0.0)
    {
        let what = if scales[i].to_f32() == 0.0 {
            "zero"
        } else {
            "not finite"
        };
        bail!(
            "scales[group {}, row {}] is {} ({what}); a scale must be finite and non-zero",
            i / n.max(1),
            i % n.max(1),
            scales[i]
        );
    }
    Ok(())
}

/// The largest value a `bits`-bit field holds.
fn max_value(bits: u8) -> u8 {
    ((1u16 << bits) - 1) as u8
}

/// A GPTQ-layout layer: shapes, `g_idx`, scales, and codes/zeros within `grid.bits`.
pub fn check_uniform(q: &QuantizedLinear) -> Result<()> {
    let (n, k) = (q.out_features, q.in_features);
    ensure!(
        q.codes.len() == n * k,
        "{} codes for a {n}x{k} layer",
        q.codes.len()
    );
    ensure!(
        q.g_idx.len() == k,
        "{} g_idx entries for {k} columns",
        q.g_idx.len()
    );
    ensure!(
        n > 0 && q.scales.len().is_multiple_of(n) && q.zeros.len() == q.scales.len(),
        "{} scales and {} zero points for {n} rows",
        q.scales.len(),
        q.zeros.len()
    );
    let groups = q.n_groups();
    if let Some(j) = q.g_idx.iter().position(|&g| g as usize >= groups) {
        bail!(
            "g_idx of column {j} is {}, outside the {groups} groups stored",
            q.g_idx[j]
        );
    }
    check_scales(&q.scales, n)?;
    let max = max_value(q.grid.bits);
    if let Some(i) = q.zeros.iter().position(|&z| z > max) {
        bail!(
            "zero point {} (group {}, row {}) does not fit {} bits",
            q.zeros[i],
            i / n,
            i % n,
            q.grid.bits
        );
    }
    if let Some(i) = q.codes.iter().position(|&c| c > max) {
        bail!(
            "code {} (row {}, column {}) does not fit {} bits",
            q.codes[i],
            i / k.max(1),
            i % k.max(1),
            q.grid.bits
        );
    }
    Ok(())
}

/// A mixed-width layer: widths 0..=8, shapes of its range groups, scales, and every
/// code and zero point within its column's or group's width (pruned columns hold code 0).
pub fn check_mixed(q: &MixedQuantizedLinear) -> Result<()> {
    let (n, k) = (q.out_features, q.in_features);
    ensure!(
        q.codes.len() == n * k && q.widths.len() == k,
        "{} codes and {} widths for a {n}x{k} layer",
        q.codes.len(),
        q.widths.len()
    );
    if let Some(j) = q.widths.iter().position(|&b| b > 8) {
        bail!("column {j} has width {}, outside 0..=8", q.widths[j]);
    }
    ensure!(q.group_size != Some(0), "group size must be positive");
    let groups = mixed_groups(&q.widths, q.group_size);
    let want = groups.n_groups() * n;
    ensure!(
        q.scales.len() == want && q.zeros.len() == want,
        "{} scales and {} zero points, expected {} range groups x {n} rows",
        q.scales.len(),
        q.zeros.len(),
        groups.n_groups()
    );
    check_scales(&q.scales, n)?;
    for (i, &z) in q.zeros.iter().enumerate() {
        let b = groups.group_width[i / n];
        if z > max_value(b) {
            bail!(
                "zero point {z} (range group {}, row {}) does not fit its {b} bits",
                i / n,
                i % n
            );
        }
    }
    for (i, &c) in q.codes.iter().enumerate() {
        let b = q.widths[i % k];
        if (b == 0 && c != 0) || (b > 0 && c > max_value(b)) {
            bail!(
                "code {c} (row {}, column {}) does not fit the column's {b} bits",
                i / k,
                i % k
            );
        }
    }
    Ok(())
}

/// The first zero point that a symmetric grid would not have (`2^(b−1)` in every group),
/// as (group, row, zero); `None` when the layer is symmetric.
pub fn asymmetric_zero(
    zeros: &[u8],
    n: usize,
    bits_of_group: impl Fn(usize) -> u8,
) -> Option<(usize, usize, u8)> {
    zeros.iter().enumerate().find_map(|(i, &z)| {
        let b = bits_of_group(i / n.max(1));
        (b > 0 && z != 1 << (b - 1)).then_some((i / n.max(1), i % n.max(1), z))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{GroupSize, UniformGrid};

    fn layer() -> QuantizedLinear {
        let (n, k) = (4, 8);
        QuantizedLinear {
            out_features: n,
            in_features: k,
            grid: UniformGrid::new(4, GroupSize::Columns(4), false).unwrap(),
            codes: (0..n * k).map(|i| (i % 16) as u8).collect(),
            scales: vec![f16::from_f32(0.5); 2 * n],
            zeros: vec![3; 2 * n],
            g_idx: (0..k as u32).map(|j| j / 4).collect(),
        }
    }

    #[test]
    fn each_corruption_is_named() {
        assert!(check_uniform(&layer()).is_ok());
        let bad = |f: &dyn Fn(&mut QuantizedLinear), want: &str| {
            let mut q = layer();
            f(&mut q);
            let e = check_uniform(&q).unwrap_err().to_string();
            assert!(e.contains(want), "`{e}` lacks `{want}`");
        };
        bad(
            &|q| q.scales[5] = f16::NAN,
            "scales[group 1, row 1] is NaN (not finite)",
        );
        bad(&|q| q.scales[0] = f16::INFINITY, "not finite");
        bad(&|q| q.scales[2] = f16::ZERO, "(zero)");
        bad(&|q| q.scales[2] = f16::NEG_ZERO, "(zero)");
        bad(&|q| q.zeros[7] = 16, "zero point 16 (group 1, row 3)");
        bad(&|q| q.codes[9] = 200, "code 200 (row 1, column 1)");
        bad(&|q| q.g_idx[6] = 2, "g_idx of column 6 is 2");
        // a negative scale is a legitimate (sign-folded) grid
        let mut q = layer();
        q.scales[1] = f16::from_f32(-0.25);
        assert!(check_uniform(&q).is_ok());
    }

    #[test]
    fn mixed_codes_zeros_and_widths_are_checked_per_width() {
        let (n, k) = (2, 5);
        let good = MixedQuantizedLinear {
            out_features: n,
            in_features: k,
            sym: false,
            widths: vec![0, 2, 3, 2, 0],
            group_size: None,
            codes: vec![0, 3, 7, 1, 0, 0, 2, 5, 0, 0],
            // groups: width 2, width 3
            scales: vec![f16::from_f32(0.1); 2 * n],
            zeros: vec![1, 2, 4, 7],
        };
        assert!(check_mixed(&good).is_ok());
        let bad = |f: &dyn Fn(&mut MixedQuantizedLinear), want: &str| {
            let mut q = good.clone();
            f(&mut q);
            let e = check_mixed(&q).unwrap_err().to_string();
            assert!(e.contains(want), "`{e}` lacks `{want}`");
        };
        bad(
            &|q| q.codes[1] = 4,
            "code 4 (row 0, column 1) does not fit the column's 2 bits",
        );
        bad(
            &|q| q.codes[4] = 1,
            "column 4) does not fit the column's 0 bits",
        );
        bad(
            &|q| q.zeros[1] = 4,
            "zero point 4 (range group 0, row 1) does not fit its 2 bits",
        );
        bad(&|q| q.widths[0] = 9, "column 0 has width 9");
        bad(&|q| q.scales[3] = f16::NAN, "not finite");
        // all pruned: nothing stored, nothing to check but the shapes
        let pruned = MixedQuantizedLinear {
            widths: vec![0; k],
            codes: vec![0; n * k],
            scales: vec![],
            zeros: vec![],
            ..good
        };
        assert!(check_mixed(&pruned).is_ok());
    }

    #[test]
    fn symmetric_zero_points_are_recognized() {
        assert_eq!(asymmetric_zero(&[8, 8, 8, 8], 2, |_| 4), None);
        assert_eq!(asymmetric_zero(&[8, 8, 8, 7], 2, |_| 4), Some((1, 1, 7)));
        assert_eq!(asymmetric_zero(&[2, 4], 1, |g| [2, 3][g]), None);
    }
}
