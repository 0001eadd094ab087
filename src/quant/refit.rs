//! Scales refit after rounding: once a rounding has chosen every code (and zero point),
//! the scales that minimise the layer's output error `tr(ΔW H ΔWᵀ)` for those codes solve a
//! small least-squares problem per output row — one unknown per group, since a weight is
//! `scale_g · (q − z)`. Solved exactly (float64 normal equations, `n_groups × n_groups`
//! per row), then each scale is rounded to the f16 it is stored as.

use super::grid::GroupParams;
use super::quantized::GridCodes;
use super::UniformGrid;
use anyhow::{ensure, Result};
use half::f16;
use rayon::prelude::*;

/// Refit every scale of `q` (codes and zero points fixed) to minimise
/// `Σ_rows (w − ŵ)ᵀ H (w − ŵ)` against the original `weight`. A row whose normal equations
/// are singular (a group of all-zero codes) keeps its scales; so does a row the refit would
/// not improve after rounding to f16.
pub fn refit_scales(q: &mut GridCodes<UniformGrid>, weight: &[f32], hessian: &[f32]) -> Result<()> {
    let (n, k, ng) = (q.out_features, q.in_features, q.n_groups());
    ensure!(
        weight.len() == n * k && hessian.len() == k * k,
        "refit: weight/Hessian sizes do not match {n}x{k}"
    );
    let h: Vec<f64> = hessian.iter().map(|&v| v as f64).collect();
    let g_idx = q.g_idx.clone();
    let new_params: Vec<Vec<GroupParams>> = (0..n)
        .into_par_iter()
        .map(|r| {
            let params: Vec<GroupParams> = (0..ng).map(|g| q.params[g * n + r]).collect();
            // a_j = q_j − z_g(j): the weight is scale_g · a_j
            let a: Vec<f64> = (0..k)
                .map(|j| {
                    let p = params[g_idx[j] as usize];
                    q.codes[r * k + j] as f64 - p.zero as f64
                })
                .collect();
            let w: Vec<f64> = weight[r * k..(r + 1) * k]
                .iter()
                .map(|&v| v as f64)
                .collect();
            // (H a) restricted per group: m_g = H · (a masked to group g); A[g][g'] = a_{g'}ᵀ m_g
            let mut ata = vec![0f64; ng * ng];
            let mut atw = vec![0f64; ng];
            let mut m = vec![0f64; k];
            for g in 0..ng {
                m.iter_mut().for_each(|v| *v = 0.0);
                for j in (0..k).filter(|&j| g_idx[j] as usize == g && a[j] != 0.0) {
                    let hj = &h[j * k..(j + 1) * k];
                    m.iter_mut().zip(hj).for_each(|(v, &x)| *v += a[j] * x);
                }
                atw[g] = m.iter().zip(&w).map(|(x, y)| x * y).sum();
                for (j, &mj) in m.iter().enumerate() {
                    ata[g * ng + g_idx[j] as usize] += mj * a[j];
                }
            }
            // the objective up to the constant wᵀHw: sᵀ A s − 2 sᵀ b
            let objective = |s: &[f64]| -> f64 {
                (0..ng)
                    .map(|g| {
                        s[g] * ((0..ng).map(|t| ata[g * ng + t] * s[t]).sum::<f64>() - 2.0 * atw[g])
                    })
                    .sum()
            };
            let Some(s) = solve_spd(&ata, &atw, ng) else {
                return params;
            };
            let refit: Vec<GroupParams> = params
                .iter()
                .zip(&s)
                .map(|(p, &s)| GroupParams {
                    scale: f16::from_f64(s).to_f32(),
                    zero: p.zero,
                })
                .collect();
            let old: Vec<f64> = params.iter().map(|p| p.scale as f64).collect();
            let new: Vec<f64> = refit.iter().map(|p| p.scale as f64).collect();
            let finite = refit.iter().all(|p| p.scale.is_finite() && p.scale != 0.0);
            if finite && objective(&new) < objective(&old) {
                refit
            } else {
                params
            }
        })
        .collect();
    for (r, ps) in new_params.into_iter().enumerate() {
        for (g, p) in ps.into_iter().enumerate() {
            q.params[g * n + r] = p;
        }
    }
    Ok(())
}

