//! Metal launcher (`metal` feature, macOS only) for `kernels/bitsmith_lut.metal`: the twin
//! of `cuda.rs` beside it. A [`LutLinear`] whose input is on a Metal device runs
//! `bitsmith_lut_gemv_m{1..8}` (batch ≤ 8), or dequantizes into a transient dense matrix
//! with `bitsmith_lut_dequantize` for candle's GEMM (larger batches). **Never compiled or
//! run**, like the uniform Metal launcher (`super::super::metal`): candle's Metal crates
//! build only on macOS and bitsmith's machines are Linux.
//!
//! The `.metal` source is compiled by the Metal driver on first use per device; the
//! layer's codes, scales, column groups and table are uploaded on first use per device and
//! cached in the layer; the kernels are encoded on candle's current command encoder.
//!
//! [`LutLinear`]: super::LutLinear

use super::LutLinear;
use crate::model::MAX_GEMV_ROWS;
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

/// `kernels/bitsmith_lut.metal`, compiled at run time by the Metal driver.
const SRC: &str = include_str!("../../../../kernels/bitsmith_lut.metal");
/// The GEMV pipelines for 1..=8 rows, then the dequantize pipeline.
const NAMES: [&str; MAX_GEMV_ROWS + 1] = [
    "bitsmith_lut_gemv_m1",
    "bitsmith_lut_gemv_m2",
    "bitsmith_lut_gemv_m3",
    "bitsmith_lut_gemv_m4",
    "bitsmith_lut_gemv_m5",
    "bitsmith_lut_gemv_m6",
    "bitsmith_lut_gemv_m7",
    "bitsmith_lut_gemv_m8",
    "bitsmith_lut_dequantize",
];
/// `LUT_THREADS` in the kernels: 8 simdgroups, one output row each in the GEMV.
const THREADS: u32 = 256;

/// The pipelines of one device, in [`NAMES`]' order.
struct Pipelines {
    id: DeviceId,
    all: Vec<ComputePipeline>,
}

/// Compiled once per device for the whole process.
fn pipelines(dev: &MetalDevice) -> Result<Arc<Pipelines>> {
    static ALL: OnceLock<Mutex<Vec<Arc<Pipelines>>>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .expect("metal lookup pipelines lock");
    if let Some(p) = all.iter().find(|p| p.id == dev.id()) {
        return Ok(p.clone());
    }
    let p = Arc::new(Pipelines {
        id: dev.id(),
        all: compile_pipelines(dev, SRC, "bitsmith_lut.metal", &NAMES)?,
    });
    all.push(p.clone());
    Ok(p)
}

