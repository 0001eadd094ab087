//! CUDA launcher (`cuda` feature) for `kernels/bitsmith_lut.cu`: a [`LutLinear`] whose
//! input is on a CUDA device runs `bitsmith_lut_gemv_m{1..8}` (batch ≤ 8), or dequantizes
//! into a transient dense matrix with `bitsmith_lut_dequantize` for candle's GEMM (larger
//! batches, as the CPU path does), through candle's CUDA backend as [`CustomOp1`]s on
//! candle's stream. The PTX is built by `build.rs` with nvcc, like the uniform kernels'
//! (`super::super::cuda`); the layer's codes, scales, column groups and table are uploaded
//! on first use per device and cached in the layer.
//!
//! [`LutLinear`]: super::LutLinear

use super::LutLinear;
use crate::model::MAX_GEMV_ROWS;
use anyhow::{ensure, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor,
};
use std::sync::{Arc, Mutex};

/// PTX of `kernels/bitsmith_lut.cu`, compiled by `build.rs`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bitsmith_lut.ptx"));
/// Module name under which candle's device caches the PTX.
const MODULE: &str = "bitsmith_lut";
const GEMV_NAMES: [&str; MAX_GEMV_ROWS] = [
    "bitsmith_lut_gemv_m1",
    "bitsmith_lut_gemv_m2",
    "bitsmith_lut_gemv_m3",
    "bitsmith_lut_gemv_m4",
    "bitsmith_lut_gemv_m5",
    "bitsmith_lut_gemv_m6",
    "bitsmith_lut_gemv_m7",
    "bitsmith_lut_gemv_m8",
];
/// `LUT_THREADS` in the kernels: 8 warps, one output row each in the GEMV.
const THREADS: u32 = 256;

/// One layer's tables on one CUDA device.
struct DeviceLayer {
    id: DeviceId,
    words: CudaSlice<u32>,
    scales: CudaSlice<f32>,
    g_idx: CudaSlice<u32>,
    table: CudaSlice<f32>,
}

/// Per-device uploads of one layer, made on first use.
#[derive(Default)]
pub(super) struct CudaCache(Mutex<Vec<Arc<DeviceLayer>>>);

impl std::fmt::Debug for CudaCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "CudaCache({n} devices)")
    }
}

impl CudaCache {
    fn get(&self, l: &LutLinear, dev: &CudaDevice) -> Result<Arc<DeviceLayer>> {
        let mut held = self.0.lock().expect("cuda cache lock");
        if let Some(d) = held.iter().find(|d| d.id == dev.id()) {
            return Ok(d.clone());
        }
        let d = Arc::new(DeviceLayer {
            id: dev.id(),
            words: dev.clone_htod(&l.words)?,
            scales: dev.clone_htod(&l.scales)?,
            g_idx: dev.clone_htod(&l.g_idx())?,
            table: dev.clone_htod(&l.table)?,
        });
        held.push(d.clone());
        Ok(d)
    }
}

/// `x` `[rows, in]` on a CUDA device → `[rows, out]` in `x`'s dtype.
pub(super) fn matmul(l: &LutLinear, cache: &CudaCache, x: &Tensor) -> Result<Tensor> {
    let Device::Cuda(dev) = x.device() else {
        anyhow::bail!("the CUDA launcher got an input on {:?}", x.device());
    };
    let (rows, k) = x.dims2()?;
    ensure!(
        k == l.in_features,
        "input has {k} features, the layer takes {}",
        l.in_features
    );
    let n = l.out_features;
    if rows == 0 || n == 0 || k == 0 {
        return Ok(Tensor::zeros((rows, n), x.dtype(), x.device())?);
    }
    let d = cache.get(l, dev)?;
    let dims = LayerDims {
        bits: l.bits as u32,
        row_words: l.row_words as i32,
        n_groups: l.n_groups as i32,
        k,
        n,
    };
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    let y = if rows <= MAX_GEMV_ROWS {
        xf.apply_op1_no_bwd(&Gemv { d, s: dims, rows })
            .context("bitsmith CUDA lookup GEMV")?
    } else {
        // the dense matrix is made from a dummy input of the layer's shape on the device
        let w = Tensor::zeros((n, k), DType::F32, x.device())?
            .apply_op1_no_bwd(&Dequantize { d, s: dims })
            .context("bitsmith CUDA lookup dequantize")?;
        xf.matmul(&w.t()?)?
    };
    Ok(y.to_dtype(x.dtype())?)
}