/// Solve `A x = b` for a symmetric positive definite `A` (`[n, n]`) by Cholesky; `None` when
/// `A` is singular.
fn solve_spd(a: &[f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s = a[i * n + j] - (0..j).map(|t| l[i * n + t] * l[j * n + t]).sum::<f64>();
            if i == j {
                if s <= 1e-300 {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    let mut y = vec![0f64; n];
    for i in 0..n {
        y[i] = (b[i] - (0..i).map(|t| l[i * n + t] * y[t]).sum::<f64>()) / l[i * n + i];
    }
    let mut x = vec![0f64; n];
    for i in (0..n).rev() {
        x[i] = (y[i] - (i + 1..n).map(|t| l[t * n + i] * x[t]).sum::<f64>()) / l[i * n + i];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Grid, GroupSize, LayerToQuantize, Rtn};

    #[test]
    fn refit_is_the_least_squares_optimum_for_fixed_codes() {
        let (n, k) = (6, 40);
        let mut x = 7u64;
        let mut rnd = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..n * k).map(|_| (rnd() * 0.1) as f32).collect();
        let m = 3 * k;
        let xs: Vec<f64> = (0..m * k)
            .map(|i| rnd() * (1.0 + (i % k) as f64 / 10.0))
            .collect();
        let h: Vec<f32> = (0..k * k)
            .map(|ij| {
                let (i, j) = (ij / k, ij % k);
                ((0..m).map(|t| xs[t * k + i] * xs[t * k + j]).sum::<f64>() / m as f64) as f32
            })
            .collect();
        for sym in [false, true] {
            let grid = UniformGrid::new(3, GroupSize::Columns(16), sym).unwrap();
            let layer = LayerToQuantize {
                name: "t",
                weight: &w,
                out_features: n,
                in_features: k,
                hessian: None,
            };
            let mut q = Rtn { grid }.round(&layer).unwrap();
            let before = q.clone();
            refit_scales(&mut q, &w, &h).unwrap();
            assert_eq!(q.codes, before.codes, "codes stay");
            let ng = q.n_groups();
            for r in 0..n {
                // float64 reference: least squares over the scales by brute-force normal
                // equations written from the definition (ŵ_j = s_g a_j)
                let a: Vec<f64> = (0..k)
                    .map(|j| q.codes[r * k + j] as f64 - q.params[(j / 16) * n + r].zero as f64)
                    .collect();
                let obj = |s: &[f64]| -> f64 {
                    let d: Vec<f64> = (0..k)
                        .map(|j| w[r * k + j] as f64 - s[j / 16] * a[j])
                        .collect();
                    (0..k)
                        .map(|i| d[i] * (0..k).map(|j| h[i * k + j] as f64 * d[j]).sum::<f64>())
                        .sum()
                };
                let got: Vec<f64> = (0..ng).map(|g| q.params[g * n + r].scale as f64).collect();
                let old: Vec<f64> = (0..ng)
                    .map(|g| before.params[g * n + r].scale as f64)
                    .collect();
                assert!(obj(&got) <= obj(&old), "row {r}: refit made it worse");
                // optimality: no scale can move by one f16 step and improve much
                for g in 0..ng {
                    for dir in [-1.0, 1.0] {
                        let mut s = got.clone();
                        s[g] += dir * s[g].abs() * 2f64.powi(-10);
                        assert!(
                            obj(&s) >= obj(&got) * (1.0 - 1e-3),
                            "row {r} group {g}: not a minimum"
                        );
                    }
                }
                // the stored scales are f16 values and decode exactly
                for g in 0..ng {
                    let s = q.params[g * n + r].scale;
                    assert_eq!(f16::from_f32(s).to_f32(), s);
                }
            }
            // dequantize uses the refit scales
            let d = q.dequantize();
            let p = q.params[0];
            assert_eq!(d[0], grid.decode(q.codes[0], &p, 0));
        }
    }
}
