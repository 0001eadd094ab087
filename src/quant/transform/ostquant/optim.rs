//! OSTQuant's optimisers (methods.md §6.4): Riemannian Adam on the orthogonal group for
//! the rotations (canonical metric, Cayley retraction, first moment transported by the
//! same Cayley map, one second-moment scalar per matrix, polar re-orthonormalisation every
//! 10 steps) and plain Adam for the scaling vectors. Rotations are small (`d × d`, and
//! `head_dim × head_dim` per KV head), so the linear algebra runs in f64 on the host.

use rayon::prelude::*;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
/// Steps between re-orthonormalisations (round-off drifts a rotation off the manifold).
const POLAR_EVERY: u64 = 10;

/// `a · b` for row-major `[n, n]` matrices.
fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * n];
    out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (k, &aik) in a[i * n..(i + 1) * n].iter().enumerate() {
            if aik != 0.0 {
                row.iter_mut()
                    .zip(&b[k * n..(k + 1) * n])
                    .for_each(|(o, &bkj)| *o += aik * bkj);
            }
        }
    });
    out
}

fn transpose(a: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = a[i * n + j];
        }
    }
    t
}

/// Solve `m · X = rhs` (`[n, n]` each) by Gaussian elimination with partial pivoting.
fn solve(mut m: Vec<f64>, mut rhs: Vec<f64>, n: usize) -> Vec<f64> {
    for c in 0..n {
        let p = (c..n)
            .max_by(|&a, &b| m[a * n + c].abs().total_cmp(&m[b * n + c].abs()))
            .unwrap_or(c);
        if p != c {
            for j in 0..n {
                m.swap(c * n + j, p * n + j);
                rhs.swap(c * n + j, p * n + j);
            }
        }
        let pivot = m[c * n + c];
        let (head, tail) = m.split_at_mut((c + 1) * n);
        let (rhead, rtail) = rhs.split_at_mut((c + 1) * n);
        let prow = &head[c * n..];
        let rrow = &rhead[c * n..];
        tail.par_chunks_mut(n)
            .zip(rtail.par_chunks_mut(n))
            .for_each(|(row, rr)| {
                let f = row[c] / pivot;
                if f != 0.0 {
                    row[c..]
                        .iter_mut()
                        .zip(&prow[c..])
                        .for_each(|(v, p)| *v -= f * p);
                    rr.iter_mut().zip(rrow).for_each(|(v, p)| *v -= f * p);
                }
            });
    }
    // back substitution, all right-hand sides at once
    for c in (0..n).rev() {
        let pivot = m[c * n + c];
        let row: Vec<f64> = rhs[c * n..(c + 1) * n].iter().map(|v| v / pivot).collect();
        rhs[c * n..(c + 1) * n].copy_from_slice(&row);
        for i in 0..c {
            let f = m[i * n + c];
            if f != 0.0 {
                rhs[i * n..(i + 1) * n]
                    .iter_mut()
                    .zip(&row)
                    .for_each(|(v, r)| *v -= f * r);
            }
        }
    }
    rhs
}

/// `X ← X (3I − XᵀX) / 2`, three times: the polar factor of a nearly orthogonal `X`.
fn reorthonormalise(x: &mut [f64], n: usize) {
    for _ in 0..3 {
        let xtx = matmul(&transpose(x, n), x, n);
        let mut m = xtx.iter().map(|v| -0.5 * v).collect::<Vec<_>>();
        (0..n).for_each(|i| m[i * n + i] += 1.5);
        let next = matmul(x, &m, n);
        x.copy_from_slice(&next);
    }
}

/// Riemannian Adam state of one `n × n` rotation.
#[derive(Debug, Clone)]
pub struct StiefelAdam {
    pub n: usize,
    /// First moment (a tangent vector at the current point).
    pub m: Vec<f64>,
    /// Second moment: one scalar per matrix.
    pub v: f64,
    pub t: u64,
}

impl StiefelAdam {
    pub fn new(n: usize) -> Self {
        Self {
            n,
            m: vec![0.0; n * n],
            v: 0.0,
            t: 0,
        }
    }

