//! `e^x` as a polynomial, and the two loops of a forward pass that call it once per
//! element: the softmax of attention scores and SwiGLU's `silu(gate) · up`. libm's `expf`
//! is a scalar call; on a 576-wide model these two loops took a quarter of a 2048-token
//! prefill before they were vectorized (AVX-512 detected at run time, the same polynomial
//! in portable Rust otherwise).

/// `e^x` for `x ≤ 88` (softmax and SiLU arguments): Cephes' expf polynomial after
/// `x = n·ln 2 + r`, relative error ≈ 1e-7 (`tests::exp_poly_matches_exp`); arguments
/// below −87 give `e^−87` (≈ 1.6e-38, not 0).
#[inline(always)]
pub(crate) fn exp_poly(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI + n * LN2_LO;
    let p = EXP_POLY[0];
    let p = p * r + EXP_POLY[1];
    let p = p * r + EXP_POLY[2];
    let p = p * r + EXP_POLY[3];
    let p = p * r + EXP_POLY[4];
    let p = p * r + EXP_POLY[5];
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `ln 2 = LN2_HI − LN2_LO`, split so that `n·LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = 2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `row ← softmax(row)` in place (max subtracted first).
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above.
        unsafe { avx512::softmax_in_place(row) };
        return;
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = exp_poly(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// `out[i] = silu(gate[i]) · up[i]` with `silu(g) = g / (1 + e^−g)`.
pub(crate) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above; the lengths are equal.
        unsafe { avx512::silu_mul(gate, up, out) };
        return;
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp_poly(-g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{EXP_POLY, LN2_HI, LN2_LO};
    use std::arch::x86_64::*;

    /// [`super::exp_poly`] on 16 lanes; `2^n` applied by `vscalefps`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
            _mm512_set1_ps(88.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(
            _mm512_fmadd_ps(
                x,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
                _mm512_set1_ps(0.5),
            ),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(e, n)
    }

    /// Lanes `0..n` set (`n ≤ 16`).
    fn tail_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_in_place(row: &mut [f32]) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let (full, rest) = (n / 16 * 16, n % 16);
        let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(16) {
            vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p.add(i)));
        }
        if rest > 0 {
            let t = _mm512_mask_loadu_ps(vmax, tail_mask(rest), p.add(full));
            vmax = _mm512_max_ps(vmax, t);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        let mut vsum = _mm512_setzero_ps();
        for i in (0..full).step_by(16) {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
            _mm512_storeu_ps(p.add(i), e);
            vsum = _mm512_add_ps(vsum, e);
        }
        if rest > 0 {
            let m = tail_mask(rest);
            let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(full)), max));
            _mm512_mask_storeu_ps(p.add(full), m, e);
            vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vsum));
        for i in (0..full).step_by(16) {
            _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
        }
        if rest > 0 {
            let m = tail_mask(rest);
            let t = _mm512_maskz_loadu_ps(m, p.add(full));
            _mm512_mask_storeu_ps(p.add(full), m, _mm512_mul_ps(t, inv));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len();
        let (g, u, o) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
        let one = _mm512_set1_ps(1.0);
        let zero = _mm512_setzero_ps();
        let step = |gv: __m512, uv: __m512| -> __m512 {
            let e = exp16(_mm512_sub_ps(zero, gv));
            _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), uv)
        };
        let full = n / 16 * 16;
        for i in (0..full).step_by(16) {
            let y = step(_mm512_loadu_ps(g.add(i)), _mm512_loadu_ps(u.add(i)));
            _mm512_storeu_ps(o.add(i), y);
        }
        if n > full {
            let m = tail_mask(n - full);
            let y = step(
                _mm512_maskz_loadu_ps(m, g.add(full)),
                _mm512_maskz_loadu_ps(m, u.add(full)),
            );
            _mm512_mask_storeu_ps(o.add(full), m, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform in [0, 1).
    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut rng = crate::util::SplitMix64::new(seed);
        move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    #[test]
    fn exp_poly_matches_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let rel = (exp_poly(x) as f64 - want).abs() / want;
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "exp_poly relative error {worst}");
    }

    #[test]
    fn softmax_matches_float64_on_every_tail_length() {
        let mut r = uniform(7);
        for n in [1, 5, 15, 16, 17, 31, 64, 100, 1000] {
            let x: Vec<f32> = (0..n).map(|_| r() * 40.0 - 30.0).collect();
            let mut got = x.clone();
            softmax_in_place(&mut got);
            let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            for (g, w) in got.iter().zip(&e) {
                let w = w / s;
                assert!(
                    (*g as f64 - w).abs() <= 1e-6 * w + 1e-12,
                    "n={n}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn silu_mul_matches_float64_on_every_tail_length() {
        let mut r = uniform(11);
        for n in [1, 7, 16, 33, 1536] {
            let g: Vec<f32> = (0..n).map(|_| r() * 200.0 - 100.0).collect();
            let u: Vec<f32> = (0..n).map(|_| r() * 4.0 - 2.0).collect();
            let mut out = vec![0f32; n];
            silu_mul(&g, &u, &mut out);
            for i in 0..n {
                let (gd, ud) = (g[i] as f64, u[i] as f64);
                let want = gd / (1.0 + (-gd).exp()) * ud;
                let tol = 1e-6 * want.abs() + 1e-30;
                assert!(
                    (out[i] as f64 - want).abs() <= tol,
                    "n={n} i={i}: silu({}) · {} = {} vs {want}",
                    g[i],
                    u[i],
                    out[i]
                );
            }
        }
    }
}
