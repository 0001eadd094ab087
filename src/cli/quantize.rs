use super::human_bytes;
use crate::loader::{resolve_model, ModelConfig, WeightStore};
use crate::pack::{write_gptq_model, GptqConfig, OutputFolder, ZeroConvention};
use crate::quant::{quantize_model, GroupSize, LayerQuantizer, QuantizeOptions, Rtn, UniformGrid};
use anyhow::{bail, Result};
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(
    long_about = "Quantize every linear layer inside the decoder blocks (embeddings and lm_head \
stay in their original precision unless --lm-head) and write OUT: a folder with GPTQ-layout packed \
weights (qweight/qzeros/scales/g_idx), config.json with quantization_config, and the tokenizer. \
OUT is written to a hidden temporary folder and renamed only when complete."
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
    /// Quantization method. Available: rtn.
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
    /// Quantize lm_head too.
    #[arg(long)]
    pub lm_head: bool,
    /// Zero-point convention: gptq (v1, most compatible) or gptq_v2.
    #[arg(long, default_value = "gptq")]
    pub checkpoint_format: String,
    /// Largest safetensors shard in MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_shard_mib: u64,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    // validate everything cheap before any heavy work or any file is created
    let grid = UniformGrid::new(a.bits, GroupSize::from_i64(a.group_size)?, a.sym)?;
    let zeros = ZeroConvention::parse(&a.checkpoint_format)?;
    let quantizer: Box<dyn LayerQuantizer> = match a.method.as_str() {
        "rtn" => Box::new(Rtn { grid }),
        m @ ("gptq" | "baq" | "flexround" | "nupes" | "ostquant") => {
            bail!("method `{m}` is not built yet (available: rtn)")
        }
        m => bail!("unknown method `{m}` (available: rtn)"),
    };
    let files = resolve_model(&a.model, a.revision.as_deref())?;
    let config = ModelConfig::from_file(&files.config)?;
    if GptqConfig::from_model_config(&config.raw)?.is_some() {
        bail!("`{}` is already quantized; quantize a float model", a.model);
    }
    let store = WeightStore::open(&files.weights)?;
    let out = OutputFolder::create(&a.output, a.overwrite)?;

    let q = quantize_model(
        &config,
        &store,
        quantizer.as_ref(),
        &QuantizeOptions {
            include_lm_head: a.lm_head,
            progress: !a.quiet,
        },
    )?;
    let qcfg = GptqConfig {
        bits: a.bits,
        group_size: grid.group_size,
        sym: a.sym,
        desc_act: false,
        lm_head: a.lm_head,
        zeros,
        meta: json!({"quantizer": [format!("bitsmith:{}", env!("CARGO_PKG_VERSION"))], "method": quantizer.name()}),
    };
    let provenance = json!({
        "bitsmith_version": env!("CARGO_PKG_VERSION"),
        "format": "gptq",
        "method": quantizer.name(),
        "bits": a.bits,
        "group_size": a.group_size,
        "sym": a.sym,
        "lm_head": a.lm_head,
        "source": {"model": files.source, "revision": files.revision},
        "quantized_modules": q.layers.iter().map(|(s, _)| s.name.clone()).collect::<Vec<_>>(),
        "quantize_seconds": q.seconds,
    });
    let report = write_gptq_model(
        &out,
        &files,
        &config,
        &store,
        &q.layers,
        &qcfg,
        provenance,
        a.max_shard_mib << 20,
    )?;
    let path = out.commit()?;
    println!("wrote        {}", path.display());
    println!(
        "method       {} w{}{} {}",
        quantizer.name(),
        a.bits,
        match grid.group_size {
            GroupSize::PerChannel => " per-channel".to_string(),
            GroupSize::Columns(g) => format!("g{g}"),
        },
        if a.sym { "sym" } else { "asym" }
    );
    println!(
        "layers       {} quantized ({:.1} s)",
        q.layers.len(),
        q.seconds
    );
    println!(
        "weights      {:.3} bits per quantized weight (codes, scales, zeros, g_idx)",
        report.bits_per_weight()
    );
    println!("size         {} on disk", human_bytes(report.total_bytes));
    Ok(())
}
