//! Parse-time checks of numeric options: clap `value_parser`s whose error names the valid
//! range, so a bad value stops the command before any model is loaded (`ppl --limit 0`
//! used to run and print NaN).

/// A whole number `≥ min`.
pub fn at_least(min: usize) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s| {
        let v: usize = s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a whole number (valid: {min} or more)"))?;
        if v < min {
            return Err(format!("{v} is too small (valid: {min} or more)"));
        }
        Ok(v)
    }
}

/// A whole number ≥ 1.
pub fn positive(s: &str) -> Result<usize, String> {
    at_least(1)(s)
}

/// A whole number ≥ 2 (a sequence length: one token predicts the next).
pub fn seqlen(s: &str) -> Result<usize, String> {
    at_least(2)(s)
}

fn finite(s: &str, range: &str) -> Result<f32, String> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number (valid: {range})"))?;
    if !v.is_finite() {
        return Err(format!("{s} is not finite (valid: {range})"));
    }
    Ok(v)
}

/// A sampling temperature: finite and ≥ 0 (0 = greedy).
pub fn temperature(s: &str) -> Result<f32, String> {
    const RANGE: &str = "a finite number ≥ 0; 0 = greedy";
    let v = finite(s, RANGE)?;
    if v < 0.0 {
        return Err(format!("{v} is negative (valid: {RANGE})"));
    }
    Ok(v)
}

/// A nucleus-sampling mass in (0, 1].
pub fn top_p(s: &str) -> Result<f32, String> {
    const RANGE: &str = "greater than 0 and at most 1";
    let v = finite(s, RANGE)?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("{v} is out of range (valid: {RANGE})"));
    }
    Ok(v)
}

/// A repetition penalty: finite and > 0 (1 = off).
pub fn penalty(s: &str) -> Result<f32, String> {
    const RANGE: &str = "a finite number > 0; 1 = off";
    let v = finite(s, RANGE)?;
    if v <= 0.0 {
        return Err(format!("{v} is out of range (valid: {RANGE})"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_accept_their_bounds_and_name_them_on_rejection() {
        assert_eq!(positive("1"), Ok(1));
        assert!(positive("0").unwrap_err().contains("1 or more"));
        assert!(positive("-3").unwrap_err().contains("not a whole number"));
        assert_eq!(seqlen("2"), Ok(2));
        assert!(seqlen("1").unwrap_err().contains("2 or more"));
        assert_eq!(temperature("0"), Ok(0.0));
        for bad in ["-0.1", "nan", "inf", "x"] {
            assert!(temperature(bad).unwrap_err().contains("≥ 0"), "{bad}");
        }
        assert_eq!(top_p("1"), Ok(1.0));
        for bad in ["0", "1.01", "-1", "nan"] {
            assert!(top_p(bad).unwrap_err().contains("at most 1"), "{bad}");
        }
        assert_eq!(penalty("1.2"), Ok(1.2));
        for bad in ["0", "-1", "inf"] {
            assert!(penalty(bad).unwrap_err().contains("> 0"), "{bad}");
        }
    }
}
