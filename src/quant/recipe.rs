//! A recipe: what `bitsmith quantize` does to a model, as data. Stages run in this order:
//! transforms (rewrite the float model) → allocation (choose each linear's grid) →
//! rounding (pick the grid points), with the calibration text the data-driven stages read.
//! The CLI builds a recipe from its flags (`--method` is a preset) or reads one from a JSON
//! file (`--recipe`); every packed model records its recipe in `bitsmith.json`, and that
//! recipe given back reproduces the run.
//!
//! ```json
//! {
//!   "transforms": [{"kind": "hadamard", "seed": 0}],
//!   "allocation": {"kind": "uniform", "grid": {"kind": "uniform", "bits": 3, "group_size": 128, "sym": false}},
//!   "rounding": {"kind": "gptq", "damp": 0.01, "block_size": 128, "act_order": false, "static_groups": false},
//!   "calibration": {"nsamples": 128, "seqlen": 2048, "seed": 0, "true_sequential": true},
//!   "lm_head": false
//! }
//! ```

use super::baq::layer::{BudgetKind, LayerBudget};
use super::flexround::{FlexInit, FlexRoundSpec, Reconstruct};
use super::grid::{GgmlType, GridSpec, GroupSize, PowerLevels, RangeFit};
use super::transform::{DownProjHadamard, HadamardRotation, OstQuant, OstQuantSpec, Transform};
use crate::error::{ErrorKind, ResultExt};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything that determines a quantization run's result, save the model itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Function-preserving rewrites of the float model, applied in order.
    #[serde(default)]
    pub transforms: Vec<TransformSpec>,
    pub allocation: AllocationSpec,
    pub rounding: RoundingSpec,
    /// Calibration for the stages that read data (GPTQ's Hessians, BAQ's measurement).
    #[serde(default)]
    pub calibration: CalibrationSpec,
    /// Quantize `lm_head` too (RTN with a uniform allocation only).
    #[serde(default)]
    pub lm_head: bool,
}

/// A transform stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TransformSpec {
    /// Random Hadamard rotation of the residual stream (QuaRot-style, weights only);
    /// `seed` draws its signs.
    Hadamard {
        #[serde(default)]
        seed: u64,
        /// Store the rotated head and embedding in f32 instead of the source's dtype.
        #[serde(default)]
        f32_head: bool,
    },
    /// OSTQuant: learned rotations and scalings (trained here, or loaded from
    /// `transforms`), with `R4` run online unless `online_hadamard` is false.
    Ostquant(OstQuantSpec),
    /// QuaRot's online Hadamard before `down_proj`: `down_proj`'s weight is rotated and the
    /// model's config declares the online op (`bitsmith_online_hadamard`), which only a
    /// runtime that knows it (bitsmith) runs.
    DownHadamard,
}

/// How each linear's grid is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AllocationSpec {
    /// Every linear on the same grid.
    Uniform { grid: GridSpec },
    /// BAQ (methods.md §3): a width per input column from a measurement of column losses.
    Baq(BaqSpec),
    /// BAQ's model-wide budget over GGML block types: a type per linear for a GGUF file
    /// (`quant::baq::ggml_types`).
    BaqGgml(BaqGgmlSpec),
}

/// BAQ over GGML block types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaqGgmlSpec {
    /// Stored bits per quantized weight over all linears (blocks with their scales).
    pub bits: f64,
    /// The types a linear may take.
    #[serde(default = "default_ggml_types")]
    pub types: Vec<GgmlType>,
    /// Reuse pass-1 column losses from an earlier run (the
    /// `<OUT>.column_losses.safetensors` a BAQ-over-types run writes beside its GGUF, or
    /// any run's `column_losses.safetensors` measured at 4 bits per channel) instead of
    /// measuring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measurement: Option<PathBuf>,
}

/// Every GGML block type bitsmith writes.
pub fn default_ggml_types() -> Vec<GgmlType> {
    GgmlType::ALL
        .into_iter()
        .filter(|t| !t.is_float())
        .collect()
}

