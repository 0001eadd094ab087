//! The library call behind `bitsmith quantize`: [`quantize`] runs a [`Recipe`] on a model —
//! transforms, then (when the allocation needs one) a measurement pass, the allocation's
//! plan, and the rounding of every linear by the looper (block by block with calibration
//! data and per-block checkpoints, or linear by linear without) — and returns the codes
//! for a packer to write.

use super::allocation::{
    read_measurement, Allocation, GgmlAllocation, Measurement, PowerAllocation, UniformAllocation,
};
use super::baq::ggml_types::GgmlTypeAllocation;
use super::baq::quantizer::measure;
use super::baq::BaqAllocation;
use super::calibrated::{available_memory, check_memory, memory_estimate, LayerLog};
use super::flexround::blockwise::{memory_estimate as flexround_memory, FlexRoundBlocks};
use super::flexround::{FlexInit, LayerwiseFlexRound, Reconstruct};
use super::grid::MixShape;
use super::pipeline::{quantize_model_codes, target_linears, QuantizeOptions};
use super::recipe::{AllocationSpec, BaqScope, Recipe, RoundingSpec};
use super::reconstruct::{quantize_by_blocks, BlockwiseOptions};
use super::rounding::{LayerRounding, PlannedRounding};
use super::{quantize_model_calibrated, CalibratedOptions, GptqRounding, LayerCodes, UniformGrid};
use super::{GridSpec, GroupSize, RtnRounding};
use crate::calibration::{sample_segments, CalibrationSet, CalibrationSource, RunnerOptions};
use crate::loader::{load_tokenizer, ModelConfig, ModelFiles, WeightStore};
use crate::pack::gguf::resolve_model_or_gguf;
use crate::model::LinearSpec;
use crate::quant::checkpoint::{fnv1a_bytes, Checkpoint};
use crate::quant::transform::TransformContext;
use crate::error::{fail, ErrorKind, ResultExt};
use anyhow::{anyhow, ensure, Context, Result};
use candle_core::DType;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A float model to quantize.
pub struct SourceModel {
    pub files: ModelFiles,
    pub config: ModelConfig,
    pub store: WeightStore,
}

impl SourceModel {
    /// Resolve a folder or hub id and open it; an already quantized model is an error
    /// ([`ErrorKind::InvalidModel`]).
    pub fn open(model: &str, revision: Option<&str>) -> crate::Result<Self> {
        let files = resolve_model_or_gguf(model, revision)?;
        let config = ModelConfig::from_file(&files.config)?;
        if config
            .raw
            .get("quantization_config")
            .is_some_and(|q| !q.is_null())
        {
            fail!(
                InvalidModel,
                "`{model}` is already quantized; quantize a float model"
            );
        }
        let store = WeightStore::open(&files.weights)?;
        Ok(Self {
            files,
            config,
            store,
        })
    }
}

/// How a run reports and recovers, none of which changes its result.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Progress bars and the per-linear log on stderr.
    pub progress: bool,
    /// Folder for per-block checkpoints of a calibrated run (default: `.NAME.checkpoint` next to the output); a
    /// checkpoint made by the same model and recipe is resumed.
    pub checkpoint: Option<PathBuf>,
    /// Discard an existing checkpoint instead of resuming it.
    pub fresh: bool,
    /// Run even when the memory estimate exceeds the memory available.
    pub force: bool,
}

/// A quantized model, ready for a packer.
pub struct QuantizeOutput {
    /// The config after the transforms (what the packed model's `config.json` holds).
    pub config: ModelConfig,
    /// The weights after the transforms (the packer copies the unquantized tensors).
    pub store: WeightStore,
    pub layers: Vec<(LinearSpec, LayerCodes)>,
    /// Per-column losses to save, by module name (GPTQ's own, or BAQ's measurement).
    pub column_losses: Vec<(String, Vec<f64>)>,
    /// One line per linear (calibrated runs).
    pub log: Vec<LayerLog>,
    pub seconds: f64,
    /// Seconds inside the rounding (the rest is forward passes and Hessians).
    pub solve_seconds: f64,
    /// First block computed by this process (> 0 when resumed from a checkpoint).
    pub resumed_at: usize,
    /// The calibration set, described, when one was used.
    pub calibration: Option<String>,
    /// Where BAQ's pass-1 measurement came from.
    pub pass1: Option<String>,
}

