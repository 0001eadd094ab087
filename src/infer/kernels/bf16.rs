//! A dense linear kept in bf16, its source precision, and multiplied in f32.
//!
//! Checkpoints store embeddings and LM heads in bf16; an f32 model widens them to f32 on
//! load, doubling the bytes the LM head streams per decoded token (the fixture's tied
//! 49152×576 head: 113 MB in f32, the largest single read of a w4 decode step). When every
//! value is exactly a bf16 number, keeping the bf16 bits loses nothing: the batch-1..8 GEMV
//! widens each weight to f32 exactly in registers ([`super::dense`]).

use super::bf16_gemm;
use super::dense::{self, DenseRows};
use crate::model::layers::cpu_slice;
use crate::model::{host_matmul_tensor, HostMatmul, PackedMatmul, MAX_GEMV_ROWS};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use half::bf16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;

#[derive(Debug)]
pub struct Bf16Linear {
    /// `[out, in]` bf16 on the CPU, contiguous; a tied embedding shares it.
    weight: Tensor,
}

impl Bf16Linear {
    /// The weights of an f32 `[out, in]` CPU tensor as bf16, or `None` when some value is
    /// not exactly a bf16 number (keeping it in bf16 would change the model).
    pub fn exact_from(w: &Tensor) -> Result<Option<Self>> {
        let (n, k) = w.dims2()?;
        ensure!(
            w.dtype() == DType::F32,
            "expected f32 weights, got {:?}",
            w.dtype()
        );
        if !w.device().is_cpu() {
            return Ok(None);
        }
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let values: &[f32] = cpu_slice(&storage, layout)?;
        // a bf16 number is an f32 whose low 16 bits are zero
        if values.iter().any(|v| v.to_bits() & 0xffff != 0) {
            return Ok(None);
        }
        let bits: Vec<u16> = values.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let weight = Tensor::from_vec(bits.reinterpret_into::<bf16>(), (n, k), &Device::Cpu)?;
        Ok(Some(Self { weight }))
    }

    /// A bf16 model's weights (`[out, in]` bf16 on the CPU), held as they are: products of
    /// more than [`MAX_GEMV_ROWS`] bf16 rows then run on [`bf16_gemm`] (f32 accumulation)
    /// instead of candle's bf16 matmul.
    pub fn from_bf16(w: &Tensor) -> Result<Option<Self>> {
        w.dims2()?;
        if w.dtype() != DType::BF16 || !w.device().is_cpu() {
            return Ok(None);
        }
        Ok(Some(Self {
            weight: w.contiguous()?,
        }))
    }

    /// The weights, a bf16 tensor `[out, in]` (the embedding lookup of a tied head shares
    /// it: no second copy).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Run `f` on the bf16 bit patterns.
    fn with_bits<R>(&self, f: impl FnOnce(&[u16]) -> R) -> R {
        let (storage, layout) = self.weight.storage_and_layout();
        let values: &[bf16] =
            cpu_slice(&storage, layout).expect("built as a contiguous bf16 CPU tensor");
        f(values.reinterpret_cast())
    }
}

impl HostMatmul for Bf16Linear {
    fn matmul_host(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (n, k) = (self.out_features(), self.in_features());
        debug_assert_eq!(x.len(), rows * k);
        self.with_bits(|bits| {
            for (xs, ys) in x
                .chunks(MAX_GEMV_ROWS * k)
                .zip(y.chunks_mut(MAX_GEMV_ROWS * n))
            {
                dense::gemv(DenseRows::Bf16(bits), n, k, xs, ys);
            }
        });
    }
}

impl PackedMatmul for Bf16Linear {
    fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, k) = x.dims2()?;
        ensure!(
            k == self.in_features(),
            "input has {k} features, the layer takes {}",
            self.in_features()
        );
        if rows <= MAX_GEMV_ROWS && x.device().is_cpu() {
            return host_matmul_tensor(self, x, self.out_features());
        }
        if x.dtype() == DType::BF16 && x.device().is_cpu() {
            // a bf16 model: bf16 × bf16 with f32 accumulation, rounded once to bf16
            let n = self.out_features();
            let x = x.contiguous()?;
            let (xs, xl) = x.storage_and_layout();
            let xbits: &[u16] = cpu_slice::<bf16>(&xs, xl)?.reinterpret_cast();
            let mut y = vec![0u16; rows * n];
            self.with_bits(|w| bf16_gemm::gemm(w, n, k, xbits, rows, &mut y));
            return Ok(Tensor::from_vec(
                y.reinterpret_into::<bf16>(),
                (rows, n),
                &Device::Cpu,
            )?);
        }
        if x.dtype() == DType::BF16 {
            // not on the CPU: candle's bf16 matmul, as a dense bf16 linear runs
            return Ok(x.matmul(&self.weight.to_device(x.device())?.t()?)?);
        }
        // prompts and perplexity windows: widen to a temporary f32 matrix for candle's GEMM
        // (one pass over the weights per call, small next to the GEMM itself)
        let w = self.weight.to_device(x.device())?.to_dtype(DType::F32)?;
        Ok(x.to_dtype(DType::F32)?
            .matmul(&w.t()?)?
            .to_dtype(x.dtype())?)
    }
    fn resident_bytes(&self) -> usize {
        2 * self.weight.elem_count()
    }
    fn describe(&self) -> String {
        "bf16 weights, f32 compute".to_string()
    }
    fn host(&self) -> Option<&dyn HostMatmul> {
        Some(self)
    }
}
