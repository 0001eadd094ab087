use super::human_bytes;
use crate::calibration::checkpoint::Checkpoint;
use crate::calibration::{sample_segments, CalibrationSource, RunnerOptions};
use crate::loader::{load_tokenizer, resolve_model, ModelConfig, ModelFiles, WeightStore};
use crate::model::LinearSpec;
use crate::pack::{
    write_column_losses, write_gptq_model, GptqConfig, OutputFolder, ZeroConvention,
};
use crate::quant::calibrated::memory_estimate;
use crate::quant::{
    quantize_model, quantize_model_calibrated, CalibratedOptions, Gptq, GptqOptions, GroupSize,
    QuantizeOptions, QuantizedLinear, Rtn, UniformGrid,
};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(
    long_about = "Quantize every linear layer inside the decoder blocks (embeddings and lm_head \
stay in their original precision unless --lm-head) and write OUT: a folder with GPTQ-layout packed \
weights (qweight/qzeros/scales/g_idx), config.json with quantization_config, and the tokenizer. \
OUT is written to a hidden temporary folder and renamed only when complete.\n\n\
Methods: rtn (round to nearest, no data) and gptq (Hessian-based error feedback; needs calibration \
text: the embedded WikiText-2 validation split by default, or --calib FILE). A gptq run checkpoints \
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
    /// Quantization method: rtn or gptq.
    #[arg(long, default_value = "rtn")]
    pub method: String,
    /// Bits per weight: 2, 3, 4 or 8.
    #[arg(long, default_value_t = 4)]
    pub bits: u8,
    /// Input columns per scale/zero group; -1 for one group per output channel. A width
    /// that is not a multiple gets a smaller last group.
    #[arg(long, default_value_t = 128, allow_hyphen_values = true)]
    pub group_size: i64,
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
    let grid = UniformGrid::new(a.bits, GroupSize::from_i64(a.group_size)?, a.sym)?;
    let zeros = ZeroConvention::parse(&a.checkpoint_format)?;
    match a.method.as_str() {
        "rtn" | "gptq" => {}
        m @ ("baq" | "flexround" | "nupes" | "ostquant") => {
            bail!("method `{m}` is not built yet (available: rtn, gptq)")
        }
        m => bail!("unknown method `{m}` (available: rtn, gptq)"),
    }
    if a.method == "gptq" && a.lm_head {
        bail!("--lm-head is only supported with --method rtn");
    }
    let files = resolve_model(&a.model, a.revision.as_deref())?;
    let config = ModelConfig::from_file(&files.config)?;
    if GptqConfig::from_model_config(&config.raw)?.is_some() {
        bail!("`{}` is already quantized; quantize a float model", a.model);
    }
    let store = WeightStore::open(&files.weights)?;
    let out = OutputFolder::create(&a.output, a.overwrite)?;

    let mut provenance = json!({
        "bitsmith_version": env!("CARGO_PKG_VERSION"),
        "format": "gptq",
        "method": a.method,
        "bits": a.bits,
        "group_size": a.group_size,
        "sym": a.sym,
        "lm_head": a.lm_head,
        "source": {"model": files.source, "revision": files.revision},
    });
    let (layers, losses, seconds, checkpoint_dir): CalibratedRun = if a.method == "rtn" {
        let q = quantize_model(
            &config,
            &store,
            &Rtn { grid },
            &QuantizeOptions {
                include_lm_head: a.lm_head,
                progress: !a.quiet,
            },
        )?;
        (q.layers, vec![], q.seconds, None)
    } else {
        let opts = GptqOptions {
            grid,
            damp: a.damp,
            block_size: a.block_size,
            act_order: a.act_order,
            static_groups: a.static_groups,
        };
        run_gptq(&a, &files, &config, &store, opts, &mut provenance)?
    };
    provenance["quantized_modules"] = json!(layers
        .iter()
        .map(|(s, _)| s.name.clone())
        .collect::<Vec<_>>());
    provenance["quantize_seconds"] = json!(seconds);
    let grouped = !matches!(grid.group_size, GroupSize::PerChannel);
    let qcfg = GptqConfig {
        bits: a.bits,
        group_size: grid.group_size,
        sym: a.sym,
        desc_act: a.act_order && !a.static_groups && grouped,
        lm_head: a.lm_head,
        zeros,
        meta: json!({"quantizer": [format!("bitsmith:{}", env!("CARGO_PKG_VERSION"))], "method": a.method}),
    };
    let report = write_gptq_model(
        &out,
        &files,
        &config,
        &store,
        &layers,
        &qcfg,
        provenance,
        a.max_shard_mib << 20,
    )?;
    if !losses.is_empty() {
        write_column_losses(&out, &losses)?;
    }
    let path = out.commit()?;
    if let Some(dir) = checkpoint_dir {
        std::fs::remove_dir_all(dir).ok();
    }
    let group = match grid.group_size {
        GroupSize::PerChannel => " per-channel".to_string(),
        GroupSize::Columns(g) => format!("g{g}"),
    };
    println!("wrote        {}", path.display());
    println!(
        "method       {} w{}{group} {}",
        a.method,
        a.bits,
        if a.sym { "sym" } else { "asym" }
    );
    println!("layers       {} quantized ({:.1} s)", layers.len(), seconds);
    println!(
        "weights      {:.3} bits per quantized weight (codes, scales, zeros, g_idx)",
        report.bits_per_weight()
    );
    println!("size         {} on disk", human_bytes(report.total_bytes));
    Ok(())
}

