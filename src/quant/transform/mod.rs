//! Transforms: stages that rewrite the model before any rounding, so that the float model
//! computes the same function while its weights become easier to quantize. A transform's
//! output is a [`TransformedModel`]: the rewritten weights as a lazy
//! [`crate::loader::TensorRewrite`] over the source store (read tensor by tensor, never the
//! whole model in memory) and the config that goes with them.
//!
//! Transforms: [`HadamardRotation`] (training-free, weights only) and [`DownProjHadamard`]
//! (training-free, leaves an online Hadamard before `down_proj` in the model), and
//! [`OstQuant`] (learned rotations and scalings, optionally with that online Hadamard).

pub mod down_hadamard;
pub mod ostquant;
pub mod rotation;

pub use crate::model::Hadamard;
pub use down_hadamard::DownProjHadamard;
pub use ostquant::{OstQuant, OstQuantSpec, R1Init};
pub use rotation::{HadamardRotation, ResidualRotation};

use crate::calibration::CalibrationSource;
use crate::loader::{ModelConfig, ModelFiles, SourceDType, WeightStore};
use anyhow::Result;
use std::path::PathBuf;

/// The dtype a transform stores a rotated head and embedding in: the source embedding's
/// float dtype (F32 for anything else), or F32 when `f32_head` asks for it. In the source's
/// dtype they take the bytes they took before the transform (for a bf16 source half of
/// f32, and the head dominates a small model's decode step), and the transformed float
/// model equals the original to that dtype's rounding; in f32, to f32 rounding.
pub fn head_dtype(store: &WeightStore, f32_head: bool) -> Result<SourceDType> {
    if f32_head {
        return Ok(SourceDType::F32);
    }
    Ok(match store.info("model.embed_tokens.weight")?.dtype {
        d @ (SourceDType::F32 | SourceDType::F16 | SourceDType::BF16) => d,
        _ => SourceDType::F32,
    })
}

/// The model after a transform.
pub struct TransformedModel {
    pub config: ModelConfig,
    pub store: WeightStore,
}

/// What a data-driven transform may read and where it keeps its state; training-free
/// transforms ignore it.
pub struct TransformContext<'a> {
    /// The source model's files (its tokenizer).
    pub files: Option<&'a ModelFiles>,
    /// The text to train on (the recipe's calibration text).
    pub text: CalibrationSource,
    /// Progress bars and log lines on stderr.
    pub progress: bool,
    /// The run's checkpoint folder: a training transform saves its state there and
    /// resumes it.
    pub checkpoint: Option<PathBuf>,
}

impl TransformContext<'_> {
    /// No files, no data, quiet: for the training-free transforms.
    pub fn none() -> Self {
        Self {
            files: None,
            text: CalibrationSource::Default,
            progress: false,
            checkpoint: None,
        }
    }
}

/// A function-preserving rewrite of the model's weights, applied before quantization.
pub trait Transform: Send + Sync {
    /// Short name for logs and provenance.
    fn name(&self) -> &'static str;
    fn apply(
        &self,
        config: &ModelConfig,
        store: &WeightStore,
        ctx: &TransformContext,
    ) -> Result<TransformedModel>;
}
