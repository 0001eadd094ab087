//! Transforms: stages that rewrite the model before any rounding, so that the float model
//! computes the same function while its weights become easier to quantize. A transform's
//! output is a [`TransformedModel`]: the rewritten weights as a lazy
//! [`crate::loader::TensorRewrite`] over the source store (read tensor by tensor, never the
//! whole model in memory) and the config that goes with them.
//!
//! Transforms: [`HadamardRotation`] (training-free, weights only) and [`DownProjHadamard`]
//! (training-free, leaves an online Hadamard before `down_proj` in the model).

pub mod down_hadamard;
pub mod rotation;

pub use crate::model::Hadamard;
pub use down_hadamard::DownProjHadamard;
pub use rotation::{HadamardRotation, ResidualRotation};

use crate::loader::{ModelConfig, WeightStore};
use anyhow::Result;

/// The model after a transform.
pub struct TransformedModel {
    pub config: ModelConfig,
    pub store: WeightStore,
}

/// A function-preserving rewrite of the model's weights, applied before quantization.
pub trait Transform: Send + Sync {
    /// Short name for logs and provenance.
    fn name(&self) -> &'static str;
    fn apply(&self, config: &ModelConfig, store: &WeightStore) -> Result<TransformedModel>;
}
