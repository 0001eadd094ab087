//! Metal launcher (`metal` feature, macOS only) for `kernels/bitsmith_matmul.metal`: the
//! twin of `cuda.rs`, line for line where the backends allow. **Never compiled or run**:
//! candle's Metal crates build only on macOS and bitsmith's machines are Linux; read it as
//! a careful draft against candle 0.11's Metal API (candle-metal-kernels' `metal` wrappers).
//!
//! - **Library**: the `.metal` source is embedded and compiled by the Metal driver on first
//!   use per device (`newLibraryWithSource`), its 9 pipelines cached per device.
//! - **Weights**: uploaded on first use per device and cached in the layer.
//! - **Activations**: as in `cuda.rs` (f32, device-side gather, back to `x`'s dtype); the
//!   kernels are encoded on candle's current command encoder, so they order with candle's ops.

use super::super::layout::PackedLayout;
use super::gpu::{gemm_blocks, gemv_blocks, GpuTables, GEMM_THREADS, GEMV_THREADS};
use super::MAX_GEMV_ROWS;
use crate::util::compile_pipelines;
use anyhow::{ensure, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{
    CpuStorage, CustomOp1, DType, Device, Layout, MetalDevice, MetalStorage, Shape, Tensor,
};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline};
use objc2_metal::MTLSize;
use std::sync::{Arc, Mutex, OnceLock};

/// `kernels/bitsmith_matmul.metal`, compiled at run time by the Metal driver.
const SRC: &str = include_str!("../../../kernels/bitsmith_matmul.metal");
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

/// The 8 GEMV pipelines and the GEMM pipeline of one device.
struct Pipelines {
    id: DeviceId,
    gemv: Vec<ComputePipeline>,
    gemm: ComputePipeline,
}

/// Compiled once per device for the whole process (the library is shared by all layers).
fn pipelines(dev: &MetalDevice) -> Result<Arc<Pipelines>> {
    static ALL: OnceLock<Mutex<Vec<Arc<Pipelines>>>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .expect("metal pipelines lock");
    if let Some(p) = all.iter().find(|p| p.id == dev.id()) {
        return Ok(p.clone());
    }
    let mut names = GEMV_NAMES.to_vec();
    names.push("bitsmith_gemm");
    let mut gemv = compile_pipelines(dev, SRC, "bitsmith_matmul.metal", &names)?;
    let gemm = gemv.pop().expect("one pipeline per name");
    let p = Arc::new(Pipelines {
        id: dev.id(),
        gemv,
        gemm,
    });
    all.push(p.clone());
    Ok(p)
}

/// One layer's tables on one Metal device.
struct DeviceLayer {
    id: DeviceId,
    words: Arc<Buffer>,
    params: Arc<Buffer>,
    spans: Arc<Buffer>,
    chunks: Arc<Buffer>,
    slot_spans: Arc<Buffer>,
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
pub(super) struct MetalCache(Mutex<Vec<Arc<DeviceLayer>>>);

impl std::fmt::Debug for MetalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "MetalCache({n} devices)")
    }
}

impl MetalCache {
    fn get(
        &self,
        l: &PackedLayout,
        dev: &MetalDevice,
        device: &Device,
    ) -> Result<Arc<DeviceLayer>> {
        let mut held = self.0.lock().expect("metal cache lock");
        if let Some(d) = held.iter().find(|d| d.id == dev.id()) {
            return Ok(d.clone());
        }
        let t = GpuTables::new(l);
        // an empty buffer is not a valid upload; the kernels never read these then
        let up = |v: &[u32]| -> Result<Arc<Buffer>> {
            let v = if v.is_empty() { &[0u32][..] } else { v };
            Ok(dev.new_buffer_with_data(v)?)
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

/// `x` `[rows, in]` on a Metal device → `[rows, out]` in `x`'s dtype.
pub(super) fn matmul(l: &PackedLayout, cache: &MetalCache, x: &Tensor) -> Result<Tensor> {
    let Device::Metal(dev) = x.device() else {
        anyhow::bail!("the Metal launcher got an input on {:?}", x.device());
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
    let p = pipelines(dev)?;
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
        .apply_op1_no_bwd(&Launch { d, p, rows })
        .context("bitsmith Metal kernel")?;
    Ok(y.to_dtype(x.dtype())?)
}

struct Launch {
    d: Arc<DeviceLayer>,
    p: Arc<Pipelines>,
    rows: usize,
}

fn size(width: u32, height: u32) -> MTLSize {
    MTLSize {
        width: width as usize,
        height: height as usize,
        depth: 1,
    }
}

impl CustomOp1 for Launch {
    fn name(&self) -> &'static str {
        "bitsmith-packed-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("bitsmith's Metal launch op runs on Metal inputs only")
    }

    fn metal_fwd(
        &self,
        storage: &MetalStorage,
        layout: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        let d = &self.d;
        let (m, n, kp) = (self.rows, d.out_features, d.padded_in);
        if layout.shape().dims() != [m, kp] {
            candle_core::bail!(
                "bitsmith Metal: x is {:?}, expected [{m}, {kp}]",
                layout.shape()
            );
        }
        if !layout.is_contiguous() {
            candle_core::bail!("bitsmith Metal: x must be contiguous");
        }
        let dev = storage.device();
        let x_offset = layout.start_offset() * DType::F32.size_in_bytes();
        let y = dev
            .new_buffer_builder()
            .with_size_for(m * n, DType::F32)
            .with_label("bitsmith")
            .build()?;
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        let (kp_i, n_i) = (kp as i32, n as i32);
        if m <= MAX_GEMV_ROWS {
            let rpw = d.rows_per_warp as i32;
            enc.set_compute_pipeline_state(&self.p.gemv[m - 1]);
            enc.set_input_buffer(0, Some(&d.words), 0);
            enc.set_input_buffer(1, Some(&d.params), 0);
            enc.set_input_buffer(2, Some(&d.chunks), 0);
            enc.set_bytes(3, &d.n_chunks);
            enc.set_bytes(4, &d.n_spans);
            enc.set_bytes(5, &d.row_words);
            enc.set_bytes(6, &rpw);
            enc.set_input_buffer(7, Some(storage.buffer()), x_offset);
            enc.set_bytes(8, &kp_i);
            enc.set_output_buffer(9, Some(&y), 0);
            enc.set_bytes(10, &n_i);
            enc.dispatch_thread_groups(
                size(gemv_blocks(n, d.rows_per_warp), 1),
                size(GEMV_THREADS, 1),
            );
        } else {
            let (gx, gy) = gemm_blocks(m, n);
            let m_i = m as i32;
            enc.set_compute_pipeline_state(&self.p.gemm);
            enc.set_input_buffer(0, Some(&d.words), 0);
            enc.set_input_buffer(1, Some(&d.params), 0);
            enc.set_input_buffer(2, Some(&d.spans), 0);
            enc.set_input_buffer(3, Some(&d.slot_spans), 0);
            enc.set_bytes(4, &d.n_spans);
            enc.set_bytes(5, &d.row_words);
            enc.set_input_buffer(6, Some(storage.buffer()), x_offset);
            enc.set_bytes(7, &m_i);
            enc.set_bytes(8, &kp_i);
            enc.set_output_buffer(9, Some(&y), 0);
            enc.set_bytes(10, &n_i);
            enc.dispatch_thread_groups(size(gx, gy), size(GEMM_THREADS, 1));
        }
        drop(guard);
        Ok((
            MetalStorage::new(y, dev.clone(), m * n, DType::F32),
            Shape::from((m, n)),
        ))
    }
}
