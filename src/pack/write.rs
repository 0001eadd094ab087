//! What `bitsmith quantize` does, as one library call: quantize a source model with a
//! recipe and write the result where the recipe's grid belongs (a packed folder in the
//! GPTQ, mixed or codebook layout, or a GGUF file for GGML block grids), with the same
//! guarantees as the CLI: the output is reserved (and locked) before any work, written
//! under a temporary name and moved into place only when whole, and a calibrated run
//! checkpoints per block so that the same call resumes it.

use super::compat::online_op_warning;
use super::gguf::{export_gguf_solved, vocab_metadata, GgufExportOptions};
use super::lock::OutputLock;
use super::{
    codes_refs, column_losses_beside, quantization_config, write_column_losses,
    write_column_losses_file, write_quantized_model, OutputFolder, ZeroConvention,
};
use crate::error::{fail, ErrorKind, ResultExt};
use crate::quant::grid::{GgmlType, GgufFileType};
use crate::quant::recipe::{AllocationSpec, RoundingSpec};
use crate::quant::run::checkpoint_dir;
use crate::quant::transform::ostquant::STATE_FILE;
use crate::quant::{quantize, GridSpec, LayerCodes, QuantizeOutput, Recipe, RunOptions};
use crate::quant::SourceModel;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How [`quantize_to`] runs and writes.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Progress on stderr, checkpoint folder (default: `.NAME.checkpoint` next to the
    /// output), fresh start, memory check override.
    pub run: RunOptions,
    /// Replace an existing output.
    pub overwrite: bool,
    /// How the GPTQ layout stores zero points (`gptq` v1 or `gptq_v2`).
    pub zeros: ZeroConvention,
    /// Largest safetensors shard of a packed folder.
    pub max_shard_bytes: u64,
    /// GGUF outputs: the embedding's type, llama.cpp's pre-tokenizer name, no vocabulary.
    pub gguf_embedding: Option<GgmlType>,
    pub gguf_tokenizer_pre: Option<String>,
    pub gguf_no_vocab: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            run: RunOptions::default(),
            overwrite: false,
            zeros: ZeroConvention::V1,
            max_shard_bytes: 4 << 30,
            gguf_embedding: None,
            gguf_tokenizer_pre: None,
            gguf_no_vocab: false,
        }
    }
}

/// What [`quantize_to`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The packed folder or the GGUF file.
    pub path: PathBuf,
    /// Its size on disk.
    pub bytes: u64,
    /// The recipe's preset name (`rtn`, `gptq`, `baq`, …).
    pub method: &'static str,
    pub layers: usize,
    /// Seconds of quantization (transforms, calibration, rounding).
    pub seconds: f64,
    /// Stored bits per quantized weight (codes, scales, zeros, indices or blocks).
    pub bits_per_weight: f64,
    /// Mean code width per weight of a BAQ allocation (the rest is scales, zeros and the
    /// permutation).
    pub code_bits: Option<f64>,
    /// GGUF outputs: the linears' type or mix, how many linears of each type, and the
    /// tensors written in another type than asked (with why).
    pub gguf: Option<GgufWritten>,
    /// What a user of the output should know (an online op only bitsmith runs).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct GgufWritten {
    pub linear_type: String,
    pub types: Vec<(String, usize)>,
    pub fallbacks: Vec<String>,
    /// BAQ over types: the pass-1 column losses, saved beside the file for `--measurement`.
    pub measurement: Option<PathBuf>,
}

/// Quantize `source` with `recipe` and write it to `output`: a GGUF file when the recipe's
/// grid is a GGML block type (or a BAQ budget over them), a packed folder otherwise.
///
/// Errors: those of [`quantize`], and [`ErrorKind::Output`] when `output` exists (without
/// `overwrite`), another run holds it, or it cannot be written.
pub fn quantize_to(
    output: &Path,
    source: &SourceModel,
    recipe: &Recipe,
    options: &WriteOptions,
) -> crate::Result<Written> {
    Ok(run(output, source, recipe, options)?)
}

