//! Llama 3 RoPE scaling in GGUF: llama.cpp holds it as the tensor `rope_freqs.weight`, one
//! factor per rotary frequency that the frequency is divided by (`convert_hf_to_gguf.py`
//! computes it from `rope_scaling`; llama.cpp's rotary op divides by it). Export writes the
//! factors of a config's scaling; import fits the scaling back from the factors and refuses
//! factors that no Llama 3 scaling gives.
//!
//! Llama 3's factor is 1 for short wavelengths, `factor` for long ones, and in between
//! `1 / ((1 − s)/factor + s)` with `s = (L/λ − lo)/(hi − lo)` linear in `1/λ`. The factors
//! fix `factor` and the line `s(1/λ)` (slope `L/(hi − lo)`, intercept `−lo/(hi − lo)`), not
//! `L`, `lo` and `hi` apart: import takes `L` from `llama.rope.scaling.original_context_length`
//! when the file has it, else `lo = 1` (every Llama 3.x has), which gives the same
//! frequencies either way.

use crate::loader::RopeScaling;
use crate::model::rope::inverse_frequencies;
use anyhow::{bail, ensure, Result};

/// The factor of each of the `head_dim / 2` frequencies: unscaled ÷ scaled.
pub fn llama3_factors(head_dim: usize, theta: f64, s: &RopeScaling) -> Vec<f32> {
    let base = inverse_frequencies(head_dim, theta, None);
    let scaled = inverse_frequencies(head_dim, theta, Some(s));
    base.iter()
        .zip(&scaled)
        .map(|(&b, &x)| (b as f64 / x as f64) as f32)
        .collect()
}

/// Round `x` to an integer when it is within 1e-4 (relative) of one: the fit recovers
/// config values such as 8192 or 4.0 up to the f32 rounding of the stored factors.
fn snap(x: f64) -> f64 {
    let r = x.round();
    if r != 0.0 && ((x - r) / r).abs() < 1e-4 {
        r
    } else {
        x
    }
}

/// The Llama 3 scaling whose factors are `factors`, checked by recomputing them.
pub fn fit_llama3(
    head_dim: usize,
    theta: f64,
    factors: &[f32],
    original_context: Option<usize>,
) -> Result<RopeScaling> {
    ensure!(
        factors.len() == head_dim / 2,
        "rope_freqs holds {} factors; a head of {head_dim} has {} frequencies",
        factors.len(),
        head_dim / 2
    );
    ensure!(
        factors.iter().all(|f| f.is_finite() && *f >= 1.0 - 1e-6),
        "rope_freqs holds factors below 1 or not finite: not Llama 3's scaling"
    );
    let factor = factors.iter().fold(1f64, |m, &f| m.max(f as f64));
    let base = inverse_frequencies(head_dim, theta, None);
    // (1/λ, s) of the frequencies between the two plateaus
    let tol = 1e-5;
    let medium: Vec<(f64, f64)> = base
        .iter()
        .zip(factors)
        .filter(|(_, &f)| (f as f64) > 1.0 + tol && (f as f64) < factor * (1.0 - tol))
        .map(|(&b, &f)| {
            let inv_wavelen = b as f64 / (2.0 * std::f64::consts::PI);
            let s = (1.0 / f as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
            (inv_wavelen, s)
        })
        .collect();
    let s = if medium.len() >= 2 && factor > 1.0 {
        // least squares for s = a·(1/λ) + b
        let n = medium.len() as f64;
        let (mx, my) = medium
            .iter()
            .fold((0.0, 0.0), |(x, y), (a, b)| (x + a / n, y + b / n));
        let (sxy, sxx) = medium.iter().fold((0.0, 0.0), |(sxy, sxx), (x, y)| {
            (sxy + (x - mx) * (y - my), sxx + (x - mx) * (x - mx))
        });
        let a = sxy / sxx;
        let b = my - a * mx;
        ensure!(
            a > 0.0 && b < 0.0,
            "rope_freqs' transition is not Llama 3's (slope {a}, intercept {b})"
        );
        // a = L/(hi − lo), b = −lo/(hi − lo)
        let (l, lo) = match original_context {
            Some(l) => (l as f64, -b * l as f64 / a),
            None => (-a / b, 1.0),
        };
        let l = snap(l);
        let lo = snap(lo);
        RopeScaling {
            factor: snap(factor),
            low_freq_factor: lo,
            high_freq_factor: snap(lo + l / a),
            original_max_position_embeddings: l.round() as usize,
        }
    } else {
        // too few frequencies in the transition to fit it: Llama 3.x's own values
        RopeScaling {
            factor: snap(factor),
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: original_context.unwrap_or(8192),
        }
    };
    let worst = llama3_factors(head_dim, theta, &s)
        .iter()
        .zip(factors)
        .map(|(x, f)| ((x - f) / f).abs())
        .fold(0f32, f32::max);
    if worst >= 1e-5 {
        bail!(
            "rope_freqs' {} factors (1 to {factor}) are not a Llama 3 scaling bitsmith can \
             recover (the closest is off by {worst:e})",
            factors.len()
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama31() -> RopeScaling {
        RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }

    #[test]
    fn factors_are_one_then_smooth_then_factor() {
        let f = llama3_factors(128, 500000.0, &llama31());
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert!((f[63] - 8.0).abs() < 1e-5);
        assert!(f.windows(2).all(|w| w[1] >= w[0]));
        // a value of the transition, by hand: 1/((1 − s)/8 + s)
        let i = f.iter().position(|&x| x > 1.0 && x < 8.0).unwrap();
        let freq = 1.0 / 500000f64.powf(2.0 * i as f64 / 128.0);
        let s = (8192.0 * freq / (2.0 * std::f64::consts::PI) - 1.0) / 3.0;
        assert!((f[i] as f64 - 1.0 / ((1.0 - s) / 8.0 + s)).abs() < 1e-5);
    }

    #[test]
    fn the_fit_recovers_llama_3_1_and_3_2() {
        for (head_dim, s) in [
            (128, llama31()),
            (
                64,
                RopeScaling {
                    factor: 32.0,
                    ..llama31()
                },
            ),
        ] {
            let f = llama3_factors(head_dim, 500000.0, &s);
            assert_eq!(fit_llama3(head_dim, 500000.0, &f, None).unwrap(), s);
            assert_eq!(fit_llama3(head_dim, 500000.0, &f, Some(8192)).unwrap(), s);
        }
        // another low-frequency factor: the same frequencies, whichever way written
        let odd = RopeScaling {
            factor: 16.0,
            low_freq_factor: 2.0,
            high_freq_factor: 8.0,
            original_max_position_embeddings: 16384,
        };
        let f = llama3_factors(128, 500000.0, &odd);
        assert_eq!(fit_llama3(128, 500000.0, &f, Some(16384)).unwrap(), odd);
        let any = fit_llama3(128, 500000.0, &f, None).unwrap();
        let g = llama3_factors(128, 500000.0, &any);
        assert!(f.iter().zip(&g).all(|(a, b)| ((a - b) / a).abs() < 1e-5));
    }

    #[test]
    fn factors_no_llama_3_scaling_gives_are_refused() {
        let mut f = llama3_factors(128, 500000.0, &llama31());
        f[40] *= 1.5;
        assert!(fit_llama3(128, 500000.0, &f, None).is_err());
        assert!(fit_llama3(128, 500000.0, &f[..10], None).is_err());
        assert!(fit_llama3(128, 500000.0, &[0.5; 64], None).is_err());
    }
}
