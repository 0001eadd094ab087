use super::human_bytes;
use crate::calibration::checkpoint::Checkpoint;
use crate::calibration::CalibrationSet;
use crate::calibration::{sample_segments, CalibrationSource, RunnerOptions};
use crate::loader::{load_tokenizer, resolve_model, ModelConfig, ModelFiles, WeightStore};
use crate::model::{block_linears, LinearSpec};
use crate::pack::{
    read_column_losses, write_column_losses, write_quantized_model, CodesRef, GptqConfig,
    OutputFolder, ZeroConvention, MIXED_METHOD,
};
use crate::quant::baq::layer::{BudgetKind, LayerBudget};
use crate::quant::baq::model_wide::{allocate_model, LayerColumns};
use crate::quant::baq::quantizer::{measure, measurement_bits, Allocation, Baq};
use crate::quant::calibrated::memory_estimate;
use crate::quant::{
    quantize_model, quantize_model_calibrated, CalibratedOptions, Gptq, GptqOptions, GroupSize,
    LayerCodes, LayerQuantizer, QuantizeOptions, Rtn, UniformGrid,
};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(
    long_about = "Quantize every linear layer inside the decoder blocks (embeddings and lm_head \
stay in their original precision unless --lm-head) and write OUT: a folder with GPTQ-layout packed \
weights (qweight/qzeros/scales/g_idx), config.json with quantization_config, and the tokenizer. \
OUT is written to a hidden temporary folder and renamed only when complete.\n\n\
Methods: rtn (round to nearest, no data), gptq (Hessian-based error feedback) and baq (GPTQ with \
a bit width per input column allocated from a first GPTQ pass's losses; written in bitsmith's \
mixed-width layout). gptq and baq need calibration text: the embedded WikiText-2 validation split \
by default, or --calib FILE. A gptq run checkpoints \
after every block next to OUT; running the same command again resumes from the last finished block."
)]
pub struct Args {
    /// Model folder or Hugging Face repo id.
    pub model: String,
    /// Output folder.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Hub revision (branch, tag or commit) when MODEL is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Quantization method: rtn, gptq or baq.
    #[arg(long, default_value = "rtn")]
    pub method: String,
    /// Bits per weight: 2, 3, 4 or 8 for rtn/gptq; for baq the average stored bits per
    /// weight (codes, scales, zeros, permutation), fractional allowed (e.g. 2.5), met in
    /// every layer to within one column's codes (see --code-bits).
    #[arg(long, default_value_t = 4.0)]
    pub bits: f64,
    /// Input columns per scale/zero group; -1 for one group per output channel. A width
    /// that is not a multiple gets a smaller last group. Default 128 (rtn, gptq). baq:
    /// groups of this many equal-width columns inside each width run; default -1, one range
    /// per output row and width (the paper).
    #[arg(long, allow_hyphen_values = true)]
    pub group_size: Option<i64>,
    /// BAQ: allowed per-column widths (0 allows pruning a column).
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,5,6,7,8")]
    pub allowed_bits: Vec<u8>,
    /// BAQ: make --bits count code bits only (the paper's R̄) instead of everything stored.
    #[arg(long)]
    pub code_bits: bool,
    /// BAQ: reuse the pass-1 column losses saved by an earlier run (its output folder or
    /// its `column_losses.safetensors`) instead of measuring again.
    #[arg(long)]
    pub measurement: Option<PathBuf>,
    /// BAQ: `layer` gives every layer the budget on its own (the paper); `model` spends one
    /// budget over all layers where the loss model says bits help most.
    #[arg(long, default_value = "layer", value_parser = ["layer", "model"])]
    pub allocate: String,
    /// BAQ: exponent θ of the loss model ℓ(R) = c·2^(−θR).
    #[arg(long, default_value_t = 1.95)]
    pub theta: f64,
    /// Symmetric grid (zero point fixed at 2^(bits-1)); default asymmetric min-max.
    #[arg(long)]
    pub sym: bool,
    /// Quantize lm_head too (rtn only).
    #[arg(long)]
    pub lm_head: bool,
    /// Zero-point convention: gptq (v1, most compatible) or gptq_v2.
    #[arg(long, default_value = "gptq")]
    pub checkpoint_format: String,
    /// Calibration text (plain text, or JSONL with a `text` field); default: the embedded
    /// WikiText-2 validation split.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration segments.
    #[arg(long, default_value_t = 128)]
    pub nsamples: usize,
    /// Tokens per calibration segment (capped at the model's context).
    #[arg(long, default_value_t = 2048)]
    pub seqlen: usize,
    /// Seed of the calibration window sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GPTQ dampening, as a fraction of the mean Hessian diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// GPTQ: visit columns by descending Hessian diagonal (writes a non-trivial g_idx).
    #[arg(long)]
    pub act_order: bool,
    /// GPTQ with --act-order: fix the group ranges up front so groups stay contiguous.
    #[arg(long)]
    pub static_groups: bool,
    /// GPTQ lazy-update block size.
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// Compute every group's Hessian from the float block instead of quantizing
    /// [q,k,v] → [o] → [gate,up] → [down] in sequence.
    #[arg(long)]
    pub no_true_sequential: bool,
    /// Largest safetensors shard in MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_shard_mib: u64,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bar or per-layer log.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    // validate everything cheap before any heavy work or any file is created
    let zeros = ZeroConvention::parse(&a.checkpoint_format)?;
    let method = a.method.as_str();
    match method {
        "rtn" | "gptq" | "baq" => {}
        m @ ("flexround" | "nupes" | "ostquant") => {
            bail!("method `{m}` is not built yet (available: rtn, gptq, baq)")
        }
        m => bail!("unknown method `{m}` (available: rtn, gptq, baq)"),
    }
    if method != "rtn" && a.lm_head {
        bail!("--lm-head is only supported with --method rtn");
    }
    let grid = if method == "baq" {
        if !(a.bits > 0.0 && a.bits <= 8.0) {
            bail!("--bits {} is outside 0..=8", a.bits);
        }
        UniformGrid::new(measurement_bits(a.bits), GroupSize::PerChannel, a.sym)?
    } else {
        if a.bits.fract() != 0.0 || !(0.0..=255.0).contains(&a.bits) {
            bail!("--bits {} must be a whole number for --method {method} (fractional budgets need --method baq)", a.bits);
        }
        UniformGrid::new(
            a.bits as u8,
            GroupSize::from_i64(a.group_size.unwrap_or(128))?,
            a.sym,
        )?
    };
    let files = resolve_model(&a.model, a.revision.as_deref())?;
    let config = ModelConfig::from_file(&files.config)?;
    if config
        .raw
        .get("quantization_config")
        .is_some_and(|q| !q.is_null())
    {
        bail!("`{}` is already quantized; quantize a float model", a.model);
    }
    let store = WeightStore::open(&files.weights)?;
    let out = OutputFolder::create(&a.output, a.overwrite)?;
    let bitsmith = format!("bitsmith:{}", env!("CARGO_PKG_VERSION"));
    let mut provenance = json!({
        "bitsmith_version": env!("CARGO_PKG_VERSION"),
        "method": method,
        "bits": a.bits,
        "group_size": grid.group_size.as_i64(),
        "sym": a.sym,
        "lm_head": a.lm_head,
        "source": {"model": files.source, "revision": files.revision},
    });

