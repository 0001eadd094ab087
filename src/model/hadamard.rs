//! Hadamard matrices of the orders transformer widths need, and their fast application.
//!
//! An order `n = 2^k · m` is built as `H_{2^k} ⊗ H_m`: Sylvester's `H_{2^k}` (applied by the
//! fast Walsh–Hadamard transform) times a small dense `H_m` from a Paley construction
//! (m = q + 1 for a prime q ≡ 3 mod 4, m = 2(q + 1) for a prime q ≡ 1 mod 4). That covers
//! 576 = 16·36, 1536 = 128·12, 896 = 32·28, 960 = 16·60, 5120 = 256·20 and every power of
//! two; an order with no such factorisation is an error naming it.

use anyhow::{bail, Result};

/// A Hadamard matrix `H` of order `n = 2^k · m` (entries ±1, `H Hᵀ = n I`).
#[derive(Debug, Clone, PartialEq)]
pub struct Hadamard {
    /// `2^k`, the Sylvester factor.
    pow2: usize,
    /// The dense factor `H_m`, row-major `[m, m]` (`[1]` when `n` is a power of two).
    small: Vec<f32>,
    m: usize,
}

impl Hadamard {
    /// The Hadamard matrix of order `n`, or an error when no construction here reaches it.
    pub fn new(n: usize) -> Result<Self> {
        if n == 0 {
            bail!("a Hadamard matrix needs a positive order");
        }
        // the largest power-of-two factor whose cofactor has a construction
        let mut pow2 = 1usize << n.trailing_zeros();
        while pow2 >= 1 {
            let m = n / pow2;
            if let Some(small) = small_hadamard(m) {
                return Ok(Self { pow2, small, m });
            }
            pow2 /= 2;
        }
        bail!(
            "no Hadamard matrix of order {n} can be built here (orders 2^k·m with m = 1, 2, q+1 \
             for a prime q ≡ 3 mod 4, or 2(q+1) for a prime q ≡ 1 mod 4)"
        )
    }

    pub fn order(&self) -> usize {
        self.pow2 * self.m
    }

    /// `(p, m)`: `H = H_p ⊗ H_m`, `p` a power of two.
    pub fn factors(&self) -> (usize, usize) {
        (self.pow2, self.m)
    }

    /// The dense factor `H_m`, row-major `[m, m]`.
    pub fn small_factor(&self) -> &[f32] {
        &self.small
    }

    /// Dense `H` (row-major), for tests and small orders.
    pub fn dense(&self) -> Vec<f32> {
        let n = self.order();
        let mut out = vec![0f32; n * n];
        for i in 0..n {
            let mut e = vec![0f32; n];
            e[i] = 1.0;
            self.apply_row(&mut e);
            out[i * n..(i + 1) * n].copy_from_slice(&e);
        }
        out
    }

    /// `x ← x H` for one row vector of length `n` (unnormalised).
    pub fn apply_row(&self, x: &mut [f32]) {
        let (p, m) = (self.pow2, self.m);
        debug_assert_eq!(x.len(), p * m);
        // x is [p, m] row-major: (x (A ⊗ B))[a'm + b'] = Σ A[a, a'] x[a m + b] B[b, b'];
        // Sylvester's A is symmetric, so the first factor is a FWHT down each column
        if m > 1 {
            let mut tmp = vec![0f32; m];
            for row in x.chunks_exact_mut(m) {
                tmp.iter_mut().for_each(|t| *t = 0.0);
                for (b, &xb) in row.iter().enumerate() {
                    let hb = &self.small[b * m..(b + 1) * m];
                    tmp.iter_mut().zip(hb).for_each(|(t, &h)| *t += xb * h);
                }
                row.copy_from_slice(&tmp);
            }
        }
        let mut h = 1;
        while h < p {
            for i in (0..p).step_by(2 * h) {
                for j in i..i + h {
                    for c in 0..m {
                        let (a, b) = (x[j * m + c], x[(j + h) * m + c]);
                        x[j * m + c] = a + b;
                        x[(j + h) * m + c] = a - b;
                    }
                }
            }
            h *= 2;
        }
    }
}

/// A dense Hadamard matrix of order `m` (row-major), if `m` is 1, 2 or a Paley order.
fn small_hadamard(m: usize) -> Option<Vec<f32>> {
    match m {
        1 => Some(vec![1.0]),
        2 => Some(vec![1.0, 1.0, 1.0, -1.0]),
        m if m % 4 != 0 => None,
        m => {
            let h = if is_prime(m - 1) && (m - 1) % 4 == 3 {
                paley1(m - 1)
            } else if m % 2 == 0 && is_prime(m / 2 - 1) && (m / 2 - 1) % 4 == 1 {
                paley2(m / 2 - 1)
            } else {
                return None;
            };
            // the constructions are classical; check anyway, it costs O(m³) once
            is_hadamard(&h, m).then_some(h)
        }
    }
}

