use crate::eval::{load_corpus_text, perplexity, Corpus, PplOptions};
use crate::loader::{load_tokenizer, resolve_model};
use anyhow::{anyhow, bail, Result};
use candle_core::Device;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
#[command(
    long_about = "Perplexity with the GPTQ protocol: the corpus is tokenized once, cut into \
non-overlapping windows of --seqlen tokens (the partial tail is dropped), each window is evaluated \
on its own, and PPL = exp(mean NLL of all predicted tokens). Works on float and packed models."
)]
pub struct Args {
    /// Model folder (float or packed) or Hugging Face repo id.
    pub model: String,
    /// Hub revision (branch, tag or commit) when MODEL is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Built-in corpus: `wikitext2` (needs --data-dir or BITSMITH_DATA_DIR).
    #[arg(long, conflicts_with = "text", default_value = "wikitext2")]
    pub dataset: String,
    /// WikiText-2 split: test or valid.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Folder holding wiki.test.raw / wiki.valid.raw (or a wikitext-2-raw/ subfolder).
    #[arg(long, env = "BITSMITH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Evaluate a plain text file instead of a built-in corpus.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Window length in tokens (2 or more).
    #[arg(long, default_value_t = 2048, value_parser = super::ranges::seqlen, allow_negative_numbers = true)]
    pub seqlen: usize,
    /// Windows per forward pass (default: as many as fit 4096 tokens).
    #[arg(long, value_parser = super::ranges::positive, allow_negative_numbers = true)]
    pub batch: Option<usize>,
    /// Evaluate only the first N windows (1 or more).
    #[arg(long, value_parser = super::ranges::positive, allow_negative_numbers = true)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub packed: super::WeightArgs,
    /// Compute dtype: f32 (default), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = crate::parse_dtype(&a.dtype)?;
    let corpus = match &a.text {
        Some(p) => Corpus::File(p.clone()),
        None if a.dataset == "wikitext2" => Corpus::WikiText2 {
            split: a.split.clone(),
            data_dir: a.data_dir.clone(),
        },
        None => bail!(
            "unknown --dataset `{}` (available: wikitext2; or use --text FILE)",
            a.dataset
        ),
    };
    let files = resolve_model(&a.model, a.revision.as_deref())?;
    let text = load_corpus_text(&corpus)?;
    let tokenizer = load_tokenizer(&files)?;
    let t0 = Instant::now();
    let ids = tokenizer
        .encode(text.as_str(), true)
        .map_err(|e| anyhow!("tokenizing the corpus: {e}"))?
        .get_ids()
        .to_vec();
    let tokenize_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mode = a.packed.mode()?;
    let model = crate::infer::load_model_with(&files, dtype, &Device::Cpu, mode)?;
    let load_s = t1.elapsed().as_secs_f64();
    if a.seqlen > model.config.max_position_embeddings {
        eprintln!(
            "warning: --seqlen {} exceeds the model's max_position_embeddings {}",
            a.seqlen, model.config.max_position_embeddings
        );
    }
    let opts = PplOptions {
        seqlen: a.seqlen,
        batch: a.batch.unwrap_or((4096 / a.seqlen).max(1)),
        limit: a.limit,
        progress: !a.quiet && !a.json,
    };
    let r = perplexity(&model, &ids, &opts)?;
    let corpus_name = match &corpus {
        Corpus::WikiText2 { split, .. } => format!("wikitext2 {split}"),
        Corpus::File(p) => p.display().to_string(),
    };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = files.source.clone().into();
        v["revision"] = files.revision.clone().into();
        v["corpus"] = corpus_name.into();
        v["corpus_tokens"] = ids.len().into();
        v["dtype"] = a.dtype.clone().into();
        v["weights"] = a.packed.weights.clone().into();
        v["tokenize_seconds"] = tokenize_s.into();
        v["load_seconds"] = load_s.into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("model        {}", files.source);
        println!("corpus       {corpus_name} ({} tokens)", ids.len());
        println!("seqlen       {}", r.seqlen);
        println!(
            "windows      {} ({} predicted tokens)",
            r.windows, r.predicted_tokens
        );
        println!("mean NLL     {:.6}", r.mean_nll);
        println!("perplexity   {:.4}", r.ppl);
        println!(
            "speed        {:.1} tok/s ({:.1} s forward, {:.1} s load, {:.1} s tokenize)",
            r.tokens_per_second, r.seconds, load_s, tokenize_s
        );
    }
    Ok(())
}
