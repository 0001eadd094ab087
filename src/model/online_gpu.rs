//! The online Hadamard on a GPU (`cuda` or `metal` feature): one custom op whose CUDA and
//! Metal halves launch `kernels/bitsmith_hadamard.{cu,metal}` (`online_cuda.rs`,
//! `online_metal.rs`) instead of the two dense products and two transposes of the tensor
//! route, ordered with candle's own ops on the device's stream or command encoder.

use anyhow::{Context, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// `x H / √n` for `x` `[..., n]` on a CUDA or Metal device, `n = p·m`; `small` is
/// `H_m / √n` `[m, m]` on the same device. The result has `x`'s shape and dtype (computed
/// in f32).
pub(super) fn forward(x: &Tensor, small: &Tensor, p: usize, m: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = p * m;
    let rows = x.elem_count() / n;
    let xf = x.to_dtype(DType::F32)?.reshape((rows, n))?.contiguous()?;
    let small = small.to_dtype(DType::F32)?.contiguous()?;
    let y = xf
        .apply_op2_no_bwd(&small, &Launch { rows, p, m })
        .context("bitsmith GPU online Hadamard")?;
    Ok(y.to_dtype(x.dtype())?.reshape(dims)?)
}

/// The op on `x` `[rows, p·m]` and `H_m / √n` `[m, m]`, both f32 and contiguous.
pub(super) struct Launch {
    pub rows: usize,
    pub p: usize,
    pub m: usize,
}

impl Launch {
    /// The inputs' shapes checked against the launch, and both contiguous.
    pub fn check(&self, xl: &Layout, hl: &Layout) -> candle_core::Result<()> {
        let (rows, n, m) = (self.rows, self.p * self.m, self.m);
        if xl.shape().dims() != [rows, n] || hl.shape().dims() != [m, m] {
            candle_core::bail!(
                "bitsmith online Hadamard: x is {:?} and H_m {:?}, expected [{rows}, {n}] and [{m}, {m}]",
                xl.shape(),
                hl.shape()
            );
        }
        if !xl.is_contiguous() || !hl.is_contiguous() {
            candle_core::bail!("bitsmith online Hadamard: inputs must be contiguous");
        }
        Ok(())
    }
}

impl CustomOp2 for Launch {
    fn name(&self) -> &'static str {
        "bitsmith-online-hadamard"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("bitsmith's GPU online Hadamard runs on CUDA or Metal inputs only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        hs: &candle_core::CudaStorage,
        hl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.check(xl, hl)?;
        super::online_cuda::launch(self, xs, xl, hs, hl)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        xs: &candle_core::MetalStorage,
        xl: &Layout,
        hs: &candle_core::MetalStorage,
        hl: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        self.check(xl, hl)?;
        super::online_metal::launch(self, xs, xl, hs, hl)
    }
}