    /// One step of the rotation `x` (row-major f32, orthogonal) along the Euclidean
    /// gradient `g` with learning rate `lr`.
    pub fn step(&mut self, x: &mut [f32], g: &[f32], lr: f64) {
        let n = self.n;
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let gd: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        // ξ = G − X Gᵀ X, the Riemannian gradient under the canonical metric
        let xgtx = matmul(&matmul(&xd, &transpose(&gd, n), n), &xd, n);
        let xi: Vec<f64> = gd.iter().zip(&xgtx).map(|(g, h)| g - h).collect();
        // its canonical squared norm tr(ξᵀξ) − ½ tr(ξᵀ X Xᵀ ξ)
        let xt_xi = matmul(&transpose(&xd, n), &xi, n);
        let sq =
            xi.iter().map(|v| v * v).sum::<f64>() - 0.5 * xt_xi.iter().map(|v| v * v).sum::<f64>();
        self.t += 1;
        self.m
            .iter_mut()
            .zip(&xi)
            .for_each(|(m, g)| *m = BETA1 * *m + (1.0 - BETA1) * g);
        self.v = BETA2 * self.v + (1.0 - BETA2) * sq;
        let m_hat = 1.0 / (1.0 - BETA1.powi(self.t as i32));
        let v_hat = self.v / (1.0 - BETA2.powi(self.t as i32));
        let step = -lr * m_hat / (v_hat.sqrt() + EPS);
        // U = −lr · d; A = U Xᵀ − X Uᵀ (skew-symmetric)
        let u: Vec<f64> = self.m.iter().map(|m| step * m).collect();
        let uxt = matmul(&u, &transpose(&xd, n), n);
        let a: Vec<f64> = (0..n * n)
            .map(|ij| uxt[ij] - uxt[(ij % n) * n + ij / n])
            .collect();
        // C = (I − A/2)⁻¹ (I + A/2): orthogonal for any skew A
        let mut lhs: Vec<f64> = a.iter().map(|v| -0.5 * v).collect();
        let mut rhs: Vec<f64> = a.iter().map(|v| 0.5 * v).collect();
        for i in 0..n {
            lhs[i * n + i] += 1.0;
            rhs[i * n + i] += 1.0;
        }
        let c = solve(lhs, rhs, n);
        let mut next = matmul(&c, &xd, n);
        self.m = matmul(&c, &self.m, n);
        if self.t.is_multiple_of(POLAR_EVERY) {
            reorthonormalise(&mut next, n);
        }
        x.iter_mut().zip(&next).for_each(|(x, v)| *x = *v as f32);
    }
}

/// Adam state of one vector parameter.
#[derive(Debug, Clone)]
pub struct Adam {
    pub m: Vec<f64>,
    pub v: Vec<f64>,
    pub t: u64,
}

impl Adam {
    pub fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    pub fn step(&mut self, x: &mut [f32], g: &[f32], lr: f64) {
        self.t += 1;
        let c1 = 1.0 - BETA1.powi(self.t as i32);
        let c2 = 1.0 - BETA2.powi(self.t as i32);
        for (((x, &g), m), v) in x.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            let g = g as f64;
            *m = BETA1 * *m + (1.0 - BETA1) * g;
            *v = BETA2 * *v + (1.0 - BETA2) * g * g;
            *x -= (lr * (*m / c1) / ((*v / c2).sqrt() + EPS)) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::transform::ostquant::params::random_hadamard;

    fn orthogonality_error(x: &[f32], n: usize) -> f64 {
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let xtx = matmul(&transpose(&xd, n), &xd, n);
        (0..n * n)
            .map(|ij| (xtx[ij] - f64::from(ij / n == ij % n)).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn cayley_steps_stay_orthogonal_and_descend() {
        // minimise ‖X − T‖² over rotations: the gradient is 2 (X − T)
        let n = 24;
        let mut x = random_hadamard(n, 5).unwrap();
        let target = {
            let mut t = vec![0f32; n * n];
            (0..n).for_each(|i| t[i * n + (i + 1) % n] = 1.0);
            t
        };
        let dist = |x: &[f32]| -> f64 {
            x.iter()
                .zip(&target)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        let start = dist(&x);
        let mut opt = StiefelAdam::new(n);
        for _ in 0..60 {
            let g: Vec<f32> = x.iter().zip(&target).map(|(a, b)| 2.0 * (a - b)).collect();
            opt.step(&mut x, &g, 0.05);
            assert!(
                orthogonality_error(&x, n) < 1e-5,
                "{}",
                orthogonality_error(&x, n)
            );
        }
        assert!(dist(&x) < 0.5 * start, "{} → {}", start, dist(&x));
    }

    #[test]
    fn solve_inverts() {
        let n = 5;
        let m: Vec<f64> = (0..n * n)
            .map(|ij| ((ij * 37 % 11) as f64) - 5.0 + if ij % 6 == 0 { 9.0 } else { 0.0 })
            .collect();
        let b: Vec<f64> = (0..n * n).map(|ij| (ij % 7) as f64).collect();
        let x = solve(m.clone(), b.clone(), n);
        let back = matmul(&m, &x, n);
        for (u, v) in back.iter().zip(&b) {
            assert!((u - v).abs() < 1e-9);
        }
    }
}
