//! Online ops: a transform that cannot be folded into weights runs on activations.
//! OSTQuant's `R4` rotates the MLP activation by `M = H / √n` before `down_proj` (whose
//! weight holds the other half, `W M`), which spreads the activation's outliers over all
//! channels so that `down_proj`'s weight — rotated the same way — quantizes better.
//!
//! Two implementations of the same `M`: [`OnlineHadamard::apply_row`] on host slices (the
//! fast Walsh–Hadamard transform, for the fused decode step and, row by row, for a CPU
//! tensor outside autograd: prefill) and, in [`OnlineHadamard::forward`], two small dense
//! products on candle tensors (differentiable and device-independent: training); on a CUDA
//! or Metal device outside training, one launch of `kernels/bitsmith_hadamard.{cu,metal}`
//! (see `online_gpu.rs`; the Metal half never compiled, macOS only).

use super::hadamard::Hadamard;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// `x ← x H / √n` on the last axis.
#[derive(Debug, Clone)]
pub struct OnlineHadamard {
    hadamard: Hadamard,
    /// The dense Sylvester factor `[p, p]` and the small factor `[m, m]` (scaled by
    /// `1/√n`), in the model's dtype.
    pow2: Tensor,
    small: Tensor,
}

impl OnlineHadamard {
    pub fn new(n: usize, dtype: DType, device: &Device) -> Result<Self> {
        let hadamard =
            Hadamard::new(n).with_context(|| format!("the online Hadamard of order {n}"))?;
        let (p, m) = hadamard.factors();
        let pow2 = Hadamard::new(p)?.dense();
        let scale = 1.0 / (n as f32).sqrt();
        let small: Vec<f32> = hadamard.small_factor().iter().map(|v| v * scale).collect();
        Ok(Self {
            pow2: Tensor::from_vec(pow2, (p, p), device)?.to_dtype(dtype)?,
            small: Tensor::from_vec(small, (m, m), device)?.to_dtype(dtype)?,
            hadamard,
        })
    }

    pub fn order(&self) -> usize {
        self.hadamard.order()
    }

    /// `x H / √n` for `x` `[..., n]` (any leading shape), in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n = self.order();
        let (p, m) = self.hadamard.factors();
        anyhow::ensure!(
            dims.last() == Some(&n),
            "the online Hadamard of order {n} got an input of shape {dims:?}"
        );
        let rows = x.elem_count() / n;
        // inference on a CUDA device: one fused launch (training keeps the differentiable
        // tensor route below)
        #[cfg(any(feature = "cuda", feature = "metal"))]
        if (x.device().is_cuda() || x.device().is_metal()) && !x.track_op() {
            return super::online_gpu::forward(x, &self.small, p, m);
        }
        // inference on the CPU: the fast transform on host rows, one rayon task per row
        // chunk (O(n·(log p + m)) per row against the dense products' O(n·(p + m)))
        if x.device().is_cpu() && !x.track_op() {
            return self.forward_host(x, rows);
        }
        // x as [rows·p, m] · H_m, then [rows, m, p] · H_p (Sylvester's H_p is symmetric)
        let y = x
            .reshape((rows * p, m))?
            .matmul(&self.small.to_dtype(x.dtype())?)?;
        let y = y
            .reshape((rows, p, m))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows * m, p))?
            .matmul(&self.pow2.to_dtype(x.dtype())?)?;
        let y = y.reshape((rows, m, p))?.transpose(1, 2)?.contiguous()?;
        Ok(y.reshape(dims)?)
    }

    /// [`Self::forward`] on a CPU tensor outside autograd, through [`Self::apply_row`].
    fn forward_host(&self, x: &Tensor, rows: usize) -> Result<Tensor> {
        use rayon::prelude::*;
        let n = self.order();
        let mut v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        // rows of a prefill chunk at a time: enough work per task to amortise rayon
        let per_task = (1 << 16) / n + 1;
        v.par_chunks_mut(n * per_task)
            .for_each(|rows| rows.chunks_mut(n).for_each(|r| self.apply_row(r)));
        debug_assert_eq!(v.len(), rows * n);
        Ok(Tensor::from_vec(v, x.dims(), x.device())?.to_dtype(x.dtype())?)
    }

    /// `x ← x H / √n` for one row on the host.
    pub fn apply_row(&self, x: &mut [f32]) {
        let scale = 1.0 / (self.order() as f32).sqrt();
        self.hadamard.apply_row_scaled(x, scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_and_host_paths_equal_the_dense_matrix() {
        for n in [12, 64, 1536] {
            let op = OnlineHadamard::new(n, DType::F32, &Device::Cpu).unwrap();
            let dense = Hadamard::new(n).unwrap().dense();
            let rows = 3;
            let x: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
                .collect();
            let t = Tensor::from_vec(x.clone(), (1, rows, n), &Device::Cpu).unwrap();
            let host_rows = op
                .forward(&t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // a variable takes the differentiable route: the dense products
            let var = candle_core::Var::from_tensor(&t).unwrap();
            let got = op
                .forward(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let scale = 1.0 / (n as f64).sqrt();
            for r in 0..rows {
                let mut host = x[r * n..(r + 1) * n].to_vec();
                op.apply_row(&mut host);
                for j in 0..n {
                    let want: f64 = (0..n)
                        .map(|i| x[r * n + i] as f64 * dense[i * n + j] as f64)
                        .sum::<f64>()
                        * scale;
                    let tol = 1e-4 * (1.0 + want.abs());
                    assert!(
                        (got[r * n + j] as f64 - want).abs() <= tol,
                        "n {n} tensor {j}"
                    );
                    assert!((host[j] as f64 - want).abs() <= tol, "n {n} host {j}");
                    assert!(
                        (host_rows[r * n + j] as f64 - want).abs() <= tol,
                        "n {n} host rows {j}"
                    );
                }
            }
        }
    }
}