/// The checkpoint folder next to an output folder: `.NAME.checkpoint`.
pub fn checkpoint_dir(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    output.with_file_name(format!(".{name}.checkpoint"))
}

/// Run `recipe` on `source`. The data-driven stages read `calibration` when given (token
/// segments the caller made), otherwise segments sampled as `recipe.calibration` says.
///
/// Errors: [`ErrorKind::InvalidOption`] for a recipe out of range or a run that does not
/// fit in memory, [`ErrorKind::InvalidInput`] for calibration text or a measurement file
/// that cannot be used, [`ErrorKind::InvalidModel`] for a model whose tensors do not
/// load.
pub fn quantize(
    source: &SourceModel,
    recipe: &Recipe,
    calibration: Option<&CalibrationSet>,
    options: &RunOptions,
) -> crate::Result<QuantizeOutput> {
    Ok(run(source, recipe, calibration, options)?)
}

fn run(
    source: &SourceModel,
    recipe: &Recipe,
    calibration: Option<&CalibrationSet>,
    options: &RunOptions,
) -> Result<QuantizeOutput> {
    recipe.validate()?;
    let start = Instant::now();
    // --fresh before any stage: a transform that trains keeps its state in the same folder
    if let (Some(dir), true) = (&options.checkpoint, options.fresh) {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing the checkpoint {}", dir.display()))?;
        }
    }
    let (mut config, mut store) = (source.config.clone(), source.store.clone());
    let ctx = TransformContext {
        files: Some(&source.files),
        text: recipe
            .calibration
            .text
            .clone()
            .map_or(CalibrationSource::Default, CalibrationSource::File),
        progress: options.progress,
        checkpoint: options.checkpoint.clone(),
    };
    for spec in &recipe.transforms {
        let t = spec.build();
        let out = t
            .apply(&config, &store, &ctx)
            .with_context(|| format!("transform `{}`", t.name()))?;
        (config, store) = (out.config, out.store);
        if options.progress {
            eprintln!("transform    {}", store.rewrites()[0]);
        }
    }
    let allocation: Box<dyn Allocation> = match &recipe.allocation {
        AllocationSpec::Uniform {
            grid: GridSpec::Ggml { ty },
        } => Box::new(GgmlAllocation {
            ty: *ty,
            shape: MixShape::of(&config),
        }),
        AllocationSpec::Uniform {
            grid: grid @ GridSpec::Power { .. },
        } => Box::new(PowerAllocation {
            grid: grid.power()?,
        }),
        AllocationSpec::Uniform { grid } => Box::new(UniformAllocation {
            grid: grid.uniform()?,
        }),
        AllocationSpec::BaqGgml(b) => Box::new(GgmlTypeAllocation {
            bits: b.bits,
            types: b.types.clone(),
            store: store.clone(),
        }),
        AllocationSpec::Baq(b) => Box::new(BaqAllocation {
            budget: b.budget(),
            model_wide: b.scope == BaqScope::Model,
            sym: b.sym,
            range: b.range,
            codebook: b.codebook,
        }),
    };
    let rounding: Box<dyn LayerRounding> = match recipe.rounding {
        RoundingSpec::Rtn => Box::new(RtnRounding),
        RoundingSpec::Gptq(spec) => Box::new(GptqRounding { spec }),
        RoundingSpec::FlexRound(spec) => {
            let init: Box<dyn LayerRounding> = match spec.init {
                FlexInit::Rtn => Box::new(RtnRounding),
                FlexInit::Gptq => Box::new(GptqRounding { spec: spec.gptq }),
            };
            match spec.reconstruct {
                Reconstruct::Layer => Box::new(LayerwiseFlexRound {
                    init,
                    options: spec,
                }),
                // the block trainer runs the start's rounding itself (below)
                Reconstruct::Block => init,
            }
        }
    };
    let runner = RunnerOptions {
        true_sequential: recipe.calibration.true_sequential,
    };
    let calib = if recipe.needs_calibration() {
        let c = match calibration {
            Some(c) => c.clone(),
            None => sample_calibration(source, &config, recipe)?,
        };
        let (mut need, estimate) = memory_estimate(&config, &c, runner.true_sequential);
        if options.progress {
            eprintln!("calibration  {}", c.description);
            eprintln!("memory       {estimate}");
        }
        if let RoundingSpec::FlexRound(f) = recipe.rounding {
            if f.reconstruct == Reconstruct::Block {
                let (extra, line) = flexround_memory(&config, &c, f.batch, f.bf16_streams);
                need += extra;
                if options.progress {
                    eprintln!("             {line}");
                }
            }
        }
        // before any heavy work: a run that cannot fit is killed by the kernel hours in
        check_memory(need, available_memory(), options.force).kind(ErrorKind::InvalidOption)?;
        Some(c)
    } else {
        None
    };

    // the measurement an allocation plans from (BAQ's pass 1)
    let mut pass1 = None;
    let measurement: Option<Measurement> = match allocation.measure_at() {
        None => None,
        Some(bits) => {
            let reuse = match &recipe.allocation {
                AllocationSpec::Baq(b) => b.measurement.as_deref(),
                AllocationSpec::BaqGgml(b) => b.measurement.as_deref(),
                AllocationSpec::Uniform { .. } => None,
            };
            Some(match reuse {
                Some(path) => {
                    let m = load_measurement(path, &config).kind(ErrorKind::InvalidInput)?;
                    pass1 = Some(format!("reused from {}", path.display()));
                    m
                }
                None => {
                    let calib = calib
                        .as_ref()
                        .ok_or_else(|| anyhow!("the measurement needs calibration data"))?;
                    pass1 = Some(format!("GPTQ w{bits} per-channel"));
                    if options.progress {
                        eprintln!("pass 1       GPTQ w{bits} per-channel, measuring column losses");
                    }
                    measure(&config, &store, calib, bits, runner, options.progress)?
                }
            })
        }
    };
    if options.progress {
        if let AllocationSpec::BaqGgml(b) = &recipe.allocation {
            eprintln!(
                "pass 2       BAQ: {} bits per weight over the model, GGML types {:?}",
                b.bits,
                b.types.iter().map(|t| t.name()).collect::<Vec<_>>()
            );
        }
        if let AllocationSpec::Baq(b) = &recipe.allocation {
            eprintln!(
                "pass 2       BAQ: {} bits average per {}, widths {:?}",
                b.bits,
                match b.scope {
                    BaqScope::Model => "model",
                    BaqScope::Layer => "layer",
                },
                b.allowed_bits
            );
        }
    }
    let linears = target_linears(&config, recipe.lm_head);
    let planning = Instant::now();
    let plans = allocation.plan(&linears, measurement.as_ref())?;
    if options.progress && measurement.is_some() {
        eprintln!(
            "allocation   {} in {:.1} s",
            allocation.name(),
            planning.elapsed().as_secs_f64()
        );
    }
    let planned = PlannedRounding {
        name: recipe.method_name(),
        rounding: rounding.as_ref(),
        plans,
    };

    let mut out = QuantizeOutput {
        config: config.clone(),
        store: store.clone(),
        layers: vec![],
        column_losses: vec![],
        log: vec![],
        seconds: 0.0,
        solve_seconds: 0.0,
        resumed_at: 0,
        calibration: calib.as_ref().map(|c| c.description.clone()),
        pass1,
    };
    if recipe.needs_calibration() && !matches!(recipe.rounding, RoundingSpec::Rtn) {
        let calib = calib
            .as_ref()
            .ok_or_else(|| anyhow!("{} needs calibration data", rounding.name()))?;
        // the grid the checkpoint restores uniform layers on
        let grid = match &recipe.allocation {
            // codebook and GGML layers restore with their own table or type; this grid
            // goes unused
            AllocationSpec::Uniform {
                grid: GridSpec::Power { .. } | GridSpec::Ggml { .. },
            }
            | AllocationSpec::BaqGgml(_) => UniformGrid::new(8, GroupSize::PerChannel, true)?,
            AllocationSpec::Uniform { grid } => grid.uniform()?,
            AllocationSpec::Baq(b) => UniformGrid::new(
                allocation.measure_at().unwrap_or(8),
                GroupSize::PerChannel,
                b.sym,
            )?,
        };
        let checkpoint = options
            .checkpoint
            .as_ref()
            .map(|dir| Checkpoint::new(dir.clone(), checkpoint_key(&source.files, calib, recipe)));
        let q = match recipe.rounding {
            RoundingSpec::FlexRound(spec) if spec.reconstruct == Reconstruct::Block => {
                quantize_by_blocks(
                    &config,
                    &store,
                    calib,
                    &BlockwiseOptions {
                        method: &FlexRoundBlocks { spec },
                        init: &planned,
                        runner,
                        grid,
                        progress: options.progress,
                        checkpoint,
                        stream_dtype: if spec.bf16_streams {
                            DType::BF16
                        } else {
                            DType::F32
                        },
                    },
                )?
            }
            _ => quantize_model_calibrated(
                &config,
                &store,
                calib,
                &planned,
                &CalibratedOptions {
                    runner,
                    grid,
                    progress: options.progress,
                    checkpoint,
                },
            )?,
        };
        if matches!(recipe.allocation, AllocationSpec::Uniform { .. }) {
            out.column_losses = q
                .layers
                .iter()
                .filter_map(|(s, r)| r.column_loss.clone().map(|l| (s.name.clone(), l)))
                .collect();
        }
        out.layers = q.layers.into_iter().map(|(s, r)| (s, r.codes)).collect();
        (out.log, out.solve_seconds, out.resumed_at) = (q.log, q.solve_seconds, q.resumed_at);
    } else {
        let q = quantize_model_codes(
            &config,
            &store,
            &planned,
            &QuantizeOptions {
                include_lm_head: recipe.lm_head,
                progress: options.progress,
            },
        )?;
        out.layers = q;
    }
    if let Some(m) = measurement {
        let mut losses: Vec<(String, Vec<f64>)> = m.into_iter().collect();
        losses.sort_by(|x, y| x.0.cmp(&y.0));
        out.column_losses = losses;
    }
    out.seconds = start.elapsed().as_secs_f64();
    Ok(out)
}

