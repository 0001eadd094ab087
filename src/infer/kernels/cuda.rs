//! CUDA launcher (`cuda` feature) for `kernels/bitsmith_matmul.cu`: a [`BitsmithLinear`]
//! whose input is on a CUDA device runs `bitsmith_gemv_m{1..8}` (batch ≤ 8) or
//! `bitsmith_gemm` there, through candle's CUDA backend (a [`CustomOp1`] whose `cuda_fwd`
//! launches on candle's stream, so it orders with candle's own ops).
//!
//! - **PTX** is built at compile time by `build.rs` with nvcc (the same nvcc candle-kernels
//!   needs for this feature) and embedded; candle's device loads it once per device as a
//!   custom module (`get_or_load_custom_func`).
//! - **Weights** (words, params, spans, GEMV chunks, GEMM slot table, gather table) are
//!   uploaded on the first call per device and cached in the layer (one copy per device).
//! - **Activations**: `x` is converted to f32, gathered into the padded column order on the
//!   device when the layout needs it (an index-select over `x` with a zero column appended
//!   for padding), the kernel writes f32 `y`, converted back to `x`'s dtype.
//!
//! [`BitsmithLinear`]: super::BitsmithLinear

use super::super::layout::PackedLayout;
use super::gpu::{gemm_blocks, gemv_blocks, GpuTables, GEMM_THREADS, GEMV_THREADS};
use super::MAX_GEMV_ROWS;
use anyhow::{ensure, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// PTX of `kernels/bitsmith_matmul.cu`, compiled by `build.rs`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bitsmith_matmul.ptx"));
/// Module name under which candle's device caches the PTX.
const MODULE: &str = "bitsmith_matmul";
const GEMV_NAMES: [&str; MAX_GEMV_ROWS] = [
    "bitsmith_gemv_m1",
    "bitsmith_gemv_m2",
    "bitsmith_gemv_m3",
    "bitsmith_gemv_m4",
    "bitsmith_gemv_m5",
    "bitsmith_gemv_m6",
    "bitsmith_gemv_m7",
    "bitsmith_gemv_m8",
];

/// One layer's tables on one CUDA device.
struct DeviceLayer {
    id: DeviceId,
    words: CudaSlice<u32>,
    params: CudaSlice<u32>,
    spans: CudaSlice<u32>,
    chunks: CudaSlice<u32>,
    slot_spans: CudaSlice<u32>,
    /// `[padded_in]` u32 on the device (`in_features` = the appended zero column).
    gather: Option<Tensor>,
    n_spans: i32,
    n_chunks: i32,
    rows_per_warp: u32,
    row_words: i32,
    padded_in: usize,
    out_features: usize,
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
    fn get(&self, l: &PackedLayout, dev: &CudaDevice, device: &Device) -> Result<Arc<DeviceLayer>> {
        let mut held = self.0.lock().expect("cuda cache lock");
        if let Some(d) = held.iter().find(|d| d.id == dev.id()) {
            return Ok(d.clone());
        }
        let t = GpuTables::new(l);
        // an empty slice is not a valid upload; the kernels never read these then
        let up = |v: &[u32]| -> Result<CudaSlice<u32>> {
            let v = if v.is_empty() { &[0u32][..] } else { v };
            Ok(dev.clone_htod(v)?)
        };
        let d = Arc::new(DeviceLayer {
            id: dev.id(),
            words: up(&t.words)?,
            params: up(&t.params)?,
            spans: up(&t.spans)?,
            chunks: up(&t.chunks)?,
            slot_spans: up(&t.slot_spans)?,
            gather: match t.gather {
                Some(g) => Some(Tensor::from_vec(g, l.padded_in, device)?),
                None => None,
            },
            n_spans: t.n_spans as i32,
            n_chunks: t.n_chunks as i32,
            rows_per_warp: t.rows_per_warp,
            row_words: l.row_words as i32,
            padded_in: l.padded_in,
            out_features: l.out_features,
        });
        held.push(d.clone());
        Ok(d)
    }
}

/// `x` `[rows, in]` on a CUDA device → `[rows, out]` in `x`'s dtype.
pub(super) fn matmul(l: &PackedLayout, cache: &CudaCache, x: &Tensor) -> Result<Tensor> {
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
    if rows == 0 || n == 0 || l.padded_in == 0 {
        return Ok(Tensor::zeros((rows, n), x.dtype(), x.device())?);
    }
    let d = cache.get(l, dev, x.device())?;
    let xf = x.to_dtype(DType::F32)?;
    let xp = match &d.gather {
        None => xf.contiguous()?,
        Some(idx) => {
            let zero = Tensor::zeros((rows, 1), DType::F32, x.device())?;
            Tensor::cat(&[&xf, &zero], 1)?.index_select(idx, 1)?
        }
    };
    // the kernels load x with 16-byte loads: contiguous, starting on a 4-float boundary
    let xp = if xp.is_contiguous() && xp.layout().start_offset() % 4 == 0 {
        xp
    } else {
        xp.copy()?
    };
    let y = xp
        .apply_op1_no_bwd(&Launch { d, rows })
        .context("bitsmith CUDA kernel")?;
    Ok(y.to_dtype(x.dtype())?)
}

struct Launch {
    d: Arc<DeviceLayer>,
    rows: usize,
}

impl CustomOp1 for Launch {
    fn name(&self) -> &'static str {
        "bitsmith-packed-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("bitsmith's CUDA launch op runs on CUDA inputs only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let d = &self.d;
        let (m, n, kp) = (self.rows, d.out_features, d.padded_in);
        if layout.shape().dims() != [m, kp] {
            candle_core::bail!(
                "bitsmith CUDA: x is {:?}, expected [{m}, {kp}]",
                layout.shape()
            );
        }
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("bitsmith CUDA: x must be contiguous");
        };
        let dev = storage.device();
        let x = storage.as_cuda_slice::<f32>()?.slice(o1..o2);
        // SAFETY: every output element is written by the kernel below.
        let mut y = unsafe { dev.alloc::<f32>(m * n)? };
        let (kp_i, n_i) = (kp as i32, n as i32);
        if m <= MAX_GEMV_ROWS {
            let func = dev.get_or_load_custom_func(GEMV_NAMES[m - 1], MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (gemv_blocks(n, d.rows_per_warp), 1, 1),
                block_dim: (GEMV_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let rpw = d.rows_per_warp as i32;
            let mut b = func.builder();
            b.arg(&d.words);
            b.arg(&d.params);
            b.arg(&d.chunks);
            b.arg(&d.n_chunks);
            b.arg(&d.n_spans);
            b.arg(&d.row_words);
            b.arg(&rpw);
            b.arg(&x);
            b.arg(&kp_i);
            b.arg(&mut y);
            b.arg(&n_i);
            // SAFETY: the argument list is bitsmith_gemv_m*'s; the tables were built for
            // this layout and x is [m, kp] f32.
            unsafe { b.launch(cfg) }.w()?;
        } else {
            let func = dev.get_or_load_custom_func("bitsmith_gemm", MODULE, PTX)?;
            let (gx, gy) = gemm_blocks(m, n);
            let cfg = LaunchConfig {
                grid_dim: (gx, gy, 1),
                block_dim: (GEMM_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let m_i = m as i32;
            let mut b = func.builder();
            b.arg(&d.words);
            b.arg(&d.params);
            b.arg(&d.spans);
            b.arg(&d.slot_spans);
            b.arg(&d.n_spans);
            b.arg(&d.row_words);
            b.arg(&x);
            b.arg(&m_i);
            b.arg(&kp_i);
            b.arg(&mut y);
            b.arg(&n_i);
            // SAFETY: the argument list is bitsmith_gemm's (see the kernel file).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from((m, n)),
        ))
    }
}