fn run(
    output: &Path,
    source: &SourceModel,
    recipe: &Recipe,
    options: &WriteOptions,
) -> Result<Written> {
    recipe.validate()?;
    let _lock = OutputLock::acquire(output).kind(ErrorKind::Output)?;
    let gguf_type = match recipe.allocation {
        AllocationSpec::Uniform {
            grid: GridSpec::Ggml { ty },
        } => Some(ty),
        _ => None,
    };
    let gguf = gguf_type.is_some() || matches!(recipe.allocation, AllocationSpec::BaqGgml(_));
    if let Some(t) = gguf_type.filter(|t| t.needs_calibration()) {
        if matches!(recipe.rounding, RoundingSpec::Rtn) {
            fail!(
                InvalidOption,
                "{t} needs calibration data, as llama-quantize needs an importance matrix for \
                 it: use GPTQ rounding (--method gptq)"
            );
        }
    }
    if !gguf && (options.gguf_tokenizer_pre.is_some() || options.gguf_no_vocab) {
        fail!(
            InvalidOption,
            "a pre-tokenizer name and no-vocabulary are options of GGUF outputs (a GGML grid)"
        );
    }
    // reserved before the work: a long run must not find its output taken at the end
    let folder = if gguf {
        if output.exists() && !options.overwrite {
            fail!(
                Output,
                "output `{}` already exists; pass --overwrite to replace it",
                output.display()
            );
        }
        // a tokenizer the file cannot hold is an error now, not after the solve
        vocab_metadata(
            &source.files,
            &source.config,
            &gguf_options(options, gguf_type),
        )
        .kind(ErrorKind::InvalidModel)?;
        None
    } else {
        Some(OutputFolder::create(output, options.overwrite).kind(ErrorKind::Output)?)
    };
    let checkpoint = options
        .run
        .checkpoint
        .clone()
        .unwrap_or_else(|| checkpoint_dir(output));
    let run_options = RunOptions {
        checkpoint: Some(checkpoint.clone()),
        ..options.run.clone()
    };
    let q = quantize(source, recipe, None, &run_options).map_err(|e| {
        let e = anyhow::Error::from(e);
        // a failure after some blocks (disk full, …) keeps them; say so unless the error is
        // about the checkpoint itself
        if checkpoint.is_dir() && !format!("{e:#}").contains("checkpoint") {
            e.context(format!(
                "the checkpoint {} is kept: the same command resumes from its last block",
                checkpoint.display()
            ))
        } else {
            e
        }
    })?;
    let written = match folder {
        None => write_gguf(output, gguf_type, source, recipe, &q, options)?,
        Some(folder) => write_folder(folder, source, recipe, &q, options, &checkpoint)?,
    };
    if checkpoint.exists() {
        std::fs::remove_dir_all(&checkpoint).ok();
    }
    Ok(written)
}

/// `bitsmith.json`: what made the model (version, recipe, source, transforms, the
/// calibration and per-linear losses of calibrated runs).
fn provenance(source: &SourceModel, recipe: &Recipe, q: &QuantizeOutput) -> Value {
    let mut provenance = json!({
        "bitsmith_version": env!("CARGO_PKG_VERSION"),
        "method": recipe.method_name(),
        "recipe": recipe,
        "source": {"model": source.files.source, "revision": source.files.revision},
        "transforms": q.store.rewrites(),
        "quantized_modules": q.layers.iter().map(|(s, _)| s.name.clone()).collect::<Vec<_>>(),
        "quantize_seconds": q.seconds,
    });
    if let Some(c) = &q.calibration {
        provenance["calibration"] = json!(c);
        provenance["solve_seconds"] = json!(q.solve_seconds);
        provenance["resumed_at_block"] = json!(q.resumed_at);
        provenance["layer_loss"] = json!(q
            .log
            .iter()
            .map(|l| json!({"name": l.name, "loss": l.loss, "seconds": l.seconds}))
            .collect::<Vec<_>>());
    }
    if let Some(p) = &q.pass1 {
        provenance["pass1"] = json!(p);
    }
    provenance
}

fn write_folder(
    out: OutputFolder,
    source: &SourceModel,
    recipe: &Recipe,
    q: &QuantizeOutput,
    options: &WriteOptions,
    checkpoint: &Path,
) -> Result<Written> {
    let refs = codes_refs(&q.layers)?;
    let report = write_quantized_model(
        &out,
        &source.files,
        &q.config,
        &q.store,
        &refs,
        options.zeros,
        &quantization_config(recipe, options.zeros)?,
        provenance(source, recipe, q),
        options.max_shard_bytes,
    )?;
    if !q.column_losses.is_empty() {
        write_column_losses(&out, &q.column_losses)?;
    }
    // OSTQuant's trained transforms go with the model: `--ost-transforms` reuses them
    let trained = checkpoint.join(STATE_FILE);
    if trained.exists() {
        let keep = out.path().join(STATE_FILE);
        std::fs::copy(&trained, &keep)
            .with_context(|| format!("copying {} to {}", trained.display(), keep.display()))
            .kind(ErrorKind::Output)?;
    }
    let path = out.commit().kind(ErrorKind::Output)?;
    Ok(Written {
        path,
        bytes: report.total_bytes,
        method: recipe.method_name(),
        layers: q.layers.len(),
        seconds: q.seconds,
        bits_per_weight: report.bits_per_weight(),
        code_bits: matches!(recipe.allocation, AllocationSpec::Baq(_)).then(|| code_bits(q)),
        gguf: None,
        warnings: online_op_warning(&q.config).into_iter().collect(),
    })
}