/// BAQ's allocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaqSpec {
    /// Average bits per weight: everything stored, or code bits only with `code_bits`.
    pub bits: f64,
    #[serde(default = "default_allowed_bits")]
    pub allowed_bits: Vec<u8>,
    #[serde(default = "default_theta")]
    pub theta: f64,
    #[serde(default)]
    pub code_bits: bool,
    #[serde(default)]
    pub scope: BaqScope,
    /// Range groups of equal-width columns inside each width run (`-1`: one per row and
    /// width).
    #[serde(default = "per_channel")]
    pub group_size: GroupSize,
    #[serde(default)]
    pub sym: bool,
    /// How each range group's scale and zero are fitted.
    #[serde(default, skip_serializing_if = "RangeFit::is_min_max")]
    pub range: RangeFit,
    /// Reuse pass-1 column losses from an earlier run (its output folder or
    /// `column_losses.safetensors`) instead of measuring.
    #[serde(default)]
    pub measurement: Option<PathBuf>,
    /// Each width on NUPES' power codebook with these levels (its exponent fitted per
    /// width and layer) instead of the uniform grid; written in the mixed-codebook layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codebook: Option<PowerLevels>,
}

/// Where a BAQ budget applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BaqScope {
    /// Every layer meets the budget on its own (the paper).
    #[default]
    Layer,
    /// One budget over all layers.
    Model,
}

/// How grid points are picked.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RoundingSpec {
    /// Round to nearest (no calibration).
    Rtn,
    /// GPTQ (methods.md §2).
    Gptq(GptqSpec),
    /// FlexRound (methods.md §4), learned from an RTN or GPTQ start.
    #[serde(rename = "flexround")]
    FlexRound(FlexRoundSpec),
}

impl RoundingSpec {
    /// Whether the codes come with act-order's column-to-group map (`desc_act`).
    pub fn permutes_groups(&self) -> bool {
        let permutes = |g: &GptqSpec| g.act_order && !g.static_groups;
        match self {
            Self::Rtn => false,
            Self::Gptq(g) => permutes(g),
            Self::FlexRound(f) => f.init == FlexInit::Gptq && permutes(&f.gptq),
        }
    }
}

/// GPTQ's options.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptqSpec {
    #[serde(default = "default_damp")]
    pub damp: f64,
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    #[serde(default)]
    pub act_order: bool,
    #[serde(default)]
    pub static_groups: bool,
    /// After the solve, refit every scale by least squares for the chosen codes
    /// (`quant::refit`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refit: bool,
}

impl Default for GptqSpec {
    fn default() -> Self {
        Self {
            damp: default_damp(),
            block_size: default_block_size(),
            act_order: false,
            static_groups: false,
            refit: false,
        }
    }
}

/// Calibration text and how it is sampled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    /// Plain text or JSONL with a `text` field; `None`: the embedded WikiText-2
    /// validation split.
    #[serde(default)]
    pub text: Option<PathBuf>,
    #[serde(default = "default_nsamples")]
    pub nsamples: usize,
    /// Tokens per segment (capped at the model's context).
    #[serde(default = "default_seqlen")]
    pub seqlen: usize,
    #[serde(default)]
    pub seed: u64,
    /// Quantize a block's linears group by group, each seeing the already-quantized ones.
    #[serde(default = "yes")]
    pub true_sequential: bool,
}

impl Default for CalibrationSpec {
    fn default() -> Self {
        Self {
            text: None,
            nsamples: default_nsamples(),
            seqlen: default_seqlen(),
            seed: 0,
            true_sequential: true,
        }
    }
}

fn default_allowed_bits() -> Vec<u8> {
    (2..=8).collect()
}
fn default_theta() -> f64 {
    1.95
}
fn per_channel() -> GroupSize {
    GroupSize::PerChannel
}
fn default_damp() -> f64 {
    0.01
}
fn default_block_size() -> usize {
    128
}
fn default_nsamples() -> usize {
    128
}
fn default_seqlen() -> usize {
    2048
}
fn yes() -> bool {
    true
}

impl TransformSpec {
    /// The stage this spec describes.
    pub fn build(&self) -> Box<dyn Transform> {
        match self {
            Self::Hadamard { seed, f32_head } => Box::new(HadamardRotation {
                seed: *seed,
                f32_head: *f32_head,
            }),
            Self::Ostquant(spec) => Box::new(OstQuant { spec: spec.clone() }),
            Self::DownHadamard => Box::new(DownProjHadamard),
        }
    }
}

