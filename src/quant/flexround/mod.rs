//! FlexRound (methods.md §4): learned rounding by element-wise division. Per linear the
//! grid scale `s1` (per scale group), a factor per weight `S2`, per row `s3` and optionally
//! per input column `s4`, all learned in log space; the codes are `round(W ⊘ S)` and only
//! `s1` is stored, so the result is an ordinary uniform (GPTQ layout) or mixed-width (BAQ)
//! layer.
//!
//! Two reconstruction modes: block-wise ([`blockwise`], the paper: the block's output on the
//! quantized stream against the float block on the float stream) and layer-wise
//! ([`layerwise`]: each linear against its own output error through its Hessian). Both
//! start from another rounding's codes: RTN (the paper) or GPTQ.

pub mod blockwise;
pub mod exponent;
pub mod ggml_blocks;
pub mod layerwise;
pub mod layout;
pub mod quantizer;

pub use layerwise::LayerwiseFlexRound;
pub use quantizer::FlexQuantizer;

use super::recipe::GptqSpec;
use serde::{Deserialize, Serialize};

/// Where the learned division starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FlexInit {
    /// Round to nearest on the planned grid (the paper).
    Rtn,
    /// GPTQ's solution on the planned grid: the division starts where GPTQ's error
    /// feedback ended (the default: on the fixture it is far ahead of the RTN start at the
    /// step budget a CPU affords).
    #[default]
    Gptq,
}

/// What one step of training reconstructs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Reconstruct {
    /// A decoder block's output (the paper).
    #[default]
    Block,
    /// Each linear's output, through its Hessian.
    Layer,
}

/// FlexRound's options.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlexRoundSpec {
    #[serde(default)]
    pub init: FlexInit,
    #[serde(default)]
    pub reconstruct: Reconstruct,
    /// Adam steps per block (block mode) or per linear (layer mode).
    #[serde(default = "default_iters")]
    pub iters: usize,
    /// Calibration sequences per step (block mode).
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Adam's learning rate on the log-space factors, decayed to 0 by a cosine.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Learn a per-input-column factor `s4` too.
    #[serde(default)]
    pub s4: bool,
    /// Draws the order of the calibration batches (block mode).
    #[serde(default)]
    pub seed: u64,
    /// GPTQ's options for a GPTQ start.
    #[serde(default)]
    pub gptq: GptqSpec,
    /// On NUPES' power grid: learn each layer's exponent with the factors (learned
    /// NUPES: the division moves every weight to any level, the exponent moves the levels).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learn_exponent: bool,
    /// Block mode: hold the two activation streams and the float block's outputs in bf16
    /// (half their memory); every forward and training step widens what it reads to f32.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bf16_streams: bool,
}

fn default_iters() -> usize {
    40
}
fn default_batch() -> usize {
    2
}
fn default_lr() -> f64 {
    3e-3
}

impl Default for FlexRoundSpec {
    fn default() -> Self {
        Self {
            init: FlexInit::default(),
            reconstruct: Reconstruct::default(),
            iters: default_iters(),
            batch: default_batch(),
            lr: default_lr(),
            s4: false,
            seed: 0,
            gptq: GptqSpec::default(),
            learn_exponent: false,
            bf16_streams: false,
        }
    }
}

/// The options the trainers read (the spec, minus what picks the trainer).
pub type FlexRoundOptions = FlexRoundSpec;
