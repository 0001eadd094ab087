//! `bitsmith export`: write a model in another runtime's format (GGUF for llama.cpp,
//! compressed-tensors for vLLM).

use super::human_bytes;
use crate::pack::gguf::resolve_model_or_gguf;
use crate::pack::compressed_tensors::export_compressed_tensors;
use crate::pack::gguf::{export_gguf, GgmlType, GgufExportOptions, GgufFileType};
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (float, or bitsmith GPTQ-layout output), Hugging Face repo id or `.gguf`
    /// file (decoded once into bitsmith's cache).
    pub model: String,
    /// Output format: `gguf` (a file, llama.cpp) or `compressed-tensors` (a folder in the
    /// `pack-quantized` format vLLM loads; from a bitsmith quantized model, code for code).
    #[arg(long, default_value = "gguf", value_parser = ["gguf", "compressed-tensors"])]
    pub format: String,
    /// GGML type of the block linears: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, the K-quants
    /// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (rounded as `llama-quantize` rounds without an importance
    /// matrix; a K-quant layer whose input width is not a multiple of 256 falls back as
    /// llama.cpp's does: Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0), or F32,
    /// F16, BF16; or one of llama.cpp's mixes (Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q3_K_L,
    /// Q3_K_M, Q3_K_S, Q2_K_S), which widen some tensors by role and depth as
    /// `llama-quantize` does (a single K-quant name is `llama-quantize --pure`). A quantized
    /// model converts code for code (w4 g32·k sym → Q4_0, w8 sym → Q8_0), its type is the
    /// default.
    #[arg(long = "type")]
    pub ty: Option<GgufFileType>,
    /// GGML type of the token embedding (and of an untied output head). Default: F32 with
    /// a single block type; with a mix, llama.cpp's choice (Q6_K, or Q8_0 where the rows
    /// are not whole blocks).
    #[arg(long)]
    pub embedding_type: Option<GgmlType>,
    /// llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`) when bitsmith does not
    /// recognise the tokenizer's.
    #[arg(long)]
    pub tokenizer_pre: Option<String>,
    /// Write no vocabulary (a model whose tokenizer.json is not a BPE: neither byte-level nor
    /// converted from SentencePiece).
    #[arg(long)]
    pub no_vocab: bool,
    /// Output file (`.gguf`), or folder for compressed-tensors.
    #[arg(short, long)]
    pub output: PathBuf,
    /// compressed-tensors: largest safetensors shard in MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_shard_mib: u64,
    /// Replace an existing output.
    #[arg(long)]
    pub overwrite: bool,
    /// Also write the values bitsmith means every tensor to hold (F32 safetensors; GGUF:
    /// GGUF names and row order, every tensor; compressed-tensors: each quantized linear's
    /// dequantized weights under its Hugging Face name), for checking a consumer's
    /// dequantization (`scripts/gguf_check.py`, `scripts/compressed_tensors_check.py`).
    #[arg(long)]
    pub reference_weights: Option<PathBuf>,
    /// Hub revision when MODEL is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let files = resolve_model_or_gguf(&a.model, a.revision.as_deref())?;
    if a.format == "compressed-tensors" {
        if a.ty.is_some() || a.tokenizer_pre.is_some() {
            bail!("--type and --tokenizer-pre are GGUF options");
        }
        let r = export_compressed_tensors(
            &files,
            &a.output,
            a.overwrite,
            a.max_shard_mib << 20,
            a.reference_weights.as_deref(),
        )?;
        eprintln!(
            "wrote {} ({}, {} linears w{} {}{}, {} kept in float)",
            r.path.display(),
            human_bytes(r.bytes),
            r.quantized_linears,
            r.bits,
            if r.symmetric { "sym" } else { "asym" },
            r.group_size
                .map_or(" per channel".into(), |g| format!(" g{g}")),
            r.ignored.len()
        );
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let opts = GgufExportOptions {
        ty: a.ty,
        embedding_ty: a.embedding_type,
        tokenizer_pre: a.tokenizer_pre,
        no_vocab: a.no_vocab,
        overwrite: a.overwrite,
        reference_weights: a.reference_weights,
    };
    let r = export_gguf(&files, &a.output, &opts)?;
    super::print_fallback_notes(&r.fallbacks);
    eprintln!(
        "wrote {} ({}, {} tensors, linears {}{})",
        r.path.display(),
        human_bytes(r.bytes),
        r.tensors,
        r.linear_type,
        if r.exact {
            ", converted code for code"
        } else {
            ""
        }
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
