//! The Hessian proxy of a linear layer: `H = 2/N Σ x xᵀ` over all calibration tokens
//! (methods.md §1.3), accumulated one activation batch at a time.
//!
//! `H` is symmetric, so each batch adds only the tiles on and below the diagonal (about
//! half the flops of a full `xᵀx`) straight into one f32 buffer (no product tensor per
//! batch and no second pass to add it); [`HessianAccumulator::finish`] mirrors the lower
//! triangle. On the fixture this accumulation is about half of a GPTQ calibration's
//! arithmetic, the block forwards the other half.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use crate::model::layers::cpu_slice;
use crate::util::SharedOut;
use gemm::Parallelism;
use rayon::prelude::*;

/// Rows and columns of `H` per tile: each tile's product is one GEMM with an inner
/// dimension of the batch's tokens.
const TILE: usize = 192;

pub struct HessianAccumulator {
    dim: usize,
    /// `Σ x xᵀ`, row-major `[dim, dim]`; only the lower triangle (tile-wise) is current.
    sum: Vec<f32>,
    tokens: usize,
}

impl HessianAccumulator {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            sum: Vec::new(),
            tokens: 0,
        }
    }

    /// Add `x` (`[..., dim]`, any leading shape): `Σ += xᵀ x`, the lower triangle only.
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let d = *x.dims().last().unwrap_or(&0);
        ensure!(
            d == self.dim,
            "activation width {d} does not match the Hessian's {}",
            self.dim
        );
        let x = x
            .to_dtype(DType::F32)?
            .reshape(((), d))?
            .to_device(&candle_core::Device::Cpu)?
            .contiguous()?;
        let n = x.dim(0)?;
        if n == 0 {
            return Ok(());
        }
        let (storage, layout) = x.storage_and_layout();
        let xs = cpu_slice::<f32>(&storage, layout)?;
        if self.sum.is_empty() {
            self.sum = vec![0f32; d * d];
        }
        // One task per tile on or below the diagonal, each a single-threaded GEMM into its
        // own block of `sum`: equal tasks keep both cores busy to the end (tile rows as
        // tasks were 1:2:3 in size at d = 576), and the summation order never depends on
        // scheduling, so a rerun (a resumed checkpoint) reproduces every Hessian bit for bit.
        let sum = SharedOut::new(&mut self.sum);
        let tile_rows = d.div_ceil(TILE);
        let tiles: Vec<(usize, usize)> = (0..tile_rows)
            .flat_map(|r| (0..=r).map(move |c| (r, c)))
            .collect();
        tiles.into_par_iter().for_each(|(tr, tc)| {
            let (r0, c0) = (tr * TILE, tc * TILE);
            let rows = TILE.min(d - r0);
            let cols = TILE.min(d - c0);
            // SAFETY: this task alone writes rows r0..r0+rows, columns c0..c0+cols of the
            // d×d buffer; lhs element (r, k) = x[k, r0 + r] and rhs element (k, c) =
            // x[k, c0 + c] stay inside the n×d slice for r < rows, c < cols, k < n.
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    n,
                    sum.at(r0 * d + c0),
                    1,
                    d as isize,
                    true,
                    xs.as_ptr().add(r0),
                    d as isize,
                    1,
                    xs.as_ptr().add(c0),
                    1,
                    d as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
        self.tokens += n;
        Ok(())
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `2/N Σ x xᵀ`, row-major `[dim, dim]`.
    pub fn finish(mut self) -> Result<Vec<f32>> {
        let d = self.dim;
        if self.sum.is_empty() {
            return Ok(vec![0.0; d * d]);
        }
        let scale = (2.0 / self.tokens.max(1) as f64) as f32;
        for r in 0..d {
            let tile_end = (r / TILE + 1) * TILE; // columns below this are current in row r
            for c in tile_end.min(d)..d {
                self.sum[r * d + c] = self.sum[c * d + r];
            }
        }
        self.sum.iter_mut().for_each(|v| *v *= scale);
        Ok(self.sum)
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

    #[test]
    fn tiles_and_mirror_match_float64_across_tile_edges() {
        // three tile rows, the last partial; two batches of odd sizes
        let d = 2 * TILE + 37;
        let mut rng = crate::util::SplitMix64::new(99);
        let mut r = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        let (n1, n2) = (9, 5);
        let a: Vec<f32> = (0..n1 * d).map(|_| r()).collect();
        let b: Vec<f32> = (0..n2 * d).map(|_| r()).collect();
        let mut acc = HessianAccumulator::new(d);
        acc.add(&Tensor::from_slice(&a, (n1, d), &Device::Cpu).unwrap())
            .unwrap();
        acc.add(&Tensor::from_slice(&b, (1, n2, d), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(acc.tokens(), n1 + n2);
        let h = acc.finish().unwrap();
        let rows: Vec<&[f32]> = a.chunks(d).chain(b.chunks(d)).collect();
        let scale = 2.0 / (n1 + n2) as f64;
        for i in 0..d {
            for j in 0..d {
                let want = scale * rows.iter().map(|r| r[i] as f64 * r[j] as f64).sum::<f64>();
                let got = h[i * d + j] as f64;
                assert!((got - want).abs() < 1e-5, "H[{i},{j}] = {got}, want {want}");
                assert_eq!(h[i * d + j], h[j * d + i], "H[{i},{j}] not symmetric");
            }
        }
    }
}
