//! The Hessian proxy of a linear layer: `H = 2/N Σ x xᵀ` over all calibration tokens
//! (methods.md §1.3), accumulated one activation batch at a time.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

pub struct HessianAccumulator {
    dim: usize,
    sum: Option<Tensor>,
    tokens: usize,
}

impl HessianAccumulator {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            sum: None,
            tokens: 0,
        }
    }

    /// Add `x` (`[..., dim]`, any leading shape): `Σ += xᵀ x` with one GEMM.
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let d = *x.dims().last().unwrap_or(&0);
        ensure!(
            d == self.dim,
            "activation width {d} does not match the Hessian's {}",
            self.dim
        );
        let x = x.to_dtype(DType::F32)?.reshape(((), d))?;
        let gram = x.t()?.matmul(&x)?;
        self.tokens += x.dim(0)?;
        self.sum = Some(match self.sum.take() {
            None => gram,
            Some(s) => (s + gram)?,
        });
        Ok(())
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `2/N Σ x xᵀ`, row-major `[dim, dim]`.
    pub fn finish(self) -> Result<Vec<f32>> {
        let scale = 2.0 / self.tokens.max(1) as f64;
        match self.sum {
            None => Ok(vec![0.0; self.dim * self.dim]),
            Some(s) => Ok((s * scale)?.flatten_all()?.to_vec1()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_float64_sum() {
        let (n1, n2, d) = (5, 7, 6);
        let a: Vec<f32> = (0..n1 * d)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..n2 * d)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let mut acc = HessianAccumulator::new(d);
        acc.add(&Tensor::from_slice(&a, (1, n1, d), &Device::Cpu).unwrap())
            .unwrap();
        acc.add(&Tensor::from_slice(&b, (n2, d), &Device::Cpu).unwrap())
            .unwrap();
        let h = acc.finish().unwrap();
        let rows: Vec<&[f32]> = a.chunks(d).chain(b.chunks(d)).collect();
        for i in 0..d {
            for j in 0..d {
                let want = 2.0 / 12.0 * rows.iter().map(|r| r[i] as f64 * r[j] as f64).sum::<f64>();
                assert!((h[i * d + j] as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
            }
        }
    }
}
