//! CUDA twin of the online Hadamard (`cuda` feature): `kernels/bitsmith_hadamard.cu` runs
//! `x ← x H / √n` on the device in one launch (a block per row: the small dense factor, then
//! the fast Walsh–Hadamard transform over the runs), instead of the two dense products and
//! two transposes of the tensor route. Launched on candle's stream through a [`CustomOp2`],
//! so it orders with candle's own ops; the PTX is built by `build.rs` and embedded.

use anyhow::{Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// PTX of `kernels/bitsmith_hadamard.cu`, compiled by `build.rs`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bitsmith_hadamard.ptx"));
/// Module name under which candle's device caches the PTX.
const MODULE: &str = "bitsmith_hadamard";
const THREADS: u32 = 256;

/// `x H / √n` for `x` `[..., n]` on a CUDA device, `n = p·m`; `small` is `H_m / √n`
/// `[m, m]` on the same device. The result has `x`'s shape and dtype (computed in f32).
pub(super) fn forward(x: &Tensor, small: &Tensor, p: usize, m: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = p * m;
    let rows = x.elem_count() / n;
    let xf = x.to_dtype(DType::F32)?.reshape((rows, n))?.contiguous()?;
    let small = small.to_dtype(DType::F32)?.contiguous()?;
    let y = xf
        .apply_op2_no_bwd(&small, &Launch { rows, p, m })
        .context("bitsmith CUDA online Hadamard")?;
    Ok(y.to_dtype(x.dtype())?.reshape(dims)?)
}

struct Launch {
    rows: usize,
    p: usize,
    m: usize,
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
        candle_core::bail!("bitsmith's CUDA online Hadamard runs on CUDA inputs only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        hs: &CudaStorage,
        hl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, p, m) = (self.rows, self.p, self.m);
        let n = p * m;
        if xl.shape().dims() != [rows, n] || hl.shape().dims() != [m, m] {
            candle_core::bail!(
                "bitsmith CUDA online Hadamard: x is {:?} and H_m {:?}, expected [{rows}, {n}] and [{m}, {m}]",
                xl.shape(),
                hl.shape()
            );
        }
        let (Some((x1, x2)), Some((h1, h2))) = (xl.contiguous_offsets(), hl.contiguous_offsets())
        else {
            candle_core::bail!("bitsmith CUDA online Hadamard: inputs must be contiguous");
        };
        let dev = xs.device();
        let x = xs.as_cuda_slice::<f32>()?.slice(x1..x2);
        let h = hs.as_cuda_slice::<f32>()?.slice(h1..h2);
        // SAFETY: every output element is written by the kernel below (stage 1 writes all
        // n values of each of the `rows` rows before stage 2 reads any).
        let mut y = unsafe { dev.alloc::<f32>(rows * n)? };
        if rows > 0 {
            let func = dev.get_or_load_custom_func("bitsmith_online_hadamard", MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (p_i, m_i) = (p as i32, m as i32);
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&mut y);
            b.arg(&h);
            b.arg(&p_i);
            b.arg(&m_i);
            // SAFETY: the argument list is bitsmith_online_hadamard's; x is [rows, n] f32,
            // y [rows, n] f32, h [m, m] f32, n = p·m.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from((rows, n)),
        ))
    }
}