fn is_prime(q: usize) -> bool {
    q >= 2
        && (2..)
            .take_while(|d| d * d <= q)
            .all(|d| !q.is_multiple_of(d))
}

/// Legendre symbol χ(a) over GF(q), q an odd prime.
fn chi(a: usize, q: usize) -> i32 {
    let a = a % q;
    if a == 0 {
        return 0;
    }
    // a^((q-1)/2) mod q is 1 for squares, q-1 otherwise
    let (mut r, mut b, mut e) = (1u64, a as u64, (q - 1) / 2);
    while e > 0 {
        if e & 1 == 1 {
            r = r * b % q as u64;
        }
        b = b * b % q as u64;
        e >>= 1;
    }
    if r == 1 {
        1
    } else {
        -1
    }
}

/// Jacobsthal matrix `Q[i][j] = χ(j − i)`.
fn jacobsthal(q: usize) -> Vec<i32> {
    (0..q * q).map(|ij| chi(q + ij % q - ij / q, q)).collect()
}

/// Paley I, order q + 1 (q ≡ 3 mod 4): `H = I + [[0, 1ᵀ], [−1, Q]]`.
fn paley1(q: usize) -> Vec<f32> {
    let (m, jq) = (q + 1, jacobsthal(q));
    let mut h = vec![0f32; m * m];
    for i in 0..m {
        for j in 0..m {
            let s = match (i, j) {
                (0, 0) => 0,
                (0, _) => 1,
                (_, 0) => -1,
                _ => jq[(i - 1) * q + (j - 1)],
            };
            h[i * m + j] = (s + i32::from(i == j)) as f32;
        }
    }
    h
}

/// Paley II, order 2(q + 1) (q ≡ 1 mod 4): the symmetric conference matrix
/// `C = [[0, 1ᵀ], [1, Q]]`, each 0 replaced by `[[1, −1], [−1, −1]]` and each ±1 by
/// `±[[1, 1], [1, −1]]`.
fn paley2(q: usize) -> Vec<f32> {
    let (c, jq) = (q + 1, jacobsthal(q));
    let m = 2 * c;
    let mut h = vec![0f32; m * m];
    for i in 0..c {
        for j in 0..c {
            let s = match (i, j) {
                (0, 0) => 0,
                (0, _) | (_, 0) => 1,
                _ => jq[(i - 1) * q + (j - 1)],
            };
            let block: [[i32; 2]; 2] = if s == 0 {
                [[1, -1], [-1, -1]]
            } else {
                [[s, s], [s, -s]]
            };
            for (a, row) in block.iter().enumerate() {
                for (b, &v) in row.iter().enumerate() {
                    h[(2 * i + a) * m + 2 * j + b] = v as f32;
                }
            }
        }
    }
    h
}

/// `H Hᵀ = m I` exactly (small integer arithmetic in f32 is exact).
fn is_hadamard(h: &[f32], m: usize) -> bool {
    (0..m).all(|i| {
        (0..m).all(|j| {
            let d: f32 = (0..m).map(|t| h[i * m + t] * h[j * m + t]).sum();
            d == if i == j { m as f32 } else { 0.0 }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_of_transformer_widths_are_orthogonal() {
        for n in [1, 2, 4, 12, 20, 28, 36, 44, 60, 64, 96, 576, 896, 960, 1536] {
            let h = Hadamard::new(n).unwrap_or_else(|e| panic!("order {n}: {e}"));
            assert_eq!(h.order(), n);
            let d = h.dense();
            assert!(
                d.iter().all(|&v| v == 1.0 || v == -1.0),
                "order {n}: entries ±1"
            );
            for i in 0..n {
                for j in 0..n {
                    let dot: f64 = (0..n).map(|t| (d[i * n + t] * d[j * n + t]) as f64).sum();
                    let want = if i == j { n as f64 } else { 0.0 };
                    assert_eq!(dot, want, "order {n}: rows {i}, {j}");
                }
            }
        }
    }

    #[test]
    fn fast_application_equals_dense_product() {
        let n = 576;
        let h = Hadamard::new(n).unwrap();
        let d = h.dense();
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
            .collect();
        let want: Vec<f64> = (0..n)
            .map(|j| (0..n).map(|i| x[i] as f64 * d[i * n + j] as f64).sum())
            .collect();
        let mut got = x.clone();
        h.apply_row(&mut got);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() <= 1e-3 * (1.0 + w.abs()),
                "{g} vs {w}"
            );
        }
    }

    #[test]
    fn unreachable_orders_are_named() {
        for n in [6, 172] {
            let e = Hadamard::new(n).unwrap_err().to_string();
            assert!(e.contains(&format!("order {n}")), "{e}");
        }
    }
}
