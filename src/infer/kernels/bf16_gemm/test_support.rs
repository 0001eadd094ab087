//! What both kernels' tests share: random bf16 operands and the float64 reference.

use half::bf16;

/// `len` bf16 bit patterns uniform in [−2, 2).
pub(super) fn random_bf16(len: usize, seed: u64) -> Vec<u16> {
    let mut rng = crate::util::SplitMix64::new(seed);
    (0..len)
        .map(|_| {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            bf16::from_f32((u - 0.5) * 4.0).to_bits()
        })
        .collect()
}

/// Panics unless every `y[r, j]` is `x[r]·w[j]` to f32 summation and one bf16 rounding.
pub(super) fn assert_matches_float64(w: &[u16], n: usize, k: usize, x: &[u16], m: usize, y: &[u16]) {
    let f = |b: u16| bf16::from_bits(b).to_f64();
    for r in 0..m {
        for j in 0..n {
            let (mut dot, mut mag) = (0f64, 0f64);
            for t in 0..k {
                let p = f(x[r * k + t]) * f(w[j * k + t]);
                dot += p;
                mag += p.abs();
            }
            // products of bf16 values are exact in f32; the f32 sums round (in any order),
            // then the result once to bf16 (half an ulp: up to 2⁻⁸ relative)
            let tol = mag * k as f64 * f32::EPSILON as f64 + dot.abs() / 256.0 + 1e-30;
            let got = f(y[r * n + j]);
            assert!(
                (got - dot).abs() <= tol,
                "m{m} n{n} k{k} [{r},{j}]: {got} vs {dot} (tol {tol})"
            );
        }
    }
}
