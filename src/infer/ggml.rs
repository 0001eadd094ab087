//! The GGML route: layouts that map exactly onto a GGML block type candle already runs are
//! repacked into those blocks at load and multiplied by [`QMatMul`].
//!
//! | layout | block | weights |
//! |---|---|---|
//! | 4-bit sym (zero 8), contiguous groups of 32·k | Q4_0 | exact: `d = scale`, nibble = code |
//! | 8-bit sym (zero 128), contiguous groups of 32·k | Q8_0 | exact: `d = scale`, `q = code − 128` |
//! | 4-bit asym, contiguous groups of 32·k | Q4_1 | `d = scale`, `m = −scale·zero` rounded to f16: per weight error ≤ 2⁻¹¹·|m| |
//!
//! The weights are exact (or nearly, Q4_1) but the products are not: candle's CPU kernels
//! quantize each 32-block of the activations to 8 bits (Q8_0 / Q8_1) before the integer
//! dot product, an error of up to ~0.57·max|x_block|/127 per activation. The tests bound
//! exactly that; the README gives the measured effect.

use crate::model::PackedMatmul;
use crate::pack::gguf::blocks::push_codes;
use crate::pack::gguf::GgmlType;
use crate::quant::QuantizedLinear;
use anyhow::{bail, ensure, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use half::f16;

const BLOCK: usize = crate::pack::gguf::QK;

/// The GGML block type a layer maps onto, if any.
pub fn ggml_type(q: &QuantizedLinear) -> Option<GgmlDType> {
    let (n, k) = (q.out_features, q.in_features);
    let g = q.grid.group_size.columns(k);
    let contiguous = q
        .g_idx
        .iter()
        .enumerate()
        .all(|(j, &gi)| gi as usize == j / g);
    if !k.is_multiple_of(BLOCK) || !g.is_multiple_of(BLOCK) || !contiguous || n == 0 {
        return None;
    }
    let all_zeros = |z: u8| q.zeros.iter().all(|&v| v == z);
    match (q.grid.bits, q.grid.sym) {
        (4, true) if all_zeros(8) => Some(GgmlDType::Q4_0),
        (8, true) if all_zeros(128) => Some(GgmlDType::Q8_0),
        (4, false) => Some(GgmlDType::Q4_1),
        _ => None,
    }
}

/// A quantized linear repacked into GGML blocks, run by candle's [`QMatMul`].
#[derive(Debug)]
pub struct GgmlLinear {
    qmm: QMatMul,
    dtype: GgmlDType,
    out_features: usize,
    in_features: usize,
    bytes: usize,
}

impl GgmlLinear {
    /// Repack `q`; an error when its layout has no exact GGML block type.
    pub fn from_quantized(q: &QuantizedLinear) -> Result<Self> {
        let Some(dtype) = ggml_type(q) else {
            bail!(
                "w{} g{} {} {}x{} has no GGML block type (needs 4-bit or 8-bit sym, or 4-bit asym, with contiguous groups and in_features a multiple of 32)",
                q.grid.bits,
                q.grid.group_size.as_i64(),
                if q.grid.sym { "sym" } else { "asym" },
                q.out_features,
                q.in_features
            );
        };
        let (n, k) = (q.out_features, q.in_features);
        // the block layouts GGUF export writes (src/pack/gguf/blocks.rs)
        let layout = match dtype {
            GgmlDType::Q4_0 => GgmlType::Q4_0,
            GgmlDType::Q8_0 => GgmlType::Q8_0,
            _ => GgmlType::Q4_1,
        };
        let mut raw = Vec::with_capacity(n * (k / BLOCK) * dtype.type_size());
        for r in 0..n {
            let codes = &q.codes[r * k..(r + 1) * k];
            for (b, c) in codes.chunks_exact(BLOCK).enumerate() {
                let p = q.params(q.g_idx[b * BLOCK] as usize, r);
                raw.extend_from_slice(&f16::from_f32(p.scale).to_le_bytes());
                if dtype == GgmlDType::Q4_1 {
                    let m = -p.scale * p.zero as f32;
                    raw.extend_from_slice(&f16::from_f32(m).to_le_bytes());
                }
                let codes: &[u8; BLOCK] = c.try_into()?;
                push_codes(layout, &mut raw, codes);
            }
        }
        let bytes = raw.len();
        if dtype == GgmlDType::Q4_1 && cfg!(any(target_arch = "x86", target_arch = "x86_64")) {
            warn_scalar_q4_1();
        }
        let qt = qtensor_from_ggml(dtype, &raw, vec![n, k], &Device::Cpu)?;
        let qmm = QMatMul::from_qtensor(qt)?;
        ensure!(
            matches!(qmm, QMatMul::QTensor(_)),
            "candle dequantized the {dtype:?} weights on load (CANDLE_DEQUANTIZE_ALL set?)"
        );
        Ok(Self {
            qmm,
            dtype,
            out_features: n,
            in_features: k,
            bytes,
        })
    }

    pub fn ggml_dtype(&self) -> GgmlDType {
        self.dtype
    }
}

/// candle 0.11 has AVX2 dot products for Q4_0, Q8_0 and the K-quants but none for Q4_1:
/// on x86 its Q4_1 layers run a scalar loop (measured on the fixture: prefill 28–30 tok/s
/// against 102–120 for Q4_0 on this route and 410–457 for bitsmith's kernels on the same
/// weights). Said once per process, at load.
fn warn_scalar_q4_1() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "warning: --kernels ggml runs asymmetric 4-bit layers as Q4_1, for which candle \
             has no SIMD kernel on x86 (a scalar loop, several times slower); \
             --kernels auto runs the same weights on bitsmith's exact kernels"
        )
    });
}

impl PackedMatmul for GgmlLinear {
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.qmm.forward(&x.to_dtype(DType::F32)?.contiguous()?)?;
        Ok(y.to_dtype(x.dtype())?)
    }
    fn resident_bytes(&self) -> usize {
        self.bytes
    }
    fn describe(&self) -> String {
        format!("ggml {:?} (candle QMatMul)", self.dtype)
    }
}
