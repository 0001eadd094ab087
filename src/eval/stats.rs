//! Summaries over windows and tokens: means with their standard errors, quantiles.

/// Arithmetic mean (NaN for no values).
pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Standard error of the mean, `s / √n` with the n−1 sample deviation: the spread a mean
/// over these windows would show over other windows of the same text. `None` below two
/// values.
pub fn standard_error(xs: &[f64]) -> Option<f64> {
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let m = mean(xs);
    let var = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
    Some((var / n as f64).sqrt())
}

/// The `q` quantile of ascending `sorted` values, interpolating linearly between the two
/// nearest ranks (numpy's default); NaN for no values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (pos - lo as f64) * (sorted[hi] - sorted[lo])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let xs = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(mean(&xs), 2.5);
        // sample variance 5/3, over n = 4
        assert!((standard_error(&xs).unwrap() - (5.0f64 / 12.0).sqrt()).abs() < 1e-15);
        assert_eq!(standard_error(&[1.0]), None);
        assert_eq!(quantile(&xs, 0.5), 2.5);
        assert_eq!(quantile(&xs, 1.0), 4.0);
        assert!((quantile(&xs, 0.99) - 3.97).abs() < 1e-12);
        assert_eq!(quantile(&[7.0], 0.3), 7.0);
    }
}
