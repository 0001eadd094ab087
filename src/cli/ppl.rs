use crate::eval::report::pm;
use crate::eval::{
    kl_divergence, load_corpus_text, perplexity_saving, Corpus, KlBase, KlOptions, KlResult,
    LogitsHeader, LogitsReader, LogitsWriter, PplOptions,
};
use crate::loader::{load_tokenizer, ModelFiles};
use crate::pack::gguf::resolve_model_or_gguf;
use crate::model::CausalLm;
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Default top-k of `--save-logits` (see "KL divergence" in the README for what it costs).
pub const DEFAULT_TOP_K: usize = 1000;

/// The evaluation text, shared by `ppl` and `compare`.
#[derive(clap::Args)]
pub struct CorpusArgs {
    /// Built-in corpus: `wikitext2` (needs --data-dir or BITSMITH_DATA_DIR).
    #[arg(long, conflicts_with = "text", default_value = "wikitext2")]
    pub dataset: String,
    /// WikiText-2 split: test or valid.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Folder holding wiki.test.raw / wiki.valid.raw (or a wikitext-2-raw/ subfolder).
    #[arg(long, env = "BITSMITH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Evaluate a text file instead: plain UTF-8, or JSONL with a `text` field per line
    /// (`.jsonl`, or a first line that is a JSON object).
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
}

impl CorpusArgs {
    pub fn corpus(&self) -> Result<Corpus> {
        if self.seqlen < 2 {
            bail!("--seqlen must be at least 2");
        }
        Ok(match &self.text {
            Some(p) => Corpus::File(p.clone()),
            None if self.dataset == "wikitext2" => Corpus::WikiText2 {
                split: self.split.clone(),
                data_dir: self.data_dir.clone(),
            },
            None => bail!(
                "unknown --dataset `{}` (available: wikitext2; or use --text FILE)",
                self.dataset
            ),
        })
    }

    pub fn batch(&self) -> usize {
        self.batch.unwrap_or((4096 / self.seqlen.max(1)).max(1))
    }
}

/// The corpus tokenized by `files`' tokenizer, and the seconds it took.
pub fn tokenize(files: &ModelFiles, corpus: &Corpus) -> Result<(Vec<u32>, f64)> {
    let text = load_corpus_text(corpus)?;
    let tokenizer = load_tokenizer(files)?;
    let t0 = Instant::now();
    let ids = tokenizer
        .encode(text.as_str(), true)
        .map_err(|e| anyhow!("tokenizing the corpus: {e}"))?
        .get_ids()
        .to_vec();
    Ok((ids, t0.elapsed().as_secs_f64()))
}

/// Refuse a base model whose tokenizer reads the corpus differently from the model's
/// (then its distributions are over other tokens and KL divergence means nothing).
pub fn check_same_tokens(
    base: &ModelFiles,
    model: &ModelFiles,
    corpus: &Corpus,
    ids: &[u32],
) -> Result<()> {
    let same_file = match (&base.tokenizer, &model.tokenizer) {
        (Some(a), Some(b)) => std::fs::read(a)
            .ok()
            .zip(std::fs::read(b).ok())
            .is_some_and(|(a, b)| a == b),
        _ => false,
    };
    if same_file {
        return Ok(());
    }
    let (base_ids, _) = tokenize(base, corpus)?;
    if let Some(i) = (0..ids.len().min(base_ids.len())).find(|&i| ids[i] != base_ids[i]) {
        bail!(
            "`{}` and `{}` tokenize the corpus differently (token {i}: {} and {}): KL divergence needs the same tokens",
            base.source,
            model.source,
            base_ids[i],
            ids[i]
        );
    }
    if ids.len() != base_ids.len() {
        bail!(
            "`{}` and `{}` tokenize the corpus into {} and {} tokens: KL divergence needs the same tokens",
            base.source,
            model.source,
            base_ids.len(),
            ids.len()
        );
    }
    Ok(())
}

/// A `--kl-base` argument: a logits file, or a model (folder, repo id or `.gguf` file).
pub fn is_logits_file(base: &str) -> bool {
    Path::new(base).is_file() && !crate::pack::gguf::source::is_gguf_path(Path::new(base))
}

