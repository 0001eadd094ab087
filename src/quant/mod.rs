//! Quantization: a [`Recipe`] of stages run by [`quantize`] (the call `bitsmith quantize`
//! makes). Transforms (`transform`) rewrite the float model; an allocation (`allocation`,
//! BAQ in `baq`) chooses each linear's grid (`grid`); a rounding (`rounding`: `rtn`,
//! `gptq`) picks the grid points of each linear, run by the looper (`calibrated`, block by
//! block with calibration data; `pipeline`, linear by linear without). [`LayerQuantizer`]
//! is what the looper runs per linear.

pub mod allocation;
pub mod baq;
pub mod calibrated;
pub mod checkpoint;
pub mod flexround;
pub mod gptq;
pub mod grid;
pub mod pipeline;
pub mod quantized;
pub mod recipe;
pub mod reconstruct;
pub mod refit;
pub mod rounding;
pub mod rtn;
pub mod run;
pub mod transform;

pub use calibrated::{quantize_model_calibrated, CalibratedModel, CalibratedOptions};
pub use gptq::{gptq, gptq_mixed, Gptq, GptqOptions, GptqOutput, GptqRounding, MixedOutput};
pub use grid::{
    Grid, GridSpec, GroupParams, GroupSize, PowerGrid, PowerLevels, UniformGrid, SUPPORTED_BITS,
};
pub use pipeline::{quantize_model, QuantizeOptions, QuantizedModel};
pub use quantized::{
    apply_quantized, mixed_groups, CodebookQuantizedLinear, GgmlQuantizedLinear, GridCodes, MixedGroups,
    MixedCodebookQuantizedLinear, MixedQuantizedLinear, QuantizedLinear, WidthCodebook,
};

pub use recipe::Recipe;
pub use rtn::{Rtn, RtnRounding};
pub use run::{quantize, QuantizeOutput, RunOptions, SourceModel};

use anyhow::Result;

/// One linear layer handed to a layer-wise quantizer.
pub struct LayerToQuantize<'a> {
    /// Full module name, e.g. `model.layers.3.mlp.down_proj`.
    pub name: &'a str,
    /// `[out_features, in_features]`, row-major f32.
    pub weight: &'a [f32],
    pub out_features: usize,
    pub in_features: usize,
    /// `X^T X` proxy of the layer inputs (`[in, in]`), for methods that need it.
    pub hessian: Option<&'a [f32]>,
}

/// A quantized layer: one uniform grid (GPTQ layout), a width per column (BAQ), a
/// per-layer codebook (NUPES) or BAQ's widths on power codebooks.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerCodes {
    Uniform(QuantizedLinear),
    Mixed(MixedQuantizedLinear),
    Codebook(CodebookQuantizedLinear),
    /// A width per column, each width on its own power codebook.
    MixedCodebook(MixedCodebookQuantizedLinear),
    /// GGML blocks, as a GGUF file stores them.
    Ggml(GgmlQuantizedLinear),
}

impl From<GridCodes<grid::GgmlGrid>> for LayerCodes {
    fn from(c: GridCodes<grid::GgmlGrid>) -> Self {
        Self::Ggml(c.into())
    }
}

impl From<GridCodes<UniformGrid>> for LayerCodes {
    fn from(c: GridCodes<UniformGrid>) -> Self {
        Self::Uniform(c.into())
    }
}

impl From<GridCodes<PowerGrid>> for LayerCodes {
    fn from(c: GridCodes<PowerGrid>) -> Self {
        Self::Codebook(c.into())
    }
}

impl LayerCodes {
    /// The f32 weights `[out, in]` the codes stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            Self::Uniform(q) => q.dequantize(),
            Self::Mixed(q) => q.dequantize(),
            Self::Codebook(q) => q.dequantize(),
            Self::MixedCodebook(q) => q.dequantize(),
            Self::Ggml(q) => q.dequantize(),
        }
    }

    pub fn as_uniform(&self) -> Option<&QuantizedLinear> {
        match self {
            Self::Uniform(q) => Some(q),
            Self::Mixed(_) | Self::Codebook(_) | Self::MixedCodebook(_) | Self::Ggml(_) => None,
        }
    }

    /// The uniform form, or an error for a mixed-width layer (which the GPTQ layout cannot hold).
    pub fn into_uniform(self) -> Result<QuantizedLinear> {
        match self {
            Self::Uniform(q) => Ok(q),
            Self::Mixed(_) => {
                anyhow::bail!("a mixed-width layer cannot be stored in the GPTQ layout")
            }
            Self::Codebook(_) | Self::MixedCodebook(_) => {
                anyhow::bail!("a codebook layer cannot be stored in the GPTQ layout")
            }
            Self::Ggml(q) => {
                anyhow::bail!("a {} layer is stored as GGUF (--format gguf)", q.ty)
            }
        }
    }
}

/// What a layer-wise method returns.
#[derive(Debug, Clone)]
pub struct LayerResult {
    pub codes: LayerCodes,
    /// Per input column, the loss the method attributes to it (GPTQ's
    /// `Σ_rows (w − q)² / (2 U_jj²)`), where the method measures one.
    pub column_loss: Option<Vec<f64>>,
    /// A trained rounding's own objective at its start and at its end (FlexRound's
    /// `½ tr(ΔW H ΔWᵀ)` from its initial codes and after training).
    pub trained_loss: Option<(f64, f64)>,
}

/// A method that quantizes one linear layer at a time on a grid.
pub trait LayerQuantizer: Send + Sync {
    /// Short name for logs and `quantization_config.meta`.
    fn name(&self) -> &'static str;
    /// Whether `LayerToQuantize::hessian` must be provided (calibration needed).
    fn needs_hessian(&self) -> bool;
    fn quantize(&self, layer: &LayerToQuantize) -> Result<LayerResult>;
}