fn sample_calibration(
    source: &SourceModel,
    config: &ModelConfig,
    recipe: &Recipe,
) -> Result<CalibrationSet> {
    let c = &recipe.calibration;
    let tokenizer = load_tokenizer(&source.files)?;
    let text = c
        .text
        .clone()
        .map_or(CalibrationSource::Default, CalibrationSource::File);
    let seqlen = c.seqlen.min(config.max_position_embeddings);
    sample_segments(&tokenizer, &text, c.nsamples, seqlen, c.seed)
}

/// Everything that determines the result; a checkpoint is reused only on an exact match.
fn checkpoint_key(files: &ModelFiles, calib: &CalibrationSet, recipe: &Recipe) -> Value {
    let weight_stamp: Vec<Value> = files
        .weights
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok();
            json!({"file": p.display().to_string(), "bytes": m.as_ref().map(|m| m.len()),
                   "modified": m.and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs())})
        })
        .collect();
    json!({
        "bitsmith_version": env!("CARGO_PKG_VERSION"), "model": files.source, "revision": files.revision,
        "weights": weight_stamp, "calibration": calib.description, "segments_fnv": fnv1a(&calib.segments),
        "recipe": recipe,
    })
}

/// FNV-1a over the calibration token ids (little-endian), identifying the exact segments.
fn fnv1a(segments: &[Vec<u32>]) -> String {
    let bytes: Vec<u8> = segments
        .iter()
        .flatten()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    fnv1a_bytes(&bytes)
}

/// Pass-1 column losses saved by an earlier run (a folder holding
/// `column_losses.safetensors`, or the file), checked against this model's linears.
fn load_measurement(path: &Path, config: &ModelConfig) -> Result<Measurement> {
    let m = read_measurement(path)
        .with_context(|| format!("reading the measurement {}", path.display()))?;
    for s in target_linears(config, false) {
        let l = m.get(&s.name).ok_or_else(|| {
            anyhow!(
                "measurement {} has no losses for `{}` (made for another model?)",
                path.display(),
                s.name
            )
        })?;
        ensure!(
            l.len() == s.in_features,
            "measurement {}: `{}` has {} column losses, the model has {} columns",
            path.display(),
            s.name,
            l.len(),
            s.in_features
        );
    }
    Ok(m)
}