/// One layer's tables on one Metal device.
struct DeviceLayer {
    id: DeviceId,
    words: Arc<Buffer>,
    scales: Arc<Buffer>,
    g_idx: Arc<Buffer>,
    table: Arc<Buffer>,
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
    fn get(&self, l: &LutLinear, dev: &MetalDevice) -> Result<Arc<DeviceLayer>> {
        let mut held = self.0.lock().expect("metal lookup cache lock");
        if let Some(d) = held.iter().find(|d| d.id == dev.id()) {
            return Ok(d.clone());
        }
        let d = Arc::new(DeviceLayer {
            id: dev.id(),
            words: dev.new_buffer_with_data(&l.words)?,
            scales: dev.new_buffer_with_data(&l.scales)?,
            g_idx: dev.new_buffer_with_data(&l.g_idx())?,
            table: dev.new_buffer_with_data(&l.table)?,
        });
        held.push(d.clone());
        Ok(d)
    }
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

/// `x` `[rows, in]` on a Metal device → `[rows, out]` in `x`'s dtype.
pub(super) fn matmul(l: &LutLinear, cache: &MetalCache, x: &Tensor) -> Result<Tensor> {
    let Device::Metal(dev) = x.device() else {
        anyhow::bail!("the Metal lookup launcher got an input on {:?}", x.device());
    };
    let (rows, k) = x.dims2()?;
    ensure!(
        k == l.in_features,
        "input has {k} features, the layer takes {}",
        l.in_features
    );
    let n = l.out_features;
    // an empty upload is not a valid buffer: nothing to compute then
    if rows == 0 || n == 0 || k == 0 {
        return Ok(Tensor::zeros((rows, n), x.dtype(), x.device())?);
    }
    let launch = Launch {
        d: cache.get(l, dev)?,
        p: pipelines(dev)?,
        s: LayerDims {
            bits: l.bits as u32,
            row_words: l.row_words as i32,
            n_groups: l.n_groups as i32,
            k,
            n,
        },
        rows,
    };
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    let y = if rows <= MAX_GEMV_ROWS {
        xf.apply_op1_no_bwd(&launch)
            .context("bitsmith Metal lookup GEMV")?
    } else {
        // the dense matrix is made from a dummy input of the layer's shape on the device
        let w = Tensor::zeros((n, k), DType::F32, x.device())?
            .apply_op1_no_bwd(&Launch { rows: 0, ..launch })
            .context("bitsmith Metal lookup dequantize")?;
        xf.matmul(&w.t()?)?
    };
    Ok(y.to_dtype(x.dtype())?)
}

/// The GEMV for `rows` in 1..=8, or the dequantize with `rows == 0`.
struct Launch {
    d: Arc<DeviceLayer>,
    p: Arc<Pipelines>,
    s: LayerDims,
    rows: usize,
}

fn size(width: u32) -> MTLSize {
    MTLSize {
        width: width as usize,
        height: 1,
        depth: 1,
    }
}

impl CustomOp1 for Launch {
    fn name(&self) -> &'static str {
        if self.rows == 0 {
            "bitsmith-lut-dequantize"
        } else {
            "bitsmith-lut-gemv"
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("bitsmith's Metal lookup op runs on Metal inputs only")
    }

    fn metal_fwd(
        &self,
        storage: &MetalStorage,
        layout: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        let (d, s, m) = (&self.d, self.s, self.rows);
        let (in_rows, out_cols) = if m == 0 { (s.n, s.k) } else { (m, s.n) };
        let want = if m == 0 { [s.n, s.k] } else { [m, s.k] };
        if layout.shape().dims() != want {
            candle_core::bail!(
                "bitsmith Metal lookup: input is {:?}, expected {want:?}",
                layout.shape()
            );
        }
        if !layout.is_contiguous() {
            candle_core::bail!("bitsmith Metal lookup: input must be contiguous");
        }
        let dev = storage.device();
        let out = dev
            .new_buffer_builder()
            .with_size_for(in_rows * out_cols, DType::F32)
            .with_label("bitsmith-lut")
            .build()?;
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        let (k_i, n_i) = (s.k as i32, s.n as i32);
        // the first seven arguments are the layer's, in both kernels
        let pipeline = &self.p.all[if m == 0 { MAX_GEMV_ROWS } else { m - 1 }];
        enc.set_compute_pipeline_state(pipeline);
        enc.set_input_buffer(0, Some(&d.words), 0);
        enc.set_input_buffer(1, Some(&d.scales), 0);
        enc.set_input_buffer(2, Some(&d.g_idx), 0);
        enc.set_input_buffer(3, Some(&d.table), 0);
        enc.set_bytes(4, &s.bits);
        enc.set_bytes(5, &s.row_words);
        enc.set_bytes(6, &s.n_groups);
        let groups = if m == 0 {
            // the dummy input is not read
            enc.set_bytes(7, &k_i);
            enc.set_output_buffer(8, Some(&out), 0);
            enc.set_bytes(9, &n_i);
            (s.n * s.k).div_ceil(THREADS as usize) as u32
        } else {
            let x_offset = layout.start_offset() * DType::F32.size_in_bytes();
            enc.set_input_buffer(7, Some(storage.buffer()), x_offset);
            enc.set_bytes(8, &k_i);
            enc.set_output_buffer(9, Some(&out), 0);
            enc.set_bytes(10, &n_i);
            s.n.div_ceil((THREADS / 32) as usize) as u32
        };
        enc.dispatch_thread_groups(size(groups), size(THREADS));
        drop(guard);
        Ok((
            MetalStorage::new(out, dev.clone(), in_rows * out_cols, DType::F32),
            Shape::from((in_rows, out_cols)),
        ))
    }
}
