use super::ppl::{check_same_tokens, is_logits_file, load_eval_model, tokenize, CorpusArgs};
use crate::eval::plot::{bits_per_layer_png, pareto_png};
use crate::eval::report::{BaseRow, Comparison, ModelRow};
use crate::pack::storage::ModelStorage;
use crate::eval::{kl_divergence, KlBase, KlOptions, LogitsReader};
use crate::pack::gguf::resolve_model_or_gguf;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
#[command(
    long_about = "Evaluate several models on the same windows against one base (usually the \
float original) and write a report: a markdown and a JSON table (perplexity, KL divergence to \
the base, top-1 agreement, RMS change of the correct token's probability, each mean with its \
standard error across windows), a Pareto chart of perplexity and mean KL against stored bits \
per weight (pareto.png), and a bits-per-layer chart for each mixed-width (BAQ) model. The \
models run in lock-step with the base, so all of them are held in memory at once."
)]
pub struct Args {
    /// Models to compare (folders or repo ids).
    #[arg(required_unless_present = "merge")]
    pub models: Vec<String>,
    /// The base: a model (folder or repo id) or a logits file saved by `ppl --save-logits`.
    #[arg(long, value_name = "BASE", required_unless_present = "merge")]
    pub kl_base: Option<String>,
    /// Instead of evaluating, combine the compare.json of earlier runs against the same base
    /// on the same windows into one report (the models' folders are read for their bits).
    #[arg(long, value_name = "JSON", num_args = 1.., conflicts_with_all = ["models", "kl_base"])]
    pub merge: Vec<PathBuf>,
    /// Names for the models in the table and plots, comma-separated in MODEL order
    /// (default: method and widths from each model's quantization config).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Folder for compare.md, compare.json and the PNGs (created if missing).
    #[arg(short, long, default_value = "compare-report")]
    pub out: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    #[command(flatten)]
    pub packed: super::WeightArgs,
    /// Compute dtype: f32 (default), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    a.packed.check_device()?;
    if !a.merge.is_empty() {
        return merge(&a);
    }
    let kl_base = a.kl_base.clone().unwrap_or_default();
    if !a.labels.is_empty() && a.labels.len() != a.models.len() {
        bail!(
            "--labels names {} models; {} were given",
            a.labels.len(),
            a.models.len()
        );
    }
    let corpus = a.corpus.corpus()?;
    let files = a
        .models
        .iter()
        .map(|m| resolve_model_or_gguf(m, None))
        .collect::<crate::Result<Vec<_>>>()?;
    let storages = a
        .models
        .iter()
        .map(|m| ModelStorage::open(m, None))
        .collect::<Result<Vec<_>>>()?;
    let (ids, _) = tokenize(&files[0], &corpus)?;
    for f in &files[1..] {
        check_same_tokens(f, &files[0], &corpus, &ids)?;
    }
    let models = files
        .iter()
        .map(|f| load_eval_model(f, &a.dtype, &a.packed, a.corpus.seqlen))
        .collect::<Result<Vec<_>>>()?;
    let model_refs: Vec<_> = models.iter().collect();
    let opts = KlOptions {
        seqlen: a.corpus.seqlen,
        batch: a.corpus.batch(),
        limit: a.corpus.limit,
        progress: !a.quiet,
    };
    let (results, base, base_top_k) = if is_logits_file(&kl_base) {
        let mut reader = LogitsReader::open(Path::new(&kl_base))?;
        let header = reader.header().clone();
        let r = kl_divergence(KlBase::File(&mut reader), &model_refs, &ids, &opts)?;
        let base = BaseRow {
            label: header.model.clone(),
            model: format!(
                "{} (top-{} logits of {})",
                kl_base, header.top_k, header.model
            ),
            stored_bits_per_weight: None,
            ppl: r[0].ppl_base,
            ppl_se: r[0].ppl_base_se,
        };
        (r, base, Some(header.top_k))
    } else {
        let base_files = resolve_model_or_gguf(&kl_base, None)?;
        check_same_tokens(&base_files, &files[0], &corpus, &ids)?;
        let storage = ModelStorage::open(&kl_base, None)?;
        let base_model = load_eval_model(&base_files, &a.dtype, &a.packed, a.corpus.seqlen)?;
        let r = kl_divergence(KlBase::Model(&base_model), &model_refs, &ids, &opts)?;
        let base = BaseRow {
            label: storage.label(),
            model: base_files.source.clone(),
            stored_bits_per_weight: Some(storage.stored_bits_per_weight()),
            ppl: r[0].ppl_base,
            ppl_se: r[0].ppl_base_se,
        };
        (r, base, None)
    };
    let first = &results[0];
    let report = Comparison {
        corpus: corpus.describe(),
        seqlen: first.seqlen,
        windows: first.windows,
        predicted_tokens: first.predicted_tokens,
        base,
        base_top_k,
        models: results
            .into_iter()
            .zip(&storages)
            .enumerate()
            .map(|(i, (result, s))| ModelRow {
                label: a.labels.get(i).cloned().unwrap_or_else(|| s.label()),
                model: a.models[i].clone(),
                stored_bits_per_weight: s.stored_bits_per_weight(),
                code_bits_per_weight: s.code_bits_per_weight(),
                result,
            })
            .collect(),
    };
    write_report(&a.out, &report, &storages)
}

