//! `bitsmith convert`: a GGUF file back to a Hugging Face folder bitsmith (and others) load.

use crate::pack::gguf::import_gguf;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A `llama` GGUF file (any GGML type candle decodes).
    pub gguf: PathBuf,
    /// Output folder: `config.json` and F32 `model.safetensors`.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Copy `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` from
    /// this folder (rebuilding `tokenizer.json` from the GGUF's vocabulary is not done yet).
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    /// Replace an existing output folder.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(a: Args) -> Result<()> {
    let out = import_gguf(&a.gguf, &a.output, a.tokenizer_from.as_deref(), a.overwrite)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
