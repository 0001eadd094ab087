//! Metal half of the online Hadamard op (`metal` feature, macOS only, [`super::online_gpu`]):
//! `x ← x H / √n` in one dispatch of `kernels/bitsmith_hadamard.metal` on candle's command
//! encoder. **Never compiled or run**: candle's Metal crates build only on Apple targets
//! (the kernel is syntax-checked as C++ in CI, `kernels/check-metal-syntax.sh`).

use super::online_gpu::Launch;
use crate::util::compile_pipelines;
use anyhow::{Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{DType, Layout, MetalDevice, MetalStorage, Shape};
use candle_metal_kernels::metal::{ComputeCommandEncoder, ComputePipeline};
use objc2_metal::MTLSize;
use std::sync::{Arc, Mutex, OnceLock};

/// `kernels/bitsmith_hadamard.metal`, compiled at run time by the Metal driver.
const SRC: &str = include_str!("../../kernels/bitsmith_hadamard.metal");
/// `HADAMARD_THREADS` in the kernel: one threadgroup per row.
const THREADS: usize = 256;

/// The kernel's pipeline on one device, compiled once for the whole process.
fn pipeline(dev: &MetalDevice) -> Result<Arc<ComputePipeline>> {
    static ALL: OnceLock<Mutex<Vec<(DeviceId, Arc<ComputePipeline>)>>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .expect("metal hadamard pipeline lock");
    if let Some((_, p)) = all.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(p.clone());
    }
    let p = compile_pipelines(
        dev,
        SRC,
        "bitsmith_hadamard.metal",
        &["bitsmith_online_hadamard"],
    )?
    .pop()
    .map(Arc::new)
    .context("no pipeline for bitsmith_online_hadamard")?;
    all.push((dev.id(), p.clone()));
    Ok(p)
}

fn size(width: usize) -> MTLSize {
    MTLSize {
        width,
        height: 1,
        depth: 1,
    }
}

/// `l` on `x` (`xs`, `xl`) and `H_m / √n` (`hs`, `hl`), shapes already checked.
pub(super) fn launch(
    l: &Launch,
    xs: &MetalStorage,
    xl: &Layout,
    hs: &MetalStorage,
    hl: &Layout,
) -> candle_core::Result<(MetalStorage, Shape)> {
    let (rows, p, m) = (l.rows, l.p, l.m);
    let n = p * m;
    let dev = xs.device();
    let y = dev
        .new_buffer_builder()
        .with_size_for(rows * n, DType::F32)
        .with_label("bitsmith-hadamard")
        .build()?;
    if rows > 0 {
        let pipeline = pipeline(dev).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        let f32_bytes = DType::F32.size_in_bytes();
        let (p_i, m_i) = (p as i32, m as i32);
        enc.set_compute_pipeline_state(&pipeline);
        enc.set_input_buffer(0, Some(xs.buffer()), xl.start_offset() * f32_bytes);
        enc.set_output_buffer(1, Some(&y), 0);
        enc.set_input_buffer(2, Some(hs.buffer()), hl.start_offset() * f32_bytes);
        enc.set_bytes(3, &p_i);
        enc.set_bytes(4, &m_i);
        enc.dispatch_thread_groups(size(rows), size(THREADS));
    }
    Ok((
        MetalStorage::new(y, dev.clone(), rows * n, DType::F32),
        Shape::from((rows, n)),
    ))
}
