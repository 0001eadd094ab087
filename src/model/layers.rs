//! Linear layers and RMSNorm.

use anyhow::Result;
use candle_core::Tensor;

/// `y = x Wᵀ + b` with `W` `[out, in]`. Quantized models hold their dequantized weights
/// here; a quantizer replaces `weight` in place.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Swap in new weights (same shape), e.g. fake-quantized ones.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        anyhow::ensure!(
            weight.dims() == self.weight.dims(),
            "replacement weight has shape {:?}, expected {:?}",
            weight.dims(),
            self.weight.dims()
        );
        self.weight = weight;
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_features = *dims.last().expect("linear input has at least one dim");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        // one 2-D GEMM against the transposed view: no copy of W, no batched broadcast
        let y = x.reshape((rows, in_features))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.weight.dim(0)?;
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

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}
