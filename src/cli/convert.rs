//! `bitsmith convert`: a GGUF file back to a Hugging Face folder bitsmith (and others) load.

use crate::pack::gguf::{import_gguf, ImportOptions, StoredDtype};
use anyhow::Result;
use std::path::PathBuf;

/// How the decoded weights are stored.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DtypeArg {
    /// Exact for every GGML type.
    F32,
    /// Half the size; rounded to nearest even.
    Bf16,
    /// Half the size; rounded to nearest even.
    F16,
}

#[derive(clap::Args)]
pub struct Args {
    /// A `llama` GGUF file (any GGML type candle decodes).
    pub gguf: PathBuf,
    /// Output folder: `config.json`, `generation_config.json`, `model.safetensors` and the
    /// tokenizer files.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Stored dtype of the weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Copy `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` from
    /// this folder instead of rebuilding them from the GGUF's vocabulary (needed for
    /// vocabularies other than SentencePiece (`llama`) and byte-level BPE with the
    /// `smollm`, `starcoder`, `gpt-2`, `llama-bpe` or `qwen2` pre-tokenizer).
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    /// Replace an existing output folder.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = match a.dtype {
        DtypeArg::F32 => StoredDtype::F32,
        DtypeArg::Bf16 => StoredDtype::Bf16,
        DtypeArg::F16 => StoredDtype::F16,
    };
    let opts = ImportOptions {
        tokenizer_from: a.tokenizer_from,
        dtype,
        overwrite: a.overwrite,
    };
    let out = import_gguf(&a.gguf, &a.output, &opts)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