    let run = match method {
        "rtn" => {
            let q = quantize_model(
                &config,
                &store,
                &Rtn { grid },
                &QuantizeOptions {
                    include_lm_head: a.lm_head,
                    progress: !a.quiet,
                },
            )?;
            Run {
                layers: q
                    .layers
                    .into_iter()
                    .map(|(s, q)| (s, LayerCodes::Uniform(q)))
                    .collect(),
                losses: vec![],
                seconds: q.seconds,
                checkpoint: None,
            }
        }
        _ => run_calibrated(&a, &files, &config, &store, grid, &mut provenance)?,
    };
    provenance["quantized_modules"] = json!(run
        .layers
        .iter()
        .map(|(s, _)| s.name.clone())
        .collect::<Vec<_>>());
    provenance["quantize_seconds"] = json!(run.seconds);
    let grouped = !matches!(grid.group_size, GroupSize::PerChannel);
    let quant_config = if method == "baq" {
        json!({
            "quant_method": MIXED_METHOD, "bits": a.bits, "sym": a.sym, "allowed_bits": a.allowed_bits,
            "theta": a.theta, "allocate": a.allocate, "group_size": a.group_size.unwrap_or(-1), "layout": "column-runs-v1", "meta": {"quantizer": [bitsmith], "method": method},
        })
    } else {
        GptqConfig {
            bits: grid.bits,
            group_size: grid.group_size,
            sym: a.sym,
            desc_act: a.act_order && !a.static_groups && grouped,
            lm_head: a.lm_head,
            zeros,
            meta: json!({"quantizer": [bitsmith], "method": method}),
        }
        .to_json()
    };
    let refs: Vec<(&LinearSpec, CodesRef)> =
        run.layers.iter().map(|(s, c)| (s, c.into())).collect();
    let report = write_quantized_model(
        &out,
        &files,
        &config,
        &store,
        &refs,
        zeros,
        &quant_config,
        provenance,
        a.max_shard_mib << 20,
    )?;
    if !run.losses.is_empty() {
        write_column_losses(&out, &run.losses)?;
    }
    let path = out.commit()?;
    if let Some(dir) = run.checkpoint {
        std::fs::remove_dir_all(dir).ok();
    }
    let shape = match (method, grid.group_size) {
        ("baq", _) => format!("{} bits average, widths {:?}", a.bits, a.allowed_bits),
        (_, GroupSize::PerChannel) => format!("w{} per-channel", grid.bits),
        (_, GroupSize::Columns(g)) => format!("w{}g{g}", grid.bits),
    };
    println!("wrote        {}", path.display());
    println!(
        "method       {method} {shape} {}",
        if a.sym { "sym" } else { "asym" }
    );
    println!(
        "layers       {} quantized ({:.1} s)",
        run.layers.len(),
        run.seconds
    );
    println!(
        "weights      {:.3} bits per quantized weight (codes, scales, zeros, indices)",
        report.bits_per_weight()
    );
    if method == "baq" {
        // the realized fractional rate (code bits alone), next to the stored figure above
        let (code_bits, weights) = run.layers.iter().fold((0u64, 0u64), |(c, w), (s, codes)| {
            let widths = match codes {
                LayerCodes::Mixed(q) => q.widths.iter().map(|&b| b as u64).sum::<u64>(),
                LayerCodes::Uniform(q) => q.grid.bits as u64 * s.in_features as u64,
            };
            (
                c + widths * s.out_features as u64,
                w + (s.out_features * s.in_features) as u64,
            )
        });
        println!(
            "code bits    {:.3} per weight (mean column width; the rest is scales, zeros, permutation)",
            code_bits as f64 / weights.max(1) as f64
        );
    }
    println!("size         {} on disk", human_bytes(report.total_bytes));
    Ok(())
}