/// Load a model for evaluation (on `--device`), warning about windows past its context.
pub fn load_eval_model(
    files: &ModelFiles,
    dtype: &str,
    weights: &super::WeightArgs,
    seqlen: usize,
) -> Result<CausalLm> {
    let dtype = crate::parse_dtype(dtype)?;
    let model = crate::infer::load_model_with(files, dtype, &weights.device()?, weights.mode()?)?;
    if seqlen > model.config.max_position_embeddings {
        eprintln!(
            "warning: --seqlen {seqlen} exceeds `{}`'s max_position_embeddings {}",
            files.source, model.config.max_position_embeddings
        );
    }
    Ok(model)
}

#[derive(clap::Args)]
#[command(
    long_about = "Perplexity with the GPTQ protocol: the corpus is tokenized once, cut into \
non-overlapping windows of --seqlen tokens (the partial tail is dropped), each window is evaluated \
on its own, and PPL = exp(mean NLL of all predicted tokens). Works on float and packed models.\n\n\
With --kl-base BASE the same windows also run through BASE (a model, or a file written by \
--save-logits) and the report adds the KL divergence KL(P_base || P_model) per token (mean, \
median, 99th percentile, max), top-1 agreement and the RMS change of the correct token's \
probability, each mean with its standard error across windows."
)]
pub struct Args {
    /// Model folder (float or packed), Hugging Face repo id or `.gguf` file (decoded once
    /// into bitsmith's cache).
    pub model: String,
    /// Hub revision (branch, tag or commit) when MODEL is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Compare with a base: a model (folder or repo id, usually the float original), run
    /// window by window alongside, or a logits file saved by `--save-logits`.
    #[arg(long, value_name = "BASE")]
    pub kl_base: Option<String>,
    /// Save this model's logits for later `--kl-base FILE` runs: per predicted token the
    /// top-k logits, the log-normaliser, the tail mass and the correct token's NLL.
    #[arg(long, value_name = "FILE", conflicts_with = "kl_base")]
    pub save_logits: Option<PathBuf>,
    /// Tokens per position kept by --save-logits (8·k + 24 bytes per token).
    #[arg(long, default_value_t = DEFAULT_TOP_K, requires = "save_logits")]
    pub top_k: usize,
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
    a.packed.check_device()?;
    let corpus = a.corpus.corpus()?;
    let files = resolve_model_or_gguf(&a.model, a.revision.as_deref())?;
    let (ids, tokenize_s) = tokenize(&files, &corpus)?;
    let t1 = Instant::now();
    let model = load_eval_model(&files, &a.dtype, &a.packed, a.corpus.seqlen)?;
    let load_s = t1.elapsed().as_secs_f64();
    let progress = !a.quiet && !a.json;
    if let Some(base) = &a.kl_base {
        return run_kl(&a, base, &files, &corpus, &ids, &model, progress);
    }
    let opts = PplOptions {
        seqlen: a.corpus.seqlen,
        batch: a.corpus.batch(),
        limit: a.corpus.limit,
        progress,
    };
    let mut writer = match &a.save_logits {
        Some(path) => {
            let windows = crate::eval::windows::Windows::new(&ids, opts.seqlen, opts.limit)?;
            let header = LogitsHeader {
                model: files.source.clone(),
                corpus: corpus.describe(),
                vocab: model.config.vocab_size,
                seqlen: opts.seqlen,
                windows: windows.count(),
                top_k: a.top_k,
            };
            Some(LogitsWriter::create(path, header, windows.tokens())?)
        }
        None => None,
    };
    let r = perplexity_saving(&model, &ids, &opts, writer.as_mut())?;
    let saved = writer.map(|w| w.finish()).transpose()?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = files.source.clone().into();
        v["revision"] = files.revision.clone().into();
        v["corpus"] = corpus.describe().into();
        v["corpus_tokens"] = ids.len().into();
        v["dtype"] = a.dtype.clone().into();
        v["weights"] = a.packed.weights.clone().into();
        v["tokenize_seconds"] = tokenize_s.into();
        v["load_seconds"] = load_s.into();
        if let Some(p) = &saved {
            v["saved_logits"] = p.display().to_string().into();
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("model        {}", files.source);
        println!("corpus       {} ({} tokens)", corpus.describe(), ids.len());
        println!("seqlen       {}", r.seqlen);
        println!(
            "windows      {} ({} predicted tokens)",
            r.windows, r.predicted_tokens
        );
        println!("mean NLL     {}", pm(r.mean_nll, r.mean_nll_se, 6));
        println!("perplexity   {}", pm(r.ppl, r.ppl_se, 4));
        println!(
            "speed        {:.1} tok/s ({:.1} s forward, {:.1} s load, {:.1} s tokenize)",
            r.tokens_per_second, r.seconds, load_s, tokenize_s
        );
        if let Some(p) = &saved {
            println!("saved        top-{} logits to {}", a.top_k, p.display());
        }
    }
    Ok(())
}

