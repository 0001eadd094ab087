//! Linear layers and RMSNorm.

use super::block::Mode;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::sync::Arc;

/// A matrix product whose weights stay packed in memory (`src/infer/`): what a quantized
/// linear runs when it is not dequantized on load.
pub trait PackedMatmul: Send + Sync + std::fmt::Debug {
    fn out_features(&self) -> usize;
    fn in_features(&self) -> usize;
    /// `x` `[rows, in_features]` → `x · Wᵀ` `[rows, out_features]`, on `x`'s device and
    /// in `x`'s dtype.
    fn matmul(&self, x: &Tensor) -> Result<Tensor>;
    /// Bytes the packed weights occupy in memory.
    fn resident_bytes(&self) -> usize;
    /// Short description for logs and `inspect` (kernel and layout).
    fn describe(&self) -> String;
    /// The same product on f32 slices in host memory, for the fused CPU decode step
    /// (`src/model/decode.rs`); `None` when this kernel runs only on tensors.
    fn host(&self) -> Option<&dyn HostMatmul> {
        None
    }
}

/// The most rows a [`HostMatmul`] takes in one call: the batch limit of the fused decode
/// step and of every GEMV kernel (larger batches go through a GEMM).
pub const MAX_GEMV_ROWS: usize = 8;

/// A matrix product on f32 slices in host memory, without tensors or per-call allocation
/// of the output.
pub trait HostMatmul: Send + Sync {
    /// `y` `[rows, out]` = `x` `[rows, in]` · Wᵀ, `rows` in `1..=`[`MAX_GEMV_ROWS`]; `y` is
    /// overwritten.
    fn matmul_host(&self, x: &[f32], rows: usize, y: &mut [f32]);
}

/// The fused decode step's product for dense weights, supplied by `infer` (its GEMV
/// kernel) through [`super::CausalLm::set_dense_gemv`]: the model names no kernel.
pub trait DenseGemv: Send + Sync + std::fmt::Debug {
    /// `y` `[rows, out]` = `x` `[rows, in]` · `w`ᵀ for a contiguous CPU weight `w`
    /// `[out, in]` in f32 or bf16, `rows` in `1..=`[`MAX_GEMV_ROWS`]; `y` is overwritten.
    fn gemv(&self, w: &Tensor, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()>;
}

/// [`HostMatmul`] on a CPU tensor `x` `[rows, in]`: `[rows, out]` in `x`'s dtype (the
/// tensor entry of host kernels, [`PackedMatmul::matmul`]).
pub fn host_matmul_tensor(k: &dyn HostMatmul, x: &Tensor, out_features: usize) -> Result<Tensor> {
    let rows = x.dims2()?.0;
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut y = vec![0f32; rows * out_features];
    k.matmul_host(&xs, rows, &mut y);
    Ok(Tensor::from_vec(y, (rows, out_features), x.device())?.to_dtype(x.dtype())?)
}

/// The data of a contiguous CPU tensor, borrowed from its storage (from
/// `Tensor::storage_and_layout`): how host kernels read tensors without copying them.
pub fn cpu_slice<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Result<&'a [T]> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        bail!("expected a CPU tensor")
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| anyhow::anyhow!("expected a contiguous tensor"))?;
    Ok(&cpu.as_slice::<T>()?[start..end])
}

/// The weights of a linear: a dense `[out, in]` tensor or a packed kernel.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Packed(Arc<dyn PackedMatmul>),
}

/// `y = x Wᵀ + b` with `W` `[out, in]`. Quantized models hold either their dequantized
/// weights here (the exact values the quantizer produced) or a packed kernel; a quantizer
/// replaces dense weights in place.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Dense(weight),
            bias,
        }
    }

    pub fn packed(kernel: Arc<dyn PackedMatmul>, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Packed(kernel),
            bias,
        }
    }

    /// The dense `[out, in]` weights; an error for a packed layer (quantizers and the
    /// calibration runner need dense weights).
    pub fn weight(&self) -> Result<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w),
            LinearWeight::Packed(k) => bail!(
                "this linear holds packed weights ({}); load the model dequantized to modify it",
                k.describe()
            ),
        }
    }

    pub fn weights(&self) -> &LinearWeight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn out_features(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.dims()[0],
            LinearWeight::Packed(k) => k.out_features(),
        }
    }

    pub fn in_features(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.dims()[1],
            LinearWeight::Packed(k) => k.in_features(),
        }
    }

    /// Swap in new dense weights (same shape), e.g. fake-quantized ones.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        let expected = [self.out_features(), self.in_features()];
        anyhow::ensure!(
            weight.dims() == expected,
            "replacement weight has shape {:?}, expected {:?}",
            weight.dims(),
            expected
        );
        self.weight = LinearWeight::Dense(weight);
        Ok(())
    }

    /// Run this linear with `kernel` instead (same shape, bias kept), e.g. its dense
    /// weights through a faster kernel.
    pub fn set_kernel(&mut self, kernel: Arc<dyn PackedMatmul>) -> Result<()> {
        let expected = [self.out_features(), self.in_features()];
        anyhow::ensure!(
            [kernel.out_features(), kernel.in_features()] == expected,
            "replacement kernel is {}x{}, expected {:?}",
            kernel.out_features(),
            kernel.in_features(),
            expected
        );
        self.weight = LinearWeight::Packed(kernel);
        Ok(())
    }

    /// Swap in a new bias (`[out]`, or none): a transform that moves the output basis
    /// moves the bias with it.
    pub fn set_bias(&mut self, bias: Option<Tensor>) -> Result<()> {
        if let Some(b) = &bias {
            anyhow::ensure!(
                b.dims() == [self.out_features()],
                "replacement bias has shape {:?}, expected [{}]",
                b.dims(),
                self.out_features()
            );
        }
        self.bias = bias;
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_features = *dims.last().expect("linear input has at least one dim");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_features))?;
        let y = match &self.weight {
            // one 2-D GEMM against the transposed view: no copy of W, no batched broadcast
            LinearWeight::Dense(w) => x2.matmul(&w.t()?)?,
            LinearWeight::Packed(k) => k.matmul(&x2)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_features();
        Ok(y.reshape(out_dims)?)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// The same norm with weight `weight` (same shape), used as given (a `Var` stays
    /// one).
    pub fn with_weight(&self, weight: Tensor) -> Result<Self> {
        anyhow::ensure!(
            weight.dims() == self.weight.dims(),
            "replacement norm weight has shape {:?}, expected {:?}",
            weight.dims(),
            self.weight.dims()
        );
        Ok(Self {
            weight,
            eps: self.eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(x, Mode::Fused)
    }

    /// The norm with candle's fused kernel, or (differentiable) from elementwise ops.
    pub fn forward_in(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(match mode {
            // bf16/f16: normalised in f32 and rounded once (candle's kernel would round
            // the row's rms to the dtype, then the quotient, then the product)
            Mode::Fused if matches!(x.dtype(), DType::BF16 | DType::F16) => {
                candle_nn::ops::rms_norm(
                    &x.to_dtype(DType::F32)?,
                    &self.weight.to_dtype(DType::F32)?,
                    self.eps,
                )?
                .to_dtype(x.dtype())?
            }
            Mode::Fused => candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?,
            Mode::Differentiable => candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)?,
        })
    }
}