/// What a method produced, before writing.
struct Run {
    layers: Vec<(LinearSpec, LayerCodes)>,
    /// Per-column losses to save (GPTQ's own, or BAQ's pass-1 measurement).
    losses: Vec<(String, Vec<f64>)>,
    seconds: f64,
    /// Checkpoint folder to delete once the output is in place.
    checkpoint: Option<PathBuf>,
}

fn run_calibrated(
    a: &Args,
    files: &ModelFiles,
    config: &ModelConfig,
    store: &WeightStore,
    grid: UniformGrid,
    provenance: &mut Value,
) -> Result<Run> {
    let start = std::time::Instant::now();
    let tokenizer = load_tokenizer(files)?;
    let source = a
        .calib
        .clone()
        .map_or(CalibrationSource::Default, CalibrationSource::File);
    let seqlen = a.seqlen.min(config.max_position_embeddings);
    let calib = sample_segments(&tokenizer, &source, a.nsamples, seqlen, a.seed)?;
    let runner = RunnerOptions {
        true_sequential: !a.no_true_sequential,
    };
    let (_, estimate) = memory_estimate(config, &calib, runner.true_sequential);
    if !a.quiet {
        eprintln!("calibration  {}", calib.description);
        eprintln!("memory       {estimate}");
    }
    let opts = GptqOptions {
        grid,
        damp: a.damp,
        block_size: a.block_size,
        act_order: a.act_order,
        static_groups: a.static_groups,
    };
    let options = json!({
        "damp": opts.damp, "block_size": opts.block_size, "act_order": opts.act_order,
        "static_groups": opts.static_groups, "true_sequential": runner.true_sequential,
        "allowed_bits": a.allowed_bits, "theta": a.theta,
        "measurement": a.measurement.as_ref().map(|p| p.display().to_string()),
        "allocate": a.allocate,
    });
    let mut losses = vec![];
    let quantizer: Box<dyn LayerQuantizer> = if a.method == "baq" {
        let baq_group = match a.group_size {
            None | Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            Some(g) => bail!("--group-size {g}: use a positive number of columns or -1"),
        };
        let pass1 = match &a.measurement {
            Some(path) => {
                let pass1 = load_measurement(path, config)?;
                if !a.quiet {
                    eprintln!("pass 1       reused from {}", path.display());
                }
                provenance["pass1"] = json!(format!("reused from {}", path.display()));
                pass1
            }
            None => {
                if !a.quiet {
                    eprintln!(
                        "pass 1       GPTQ w{} per-channel, measuring column losses",
                        grid.bits
                    );
                }
                provenance["pass1"] = json!(format!("GPTQ w{} per-channel", grid.bits));
                measure(config, store, &calib, grid.bits, runner, !a.quiet)?
            }
        };
        losses = pass1.iter().map(|(n, l)| (n.clone(), l.clone())).collect();
        losses.sort_by(|x, y| x.0.cmp(&y.0));
        let budget = LayerBudget {
            kind: if a.code_bits {
                BudgetKind::Codes
            } else {
                BudgetKind::Stored
            },
            bits: a.bits,
            allowed: a.allowed_bits.clone(),
            theta: a.theta,
            group_size: baq_group,
        };
        let allocation = if a.allocate == "model" {
            let specs = all_block_linears(config);
            let columns = specs
                .iter()
                .map(|s| {
                    let losses = pass1
                        .get(&s.name)
                        .ok_or_else(|| anyhow!("no pass-1 measurement for `{}`", s.name))?;
                    Ok(LayerColumns {
                        rows: s.out_features,
                        losses,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let widths = allocate_model(&columns, &budget)?;
            Allocation::Fixed(specs.into_iter().map(|s| s.name).zip(widths).collect())
        } else {
            Allocation::PerLayer(budget)
        };
        if !a.quiet {
            eprintln!(
                "pass 2       BAQ: {} bits average per {}, widths {:?}",
                a.bits,
                if a.allocate == "model" {
                    "model"
                } else {
                    "layer"
                },
                a.allowed_bits
            );
        }
        Box::new(Baq {
            pass1,
            allocation,
            group_size: baq_group,
            sym: a.sym,
            damp: a.damp,
            block_size: a.block_size,
        })
    } else {
        Box::new(Gptq { options: opts })
    };
    let dir = checkpoint_dir(&a.output);
    let key = checkpoint_key(a, files, &calib, &options);
    let q = quantize_model_calibrated(
        config,
        store,
        &calib,
        quantizer.as_ref(),
        &CalibratedOptions {
            runner,
            grid,
            progress: !a.quiet,
            checkpoint: Some(Checkpoint::new(dir.clone(), key)),
        },
    )?;
    provenance["calibration"] = json!(calib.description);
    provenance["options"] = options;
    provenance["solve_seconds"] = json!(q.solve_seconds);
    provenance["resumed_at_block"] = json!(q.resumed_at);
    provenance["layer_loss"] = json!(q
        .log
        .iter()
        .map(|l| json!({"name": l.name, "loss": l.loss, "seconds": l.seconds}))
        .collect::<Vec<_>>());
    if a.method == "gptq" {
        losses = q
            .layers
            .iter()
            .filter_map(|(s, r)| r.column_loss.clone().map(|l| (s.name.clone(), l)))
            .collect();
    }
    let layers = q.layers.into_iter().map(|(s, r)| (s, r.codes)).collect();
    Ok(Run {
        layers,
        losses,
        seconds: start.elapsed().as_secs_f64(),
        checkpoint: Some(dir),
    })
}

fn checkpoint_dir(output: &std::path::Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    output.with_file_name(format!(".{name}.checkpoint"))
}

/// Everything that determines the result; a checkpoint is reused only on an exact match.
fn checkpoint_key(a: &Args, files: &ModelFiles, calib: &CalibrationSet, options: &Value) -> Value {
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
        "bitsmith_version": env!("CARGO_PKG_VERSION"), "model": files.source, "revision": files.revision, "weights": weight_stamp,
        "calibration": calib.description, "segments_fnv": fnv1a(&calib.segments), "method": a.method,
        "bits": a.bits, "group_size": a.group_size, "sym": a.sym, "options": options,
    })
}

/// FNV-1a over the calibration token ids (identifies the exact segments in a checkpoint key).
fn fnv1a(segments: &[Vec<u32>]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for t in segments.iter().flatten() {
        for b in t.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

/// Pass-1 column losses saved by an earlier run (a folder holding
/// `column_losses.safetensors`, or the file), checked against this model's linears.
fn load_measurement(
    path: &std::path::Path,
    config: &ModelConfig,
) -> Result<HashMap<String, Vec<f64>>> {
    // a folder means its column_losses.safetensors (read_column_losses resolves it)
    let m = read_column_losses(path)
        .with_context(|| format!("reading the measurement {}", path.display()))?;
    for s in all_block_linears(config) {
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

/// Every decoder-block linear of the model, in order.
fn all_block_linears(config: &ModelConfig) -> Vec<LinearSpec> {
    (0..config.num_hidden_layers)
        .flat_map(|l| block_linears(config, l))
        .collect()
}