/// Quantized layers, per-column losses, seconds, and the checkpoint folder to delete once
/// the output is in place.
type CalibratedRun = (
    Vec<(LinearSpec, QuantizedLinear)>,
    Vec<(String, Vec<f64>)>,
    f64,
    Option<PathBuf>,
);

fn run_gptq(
    a: &Args,
    files: &ModelFiles,
    config: &ModelConfig,
    store: &WeightStore,
    opts: GptqOptions,
    provenance: &mut Value,
) -> Result<CalibratedRun> {
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
    let options = json!({
        "damp": opts.damp, "block_size": opts.block_size, "act_order": opts.act_order,
        "static_groups": opts.static_groups, "true_sequential": runner.true_sequential,
    });
    // everything that determines the result; a checkpoint is reused only on an exact match
    let weight_stamp: Vec<Value> = files
        .weights
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok();
            json!({"file": p.display().to_string(), "bytes": m.as_ref().map(|m| m.len()),
                   "modified": m.and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs())})
        })
        .collect();
    let key = json!({
        "bitsmith_version": env!("CARGO_PKG_VERSION"), "model": files.source, "revision": files.revision, "weights": weight_stamp,
        "calibration": calib.description, "segments_fnv": fnv1a(&calib.segments),
        "bits": a.bits, "group_size": a.group_size, "sym": a.sym, "options": options,
    });
    let name = a
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let dir = a.output.with_file_name(format!(".{name}.checkpoint"));
    let checkpoint = Checkpoint::new(dir.clone(), key);
    let q = quantize_model_calibrated(
        config,
        store,
        &calib,
        &Gptq { options: opts },
        &CalibratedOptions {
            runner,
            grid: opts.grid,
            progress: !a.quiet,
            checkpoint: Some(checkpoint),
        },
    )?;
    provenance["calibration"] = json!(calib.description);
    provenance["gptq"] = options;
    provenance["solve_seconds"] = json!(q.solve_seconds);
    provenance["resumed_at_block"] = json!(q.resumed_at);
    provenance["layer_loss"] = json!(q
        .log
        .iter()
        .map(|l| json!({"name": l.name, "loss": l.loss, "seconds": l.seconds}))
        .collect::<Vec<_>>());
    let losses = q
        .layers
        .iter()
        .filter_map(|(s, r)| r.column_loss.clone().map(|l| (s.name.clone(), l)))
        .collect();
    let layers = q
        .layers
        .into_iter()
        .map(|(s, r)| Ok((s, r.codes.into_uniform()?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((layers, losses, q.seconds, Some(dir)))
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