/// Combine earlier reports made against the same base on the same windows.
fn merge(a: &Args) -> Result<()> {
    let read = |p: &PathBuf| -> Result<Comparison> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a compare.json report", p.display()))
    };
    let mut report = read(&a.merge[0])?;
    for p in &a.merge[1..] {
        let r = read(p)?;
        let same = r.corpus == report.corpus
            && r.seqlen == report.seqlen
            && r.windows == report.windows
            && r.base.model == report.base.model
            && (r.base.ppl - report.base.ppl).abs() <= 1e-6 * report.base.ppl;
        if !same {
            bail!(
                "{} compares against {} on {} windows × {} of {} (base ppl {}); {} against {} on {} × {} of {} (base ppl {}): not the same base and windows",
                a.merge[0].display(), report.base.model, report.windows, report.seqlen, report.corpus, report.base.ppl,
                p.display(), r.base.model, r.windows, r.seqlen, r.corpus, r.base.ppl
            );
        }
        report.models.extend(r.models);
    }
    if !a.labels.is_empty() {
        if a.labels.len() != report.models.len() {
            bail!(
                "--labels names {} models; the reports hold {}",
                a.labels.len(),
                report.models.len()
            );
        }
        for (m, l) in report.models.iter_mut().zip(&a.labels) {
            m.label = l.clone();
        }
    }
    let storages = report
        .models
        .iter()
        .map(|m| ModelStorage::open(&m.model, None))
        .collect::<Result<Vec<_>>>()?;
    write_report(&a.out, &report, &storages)
}

/// compare.md, compare.json, pareto.png and a bits-per-layer chart per mixed model.
fn write_report(out: &Path, report: &Comparison, storages: &[ModelStorage]) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating report folder {}", out.display()))?;
    let markdown = report.markdown();
    let write = |name: &str, bytes: &[u8]| {
        let p = out.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))
    };
    write("compare.md", markdown.as_bytes())?;
    write(
        "compare.json",
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    let subtitle = format!(
        "{} windows × {} tokens of {}, ±1 SE",
        report.windows, report.seqlen, report.corpus
    );
    pareto_png(&out.join("pareto.png"), &report.pareto_points(), &subtitle)?;
    let mut written = vec![
        "compare.md".to_string(),
        "compare.json".into(),
        "pareto.png".into(),
    ];
    for (row, s) in report.models.iter().zip(storages) {
        if s.is_mixed() {
            let name = format!("bits-per-layer-{}.png", file_stem(&row.label));
            let title = format!(
                "{}: code bits per weight by block and projection ({:.3} stored bits per weight)",
                row.label,
                s.stored_bits_per_weight()
            );
            let layers: Vec<(String, f64)> = s
                .layers
                .iter()
                .map(|l| (l.name.clone(), l.code_bits_per_weight()))
                .collect();
            bits_per_layer_png(&out.join(&name), &layers, &title)?;
            written.push(name);
        }
    }
    print!("{markdown}");
    println!("\nwrote {} in {}", written.join(", "), out.display());
    Ok(())
}

/// A label as a file name: letters, digits, `.` and `-` kept, the rest `-`.
fn file_stem(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}