/// The realized fractional rate of a BAQ allocation: code bits alone, per weight.
fn code_bits(q: &QuantizeOutput) -> f64 {
    let (code_bits, weights) = q.layers.iter().fold((0u64, 0u64), |(c, w), (s, codes)| {
        let widths = match codes {
            LayerCodes::Mixed(q) => q.widths.iter().map(|&b| b as u64).sum::<u64>(),
            LayerCodes::MixedCodebook(q) => q.widths.iter().map(|&b| b as u64).sum::<u64>(),
            LayerCodes::Uniform(q) => q.grid.bits as u64 * s.in_features as u64,
            LayerCodes::Codebook(q) => q.bits as u64 * s.in_features as u64,
            LayerCodes::Ggml(q) => q.ty.code_bits() as u64 * s.in_features as u64,
        };
        (
            c + widths * s.out_features as u64,
            w + (s.out_features * s.in_features) as u64,
        )
    });
    code_bits as f64 / weights.max(1) as f64
}

fn gguf_options(options: &WriteOptions, ty: Option<GgufFileType>) -> GgufExportOptions {
    GgufExportOptions {
        ty,
        embedding_ty: options.gguf_embedding,
        tokenizer_pre: options.gguf_tokenizer_pre.clone(),
        no_vocab: options.gguf_no_vocab,
        overwrite: options.overwrite,
        reference_weights: None,
    }
}

/// The solved linears' blocks, the rest of the model and the tokenizer as one llama.cpp
/// file.
fn write_gguf(
    output: &Path,
    ty: Option<GgufFileType>,
    source: &SourceModel,
    recipe: &Recipe,
    q: &QuantizeOutput,
    options: &WriteOptions,
) -> Result<Written> {
    let solved = q
        .layers
        .iter()
        .map(|(s, c)| match c {
            LayerCodes::Ggml(g) => Ok((s.name.clone(), g.clone())),
            _ => bail!("`{}` was not solved on a GGML type", s.name),
        })
        .collect::<Result<HashMap<_, _>>>()?;
    // a budget over types: the file's type is the one holding the most weights
    let mut per_type: BTreeMap<&str, (GgmlType, u64, usize)> = BTreeMap::new();
    for g in solved.values() {
        let e = per_type.entry(g.ty.name()).or_insert((g.ty, 0, 0));
        e.1 += (g.out_features * g.in_features) as u64;
        e.2 += 1;
    }
    let ty = match ty {
        Some(t) => t,
        None => GgufFileType::Pure(
            per_type
                .values()
                .max_by_key(|(_, w, _)| *w)
                .map(|(t, _, _)| *t)
                .ok_or_else(|| anyhow!("no linear was solved"))?,
        ),
    };
    let r = export_gguf_solved(
        &source.files,
        &q.config,
        &q.store,
        &solved,
        output,
        &gguf_options(options, Some(ty)),
    )?;
    // BAQ's pass 1 (measured or reused), kept for the next budget's `--measurement`; after
    // the file, so a failed export leaves neither
    let baq = matches!(recipe.allocation, AllocationSpec::BaqGgml(_));
    let measurement = if !baq || q.column_losses.is_empty() {
        // (a GPTQ run's own column losses, on its final grid, are no BAQ measurement)
        None
    } else {
        let path = column_losses_beside(&r.path);
        write_column_losses_file(&path, &q.column_losses).with_context(|| {
            format!(
                "{} is written, but its pass-1 measurement could not be saved beside it",
                r.path.display()
            )
        })?;
        Some(path)
    };
    let (weights, bytes) = solved.values().fold((0u64, 0u64), |(w, b), g| {
        (
            w + (g.out_features * g.in_features) as u64,
            b + g.data.len() as u64,
        )
    });
    Ok(Written {
        path: r.path,
        bytes: r.bytes,
        method: recipe.method_name(),
        layers: q.layers.len(),
        seconds: q.seconds,
        bits_per_weight: (bytes * 8) as f64 / weights.max(1) as f64,
        code_bits: None,
        gguf: Some(GgufWritten {
            linear_type: r.linear_type,
            types: per_type
                .iter()
                .map(|(name, (_, _, n))| (name.to_string(), *n))
                .collect(),
            fallbacks: r.fallbacks,
            measurement,
        }),
        warnings: online_op_warning(&q.config).into_iter().collect(),
    })
}