impl BaqSpec {
    /// The per-layer budget this allocation spends.
    pub fn budget(&self) -> LayerBudget {
        LayerBudget {
            kind: if self.code_bits {
                BudgetKind::Codes
            } else {
                BudgetKind::Stored
            },
            bits: self.bits,
            allowed: self.allowed_bits.clone(),
            theta: self.theta,
            group_size: self.group_size.as_columns(),
            codebook: self.codebook.is_some(),
        }
    }
}

impl Recipe {
    /// Read a recipe, checked: a recipe file (JSON), or the `bitsmith.json` of a packed
    /// model (or its folder), whose `recipe` made that model. An unreadable or malformed
    /// file is [`ErrorKind::InvalidInput`], a value out of range
    /// [`ErrorKind::InvalidOption`].
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let recipe = Self::read(path).kind(ErrorKind::InvalidInput)?;
        recipe
            .validate()
            .with_context(|| format!("checking the recipe {}", path.display()))?;
        Ok(recipe)
    }

    fn read(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("bitsmith.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading the recipe {}", file.display()))?;
        let mut value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing the recipe {}", file.display()))?;
        if value.get("bitsmith_version").is_some() {
            value = value
                .get_mut("recipe")
                .map(serde_json::Value::take)
                .with_context(|| {
                    format!(
                        "{} was written before recipes were recorded; it holds no `recipe`",
                        file.display()
                    )
                })?;
        }
        serde_json::from_value(value)
            .with_context(|| format!("parsing the recipe {}", file.display()))
    }

    /// Whether a stage reads calibration data.
    pub fn needs_calibration(&self) -> bool {
        matches!(
            self.rounding,
            RoundingSpec::Gptq(_) | RoundingSpec::FlexRound(_)
        ) || matches!(&self.allocation, AllocationSpec::Baq(b) if b.measurement.is_none())
            || matches!(&self.allocation, AllocationSpec::BaqGgml(b) if b.measurement.is_none())
    }

    /// A short name for logs and `quantization_config.meta`: the preset this recipe is.
    pub fn method_name(&self) -> &'static str {
        match (&self.allocation, &self.rounding) {
            (AllocationSpec::Baq(_) | AllocationSpec::BaqGgml(_), RoundingSpec::Gptq(_)) => "baq",
            (AllocationSpec::BaqGgml(_), RoundingSpec::Rtn) => "baq+rtn",
            (AllocationSpec::Baq(_), RoundingSpec::Rtn) => "baq+rtn",
            (
                AllocationSpec::Uniform {
                    grid: GridSpec::Power { .. },
                },
                RoundingSpec::Gptq(_),
            ) => "nupes+gptq",
            (
                AllocationSpec::Uniform {
                    grid: GridSpec::Power { .. },
                },
                RoundingSpec::Rtn,
            ) => "nupes",
            (
                AllocationSpec::Uniform {
                    grid: GridSpec::Power { .. },
                },
                RoundingSpec::FlexRound(f),
            ) => {
                if f.learn_exponent {
                    "nupes+learned"
                } else {
                    "nupes+flexround"
                }
            }
            (AllocationSpec::Baq(_) | AllocationSpec::BaqGgml(_), RoundingSpec::FlexRound(_)) => {
                "baq+flexround"
            }
            (_, RoundingSpec::FlexRound(_)) => "flexround",
            (_, RoundingSpec::Gptq(_)) => "gptq",
            (_, RoundingSpec::Rtn) => "rtn",
        }
    }

    /// Check every value before any work starts; a value out of range or a combination
    /// bitsmith does not run is [`ErrorKind::InvalidOption`].
    pub fn validate(&self) -> crate::Result<()> {
        Ok(self.check().kind(ErrorKind::InvalidOption)?)
    }

    fn check(&self) -> Result<()> {
        match &self.allocation {
            AllocationSpec::Uniform { grid } => grid.validate()?,
            AllocationSpec::BaqGgml(b) => {
                ensure!(
                    b.bits.is_finite() && b.bits > 0.0,
                    "BAQ bits {} must be a positive number",
                    b.bits
                );
                ensure!(
                    !b.types.is_empty() && b.types.iter().all(|t| !t.is_float()),
                    "BAQ's GGML types {:?} must be block types, at least one",
                    b.types.iter().map(|t| t.name()).collect::<Vec<_>>()
                );
            }
            AllocationSpec::Baq(b) => {
                ensure!(
                    b.bits.is_finite() && b.bits > 0.0 && b.bits <= 8.0,
                    "BAQ bits {} is outside (0, 8]",
                    b.bits
                );
                ensure!(
                    !b.allowed_bits.is_empty() && b.allowed_bits.iter().all(|&w| w <= 8),
                    "BAQ allowed widths {:?} must be non-empty and within 0..=8",
                    b.allowed_bits
                );
                // stored bits include metadata on top of the codes, so neither kind of budget
                // can go below the narrowest allowed width
                let narrowest = b.allowed_bits.iter().copied().min().unwrap_or(0);
                ensure!(
                    b.bits >= narrowest as f64,
                    "BAQ budget {} bits is impossible: the narrowest allowed width is {narrowest} \
                     bits{}; raise --bits or allow narrower widths (--allowed-bits)",
                    b.bits,
                    if b.code_bits {
                        ""
                    } else {
                        " and the stored budget also counts scales, zeros and column metadata"
                    }
                );
                ensure!(
                    b.theta.is_finite() && b.theta > 0.0,
                    "BAQ theta {} must be a positive number",
                    b.theta
                );
                if b.codebook.is_some() {
                    ensure!(
                        !b.sym,
                        "BAQ's power codebooks are symmetric around zero by construction (one \
                         scale per group, no zero point); drop --sym"
                    );
                    ensure!(
                        b.range != RangeFit::FullRange,
                        "the full-range fit is for symmetric uniform grids; a power codebook's \
                         scale is its group's largest magnitude (minmax) or searched"
                    );
                    ensure!(
                        b.allowed_bits.iter().all(|&w| w == 0 || w >= 2),
                        "a power codebook has 2 to 8 bits: --allowed-bits {:?} has 1 (0, \
                         pruning, is allowed)",
                        b.allowed_bits
                    );
                    ensure!(
                        !matches!(self.rounding, RoundingSpec::FlexRound(_)),
                        "FlexRound does not run on BAQ's power codebooks yet; use --rounding \
                         gptq or rtn"
                    );
                }
            }
        }
        if let RoundingSpec::Gptq(g) = &self.rounding {
            ensure!(
                g.damp.is_finite() && g.damp >= 0.0,
                "GPTQ damp {} must be a finite number ≥ 0",
                g.damp
            );
            ensure!(g.block_size > 0, "GPTQ block size must be positive");
            let ggml = match &self.allocation {
                AllocationSpec::Uniform {
                    grid: GridSpec::Ggml { ty },
                } => Some(ty.name()),
                AllocationSpec::BaqGgml(_) => Some("GGML"),
                _ => None,
            };
            if let Some(ty) = ggml {
                ensure!(
                    !g.act_order || g.static_groups,
                    "GPTQ with --act-order on {ty} blocks needs --static-groups: a block's \
                     columns must stay together"
                );
                ensure!(
                    !g.refit,
                    "--refit refits bitsmith's uniform scales; {ty} blocks keep their own"
                );
            }
        }
        // FlexRound trains every GGML block type (`FLEXROUND_GGML_TYPES`); the float types
        // are refused above as no grid at all
        if let RoundingSpec::FlexRound(f) = &self.rounding {
            ensure!(
                !f.learn_exponent
                    || matches!(
                        self.allocation,
                        AllocationSpec::Uniform {
                            grid: GridSpec::Power { .. }
                        }
                    ),
                "a learned exponent needs NUPES' power grid (--method nupes --rounding learned)"
            );
            ensure!(f.iters > 0, "FlexRound needs at least one iteration");
            ensure!(
                !f.bf16_streams || f.reconstruct == Reconstruct::Block,
                "bf16 activation streams are an option of block reconstruction (the layer mode \
                 keeps no streams)"
            );
            ensure!(
                f.batch > 0,
                "FlexRound's batch must hold at least one sequence"
            );
            ensure!(
                f.lr.is_finite() && f.lr > 0.0,
                "FlexRound's learning rate {} must be a finite number > 0",
                f.lr
            );
        }
        let c = &self.calibration;
        ensure!(c.nsamples > 0, "calibration needs at least one sample");
        ensure!(c.seqlen >= 2, "calibration segments need at least 2 tokens");
        if self.lm_head
            && !(matches!(self.rounding, RoundingSpec::Rtn)
                && matches!(self.allocation, AllocationSpec::Uniform { .. }))
        {
            bail!("quantizing lm_head is supported with RTN on a uniform grid only");
        }
        Ok(())
    }

    /// The uniform grid of a uniform allocation.
    pub fn uniform_grid(&self) -> Option<GridSpec> {
        match &self.allocation {
            AllocationSpec::Uniform { grid } => Some(*grid),
            AllocationSpec::Baq(_) | AllocationSpec::BaqGgml(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::flexround::ggml_blocks::FLEXROUND_GGML_TYPES;

    fn gptq_w3() -> Recipe {
        Recipe {
            transforms: vec![TransformSpec::Hadamard {
                seed: 3,
                f32_head: false,
            }],
            allocation: AllocationSpec::Uniform {
                grid: GridSpec::Uniform {
                    bits: 3,
                    group_size: GroupSize::Columns(128),
                    sym: false,
                    range: RangeFit::MinMax,
                },
            },
            rounding: RoundingSpec::Gptq(GptqSpec::default()),
            calibration: CalibrationSpec::default(),
            lm_head: false,
        }
    }

    #[test]
    fn round_trips_and_fills_defaults() {
        let r = gptq_w3();
        let json = serde_json::to_string_pretty(&r).unwrap();
        assert_eq!(serde_json::from_str::<Recipe>(&json).unwrap(), r);
        let short = r#"{"transforms": [{"kind": "hadamard", "seed": 3}],
            "allocation": {"kind": "uniform", "grid": {"kind": "uniform", "bits": 3, "group_size": 128}},
            "rounding": {"kind": "gptq"}}"#;
        assert_eq!(serde_json::from_str::<Recipe>(short).unwrap(), r);
        let both = short.replace(r#"}],"#, r#"}, {"kind": "down_hadamard"}],"#);
        let mut r2 = r.clone();
        r2.transforms.push(TransformSpec::DownHadamard);
        assert_eq!(serde_json::from_str::<Recipe>(&both).unwrap(), r2);
        let json = serde_json::to_string(&r2).unwrap();
        assert_eq!(serde_json::from_str::<Recipe>(&json).unwrap(), r2);
        let baq = r#"{"allocation": {"kind": "baq", "bits": 3.2}, "rounding": {"kind": "gptq"}}"#;
        let b: Recipe = serde_json::from_str(baq).unwrap();
        b.validate().unwrap();
        assert_eq!(b.method_name(), "baq");
        assert!(b.needs_calibration());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let typo = r#"{"allocation": {"kind": "uniform", "grid": {"kind": "uniform", "bits": 4, "group_size": 128}},
            "rounding": {"kind": "gptq", "dampp": 0.1}}"#;
        let e = serde_json::from_str::<Recipe>(typo)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dampp"), "{e}");
        let mut r = gptq_w3();
        r.rounding = RoundingSpec::Gptq(GptqSpec {
            damp: f64::NAN,
            ..GptqSpec::default()
        });
        let e = r.validate().unwrap_err().to_string();
        assert!(e.contains("damp NaN"), "{e}");
        let mut r = gptq_w3();
        r.lm_head = true;
        assert!(r.validate().is_err());
        let mut r = gptq_w3();
        r.allocation = AllocationSpec::Uniform {
            grid: GridSpec::Uniform {
                bits: 5,
                group_size: GroupSize::PerChannel,
                sym: false,
                range: RangeFit::MinMax,
            },
        };
        let e = r.validate().unwrap_err().to_string();
        assert!(e.contains("unsupported bit width 5"), "{e}");
    }

    /// FlexRound runs on BAQ's choice between GGML types: it trains every block type BAQ
    /// may choose (IQ4_NL included); a float type is refused as no grid.
    #[test]
    fn flexround_runs_on_every_type_baq_over_ggml_types_chooses() {
        let baq = |types: Vec<GgmlType>| Recipe {
            allocation: AllocationSpec::BaqGgml(BaqGgmlSpec {
                bits: 4.5,
                types,
                measurement: None,
            }),
            rounding: RoundingSpec::FlexRound(FlexRoundSpec::default()),
            ..gptq_w3()
        };
        let mut trained = FLEXROUND_GGML_TYPES.to_vec();
        trained.sort_by_key(|t| t.id());
        let mut default = default_ggml_types();
        default.sort_by_key(|t| t.id());
        assert_eq!(trained, default);
        let ok = baq(default);
        ok.validate().unwrap();
        assert_eq!(ok.method_name(), "baq+flexround");
        let e = baq(vec![GgmlType::Q4K, GgmlType::F16])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("F16"), "{e}");
    }
}
