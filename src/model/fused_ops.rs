//! Elementwise steps of the CPU forward done in one vectorized, threaded pass: SwiGLU's
//! `silu(gate) · up` and the residual adds. candle runs `silu` element by element and its
//! bf16 add converts eight values at a time behind a CPU-feature check per call (16 % of a
//! bf16 prefill went to the two residual adds); these widen half-precision chunks to f32,
//! compute there and round once. Candle ops otherwise (GPUs, odd layouts) and whenever
//! gradients must flow ([`Mode::Differentiable`]).

use super::block::Mode;
use super::layers::cpu_slice;
use crate::util::silu_mul;
use anyhow::Result;
use candle_core::{DType, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Elements per rayon task: enough work to hide the hand-off.
const CHUNK: usize = 1 << 14;

/// SwiGLU's activation `silu(gate) · up`: the input of `down_proj`.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor, mode: Mode) -> Result<Tensor> {
    match fusable_dtype(gate, up, mode) {
        Some(DType::F32) => map2_f32(gate, up, silu_mul),
        Some(DType::BF16) => map2_half::<half::bf16>(gate, up, silu_mul),
        Some(DType::F16) => map2_half::<half::f16>(gate, up, silu_mul),
        _ => Ok((candle_nn::ops::silu(gate)? * up)?),
    }
}

/// `a + b` of two same-shaped activations: a residual connection. f32 stays with candle
/// (its f32 add is already a vectorized pass).
pub(crate) fn residual_add(a: &Tensor, b: &Tensor, mode: Mode) -> Result<Tensor> {
    match fusable_dtype(a, b, mode) {
        Some(DType::BF16) => map2_half::<half::bf16>(a, b, add),
        Some(DType::F16) => map2_half::<half::f16>(a, b, add),
        _ => Ok((a + b)?),
    }
}

fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
        *o = a + b;
    }
}

/// The dtype of a pair this module computes itself: both on the CPU, same dtype and shape,
/// contiguous, in the fused mode.
fn fusable_dtype(a: &Tensor, b: &Tensor, mode: Mode) -> Option<DType> {
    let ok = mode == Mode::Fused
        && a.device().is_cpu()
        && a.dtype() == b.dtype()
        && a.shape() == b.shape()
        && a.is_contiguous()
        && b.is_contiguous();
    ok.then(|| a.dtype())
}

fn map2_f32(a: &Tensor, b: &Tensor, f: fn(&[f32], &[f32], &mut [f32])) -> Result<Tensor> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (x, y) = (cpu_slice::<f32>(&sa, la)?, cpu_slice::<f32>(&sb, lb)?);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
        .for_each(|(o, (x, y))| f(x, y, o));
    Ok(Tensor::from_vec(out, a.shape(), a.device())?)
}

/// `f` on bf16/f16 inputs widened to f32 (exact), its result rounded once to the dtype.
fn map2_half<T>(a: &Tensor, b: &Tensor, f: fn(&[f32], &[f32], &mut [f32])) -> Result<Tensor>
where
    T: candle_core::WithDType + Default,
    [T]: HalfFloatSliceExt,
{
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (x, y) = (cpu_slice::<T>(&sa, la)?, cpu_slice::<T>(&sb, lb)?);
    let mut out = vec![T::default(); x.len()];
    // one set of f32 buffers per rayon worker, no larger than the work (decode: one row)
    let len = CHUNK.min(x.len());
    let buffers = || (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
        .for_each_init(buffers, |(xf, yf, of), (o, (x, y))| {
            let n = o.len();
            x.convert_to_f32_slice(&mut xf[..n]);
            y.convert_to_f32_slice(&mut yf[..n]);
            f(&xf[..n], &yf[..n], &mut of[..n]);
            o.convert_from_f32_slice(&of[..n]);
        });
    Ok(Tensor::from_vec(out, a.shape(), a.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Any tensor's values as f32 (exact from a half type).
    fn values(x: &Tensor) -> Vec<f32> {
        x.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn pair(n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = crate::util::SplitMix64::new(5);
        let mut r = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (
            (0..n).map(|_| r() * 24.0 - 12.0).collect(),
            (0..n).map(|_| r() * 4.0 - 2.0).collect(),
        )
    }

    #[test]
    fn half_precision_is_the_f32_result_rounded_once() {
        // more than one chunk, with a partial last one
        let n = 2 * CHUNK + 77;
        let (g, u) = pair(n);
        let t = |v: &[f32]| Tensor::from_slice(v, (1, n), &Device::Cpu).unwrap();
        let exact = values(&swiglu(&t(&g), &t(&u), Mode::Fused).unwrap());
        for dtype in [DType::BF16, DType::F16] {
            // inputs rounded to the half type, then the f32 loop on those inputs
            let (gh, uh) = (
                t(&g).to_dtype(dtype).unwrap(),
                t(&u).to_dtype(dtype).unwrap(),
            );
            let f32_of_half_inputs = swiglu(&t(&values(&gh)), &t(&values(&uh)), Mode::Fused)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let fused = swiglu(&gh, &uh, Mode::Fused).unwrap();
            assert_eq!(fused.dtype(), dtype);
            assert_eq!(values(&fused), values(&f32_of_half_inputs), "{dtype:?}");
            // and close to the f32 result of the unrounded inputs
            let eps = if dtype == DType::BF16 { 2e-2 } else { 2e-3 };
            for (a, b) in values(&fused).iter().zip(&exact) {
                assert!(
                    (a - b).abs() <= eps * (1.0 + b.abs()),
                    "{dtype:?}: {a} vs {b}"
                );
            }
            // candle's op-by-op half path agrees to its own rounding
            let reference = values(&swiglu(&gh, &uh, Mode::Differentiable).unwrap());
            for (a, b) in values(&fused).iter().zip(&reference) {
                assert!(
                    (a - b).abs() <= 2.0 * eps * (1.0 + b.abs()),
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn half_precision_residual_add_equals_candles_add() {
        let n = CHUNK + 5;
        let (a, b) = pair(n);
        for dtype in [DType::BF16, DType::F16] {
            let t = |v: &[f32]| {
                Tensor::from_slice(v, (1, n), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (a, b) = (t(&a), t(&b));
            let fused = residual_add(&a, &b, Mode::Fused).unwrap();
            let candle = (&a + &b).unwrap();
            assert_eq!(fused.dtype(), dtype);
            // both round the exact f32 sum of two half values once
            assert_eq!(values(&fused), values(&candle), "{dtype:?}");
        }
    }
}
