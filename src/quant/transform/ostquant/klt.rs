//! The KLT initialisation of `R1` (methods.md §6.1, §6.2 step 3): the eigenvectors of the
//! covariance of every row the residual stream is read by — q, k, v, gate and up of every
//! layer, with their norms folded in — followed by the random Hadamard. The KLT turns the
//! readers' columns to their principal axes; the Hadamard then spreads each axis' energy
//! over every column, so training starts from a basis fitted to the weights rather than
//! from a random one.

use super::base::base_layer;
use crate::loader::{ModelConfig, WeightStore};
use anyhow::{anyhow, Context, Result};
use candle_core::Device;
use faer::{Mat, Side};

/// The readers of the residual stream among a block's linears (`block_linears`' order:
/// q, k, v, o, gate, up, down).
const READERS: [usize; 5] = [0, 1, 2, 4, 5];

/// The KLT basis `E`, `[hidden, hidden]` row-major, orthogonal: column `j` is the `j`-th
/// principal axis of the readers' rows (largest variance first), so a reader `W` becomes
/// `W·E` in that basis.
pub fn weight_klt(c: &ModelConfig, store: &WeightStore) -> Result<Vec<f32>> {
    let h = c.hidden_size;
    // Σ rowᵀrow: each linear's Gram matrix by candle's f32 matmul (the O(rows·h²) part),
    // summed across linears and layers in f64
    let mut second_moment = vec![0f64; h * h];
    let mut row_sum = vec![0f64; h];
    let mut rows = 0usize;
    for l in 0..c.num_hidden_layers {
        let layer = base_layer(c, store, l, &Device::Cpu)
            .with_context(|| format!("the KLT of R1 reads layer {l}"))?;
        for i in READERS {
            let w = &layer.w[i];
            let gram: Vec<f32> = w.t()?.matmul(w)?.flatten_all()?.to_vec1()?;
            second_moment
                .iter_mut()
                .zip(&gram)
                .for_each(|(acc, g)| *acc += *g as f64);
            let sums: Vec<f32> = w.sum(0)?.to_vec1()?;
            row_sum.iter_mut().zip(&sums).for_each(|(acc, s)| *acc += *s as f64);
            rows += w.dim(0)?;
        }
    }
    // covariance up to a positive factor: Σ rowᵀrow − N μμᵀ
    let mean: Vec<f64> = row_sum.iter().map(|s| s / rows as f64).collect();
    let cov = Mat::<f64>::from_fn(h, h, |i, j| {
        second_moment[i * h + j] - rows as f64 * mean[i] * mean[j]
    });
    let eig = cov
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| anyhow!("the eigendecomposition of the readers' covariance failed: {e:?}"))?;
    let u = eig.U();
    // faer sorts eigenvalues ascending; the largest first reads better and costs nothing
    let mut e = vec![0f32; h * h];
    for i in 0..h {
        for j in 0..h {
            e[i * h + j] = u[(i, h - 1 - j)] as f32;
        }
    }
    Ok(e)
}

/// `a · b` for two `[n, n]` row-major matrices, accumulated in f64.
pub fn matmul_square(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let a = Mat::<f64>::from_fn(n, n, |i, j| a[i * n + j] as f64);
    let b = Mat::<f64>::from_fn(n, n, |i, j| b[i * n + j] as f64);
    let p = a * b;
    (0..n * n).map(|ij| p[(ij / n, ij % n)] as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_square_is_the_product() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [0.0, 1.0, -1.0, 0.5];
        assert_eq!(matmul_square(&a, &b, 2), vec![-2.0, 2.0, -4.0, 5.0]);
    }
}
