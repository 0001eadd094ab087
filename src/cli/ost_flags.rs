//! `quantize`'s OSTQuant flags (`--transform ostquant`).

use crate::quant::transform::{OstQuantSpec, R1Init};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct OstFlags {
    /// OSTQuant training steps (default 100, the paper's; at 2 × 512 tokens each, ~40 min on 2 CPU cores).
    #[arg(
        long,
        value_name = "N",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_steps: Option<usize>,
    /// OSTQuant sequences per step (the paper: 16; default 2, for a CPU budget).
    #[arg(
        long,
        value_name = "N",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_batch: Option<usize>,
    /// OSTQuant tokens per training sequence (the paper: 2048; default 512).
    #[arg(
        long,
        value_name = "N",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_seqlen: Option<usize>,
    /// Learning rate of the rotations (Riemannian Adam, Cayley retraction; default 0.0169).
    #[arg(
        long,
        value_name = "LR",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_lr_rotation: Option<f64>,
    /// Learning rate of the scaling vectors (Adam; default 0.00179).
    #[arg(
        long,
        value_name = "LR",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_lr_scale: Option<f64>,
    /// k of the KL-Top loss (default 1000).
    #[arg(
        long,
        value_name = "K",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_top_k: Option<usize>,
    /// Bits of the training quantizer (symmetric; default 4).
    #[arg(
        long,
        value_name = "B",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_bits: Option<u8>,
    /// Columns per group of the training quantizer (default: one group per row).
    #[arg(
        long,
        value_name = "G",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_group: Option<usize>,
    /// Range-search shrinks of the training quantizer at each forward (default 80).
    #[arg(
        long,
        value_name = "N",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_range_steps: Option<usize>,
    /// How R1 starts: `klt` (the eigenvectors of the covariance of every q/k/v/gate/up
    /// weight row, times a random Hadamard; the default) or `hadamard` (the random Hadamard
    /// alone).
    #[arg(
        long,
        value_enum,
        value_name = "INIT",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_init: Option<R1Init>,
    /// Train and deploy without R4, the online Hadamard before down_proj: the result is a
    /// plain checkpoint any GPTQ loader runs (transformers, vLLM).
    #[arg(long, help_heading = "OSTQuant (--transform ostquant)")]
    pub no_online_hadamard: bool,
    /// Apply trained transforms (the `ostquant.safetensors` an earlier run left in its
    /// output folder) instead of training: one training, many quantizations.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "OSTQuant (--transform ostquant)"
    )]
    pub ost_transforms: Option<PathBuf>,
}

impl OstFlags {
    /// The spec these flags ask for, the defaults elsewhere; `seed` seeds the
    /// initialisation and the training text.
    pub fn spec(&self, seed: u64) -> OstQuantSpec {
        let d = OstQuantSpec::default();
        OstQuantSpec {
            steps: self.ost_steps.unwrap_or(d.steps),
            batch: self.ost_batch.unwrap_or(d.batch),
            seqlen: self.ost_seqlen.unwrap_or(d.seqlen),
            lr_rotation: self.ost_lr_rotation.unwrap_or(d.lr_rotation),
            lr_scale: self.ost_lr_scale.unwrap_or(d.lr_scale),
            top_k: self.ost_top_k.unwrap_or(d.top_k),
            bits: self.ost_bits.unwrap_or(d.bits),
            group: self.ost_group.unwrap_or(d.group),
            range_steps: self.ost_range_steps.unwrap_or(d.range_steps),
            online_hadamard: !self.no_online_hadamard,
            init: self.ost_init.unwrap_or(d.init),
            seed,
            transforms: self.ost_transforms.clone(),
            ..d
        }
    }

    /// Whether any OSTQuant flag was given (an error without `--transform ostquant`).
    pub fn any(&self) -> bool {
        self.ost_steps.is_some()
            || self.ost_batch.is_some()
            || self.ost_seqlen.is_some()
            || self.ost_lr_rotation.is_some()
            || self.ost_lr_scale.is_some()
            || self.ost_top_k.is_some()
            || self.ost_bits.is_some()
            || self.ost_group.is_some()
            || self.ost_range_steps.is_some()
            || self.no_online_hadamard
            || self.ost_init.is_some()
            || self.ost_transforms.is_some()
    }
}