/// The layer's sizes as the kernels take them.
#[derive(Clone, Copy)]
struct LayerDims {
    bits: u32,
    row_words: i32,
    n_groups: i32,
    k: usize,
    n: usize,
}

/// The contiguous f32 slice of `storage` that `layout` covers, checked to be `[rows, cols]`.
fn input<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    dims: [usize; 2],
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    if layout.shape().dims() != dims {
        candle_core::bail!(
            "bitsmith CUDA lookup: input is {:?}, expected {dims:?}",
            layout.shape()
        );
    }
    let Some((o1, o2)) = layout.contiguous_offsets() else {
        candle_core::bail!("bitsmith CUDA lookup: input must be contiguous");
    };
    Ok(storage.as_cuda_slice::<f32>()?.slice(o1..o2))
}

struct Gemv {
    d: Arc<DeviceLayer>,
    s: LayerDims,
    rows: usize,
}

impl CustomOp1 for Gemv {
    fn name(&self) -> &'static str {
        "bitsmith-lut-gemv"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("bitsmith's CUDA lookup op runs on CUDA inputs only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (d, s, m) = (&self.d, self.s, self.rows);
        let x = input(storage, layout, [m, s.k])?;
        let dev = storage.device();
        // SAFETY: every output element is written by the kernel below.
        let mut y = unsafe { dev.alloc::<f32>(m * s.n)? };
        let func = dev.get_or_load_custom_func(GEMV_NAMES[m - 1], MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (s.n.div_ceil((THREADS / 32) as usize) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (k_i, n_i) = (s.k as i32, s.n as i32);
        let mut b = func.builder();
        b.arg(&d.words);
        b.arg(&d.scales);
        b.arg(&d.g_idx);
        b.arg(&d.table);
        b.arg(&s.bits);
        b.arg(&s.row_words);
        b.arg(&s.n_groups);
        b.arg(&x);
        b.arg(&k_i);
        b.arg(&mut y);
        b.arg(&n_i);
        // SAFETY: the argument list is bitsmith_lut_gemv_m*'s; the tables were uploaded
        // from this layer and x is [m, k] f32.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from((m, s.n)),
        ))
    }
}

struct Dequantize {
    d: Arc<DeviceLayer>,
    s: LayerDims,
}

impl CustomOp1 for Dequantize {
    fn name(&self) -> &'static str {
        "bitsmith-lut-dequantize"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("bitsmith's CUDA lookup op runs on CUDA inputs only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (d, s) = (&self.d, self.s);
        // the input only carries the device and the shape; its values are not read
        input(storage, layout, [s.n, s.k])?;
        let dev = storage.device();
        // SAFETY: every element is written by the kernel below.
        let mut w = unsafe { dev.alloc::<f32>(s.n * s.k)? };
        let func = dev.get_or_load_custom_func("bitsmith_lut_dequantize", MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: ((s.n * s.k).div_ceil(THREADS as usize) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (k_i, n_i) = (s.k as i32, s.n as i32);
        let mut b = func.builder();
        b.arg(&d.words);
        b.arg(&d.scales);
        b.arg(&d.g_idx);
        b.arg(&d.table);
        b.arg(&s.bits);
        b.arg(&s.row_words);
        b.arg(&s.n_groups);
        b.arg(&k_i);
        b.arg(&mut w);
        b.arg(&n_i);
        // SAFETY: the argument list is bitsmith_lut_dequantize's.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(w, dev.clone()),
            Shape::from((s.n, s.k)),
        ))
    }
}