fn run_kl(
    a: &Args,
    base: &str,
    files: &ModelFiles,
    corpus: &Corpus,
    ids: &[u32],
    model: &CausalLm,
    progress: bool,
) -> Result<()> {
    let opts = KlOptions {
        seqlen: a.corpus.seqlen,
        batch: a.corpus.batch(),
        limit: a.corpus.limit,
        progress,
    };
    let (r, base_name) = if is_logits_file(base) {
        let mut reader = LogitsReader::open(Path::new(base))?;
        let name = format!(
            "{} (top-{} logits of {})",
            base,
            reader.header().top_k,
            reader.header().model
        );
        let r = kl_divergence(KlBase::File(&mut reader), &[model], ids, &opts)?;
        (r, name)
    } else {
        let base_files = resolve_model_or_gguf(base, None)?;
        check_same_tokens(&base_files, files, corpus, ids)?;
        let base_model = load_eval_model(&base_files, &a.dtype, &a.packed, a.corpus.seqlen)?;
        let r = kl_divergence(KlBase::Model(&base_model), &[model], ids, &opts)?;
        (r, base_files.source.clone())
    };
    let r: &KlResult = &r[0];
    if a.json {
        let mut v = serde_json::to_value(r)?;
        v["model"] = files.source.clone().into();
        v["kl_base"] = base_name.into();
        v["corpus"] = corpus.describe().into();
        v["corpus_tokens"] = ids.len().into();
        v["dtype"] = a.dtype.clone().into();
        v["weights"] = a.packed.weights.clone().into();
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let kl = &r.kl_divergence;
    println!("model          {}", files.source);
    println!("base           {base_name}");
    println!(
        "corpus         {} ({} tokens)",
        corpus.describe(),
        ids.len()
    );
    println!(
        "windows        {} × {} ({} predicted tokens); ± is one standard error across windows",
        r.windows, r.seqlen, r.predicted_tokens
    );
    println!("perplexity     {}", pm(r.ppl, r.ppl_se, 4));
    println!("base ppl       {}", pm(r.ppl_base, r.ppl_base_se, 4));
    println!(
        "Δ ln ppl       {} (paired across windows)",
        pm(r.delta_nll, r.delta_nll_se, 5)
    );
    println!(
        "KL divergence  mean {}, median {:.5}, p99 {:.4}, max {:.3} nats",
        pm(kl.mean, kl.mean_se, 5),
        kl.median,
        kl.p99,
        kl.max
    );
    println!(
        "top-1 agree    {} %",
        pm(
            100.0 * r.top1_agreement,
            r.top1_agreement_se.map(|x| 100.0 * x),
            2
        )
    );
    println!("RMS Δp         {:.5}", r.rms_delta_p);
    if let Some(t) = &r.base_tail_mass {
        println!(
            "base tail      mean {:.2e}, max {:.3} of the base's mass outside the saved top-k \
             (KL is a lower bound short by at most this mass × the divergence inside it)",
            t.mean, t.max
        );
    }
    println!(
        "speed          {:.1} tok/s ({:.1} s, both models' forwards)",
        r.tokens_per_second, r.seconds
    );
    Ok(())
}
