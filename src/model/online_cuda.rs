//! CUDA half of the online Hadamard op (`cuda` feature, [`super::online_gpu`]):
//! `kernels/bitsmith_hadamard.cu` runs `x ← x H / √n` in one launch (a block per row: the
//! small dense factor, then the fast Walsh–Hadamard transform over the runs) on candle's
//! stream; the PTX is built by `build.rs` and embedded.

use super::online_gpu::Launch;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Shape};

/// PTX of `kernels/bitsmith_hadamard.cu`, compiled by `build.rs`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bitsmith_hadamard.ptx"));
/// Module name under which candle's device caches the PTX.
const MODULE: &str = "bitsmith_hadamard";
const THREADS: u32 = 256;

/// `l` on `x` (`xs`, `xl`) and `H_m / √n` (`hs`, `hl`), shapes already checked.
pub(super) fn launch(
    l: &Launch,
    xs: &CudaStorage,
    xl: &Layout,
    hs: &CudaStorage,
    hl: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (rows, p, m) = (l.rows, l.p, l.m);
    let n = p * m;
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
