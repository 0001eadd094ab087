use super::human_bytes;
use crate::pack::storage::LayerStorage;
use crate::pack::storage::{ModelStorage, Quantization};
use crate::loader::{ModelConfig, WeightStore};
use crate::pack::gguf::resolve_model_or_gguf;
use crate::pack::gguf::source::is_gguf_path;
use crate::model::spec::lm_head;
use crate::pack::{check_gptq_shapes, CodebookConfig, MixedConfig, MIXED_METHOD};
use crate::quant::pipeline::target_linears;
use anyhow::Result;
use std::fmt::Write as _;
use std::io::Write as _;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (float or packed), Hugging Face repo id, or `.gguf` file (shown as
    /// written: metadata and each tensor's GGML type, without decoding).
    pub path: String,
    /// Hub revision when PATH is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Hide the per-tensor table.
    #[arg(long)]
    pub summary: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut out = String::new();
    report(&a, &mut out)?;
    // a closed pipe (`| head`) is not an error worth a panic
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    Ok(())
}

fn report(a: &Args, out: &mut String) -> Result<()> {
    let path = std::path::Path::new(&a.path);
    if is_gguf_path(path) {
        if a.revision.is_some() {
            crate::error::fail!(
                InvalidOption,
                "--revision only applies to Hugging Face repo ids, but `{}` is a GGUF file",
                a.path
            );
        }
        return super::inspect_gguf::report(path, a.summary, out);
    }
    let files = resolve_model_or_gguf(&a.path, a.revision.as_deref())?;
    let c = ModelConfig::from_file(&files.config)?;
    let store = WeightStore::open(&files.weights)?;
    let storage = ModelStorage::read(&c, &store)?;
    writeln!(
        out,
        "model          {}{}",
        files.source,
        files
            .revision
            .as_ref()
            .map(|r| format!(" @ {r}"))
            .unwrap_or_default()
    )?;
    writeln!(out, "architecture   {}", c.architecture.hf_name())?;
    writeln!(out,
        "shape          {} layers, hidden {}, intermediate {}, heads {} (kv {}), head_dim {}, vocab {}",
        c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size
    )?;
    writeln!(
        out,
        "parameters     {} ({} tied embeddings)",
        c.parameter_count(),
        if c.tie_word_embeddings {
            "with"
        } else {
            "without"
        }
    )?;
    let total_bytes: u64 = files
        .weights
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    writeln!(
        out,
        "weights        {} in {} file(s)",
        human_bytes(total_bytes),
        files.weights.len()
    )?;
    match &storage.quantization {
        Quantization::Float => writeln!(out, "quantization   none (float model)")?,
        Quantization::Mixed(q) => {
            mixed_summary(q, &storage, out)?;
            if q.is_codebook() {
                mixed_codebook_tables(&store, &storage, out)?;
            }
        }
        Quantization::Codebook(q) => codebook_summary(q, &store, &storage, out)?,
        Quantization::Gptq(q) => {
            // a config that contradicts the tensors is not shown as if it were true
            let mut specs = target_linears(&c, false);
            specs.push(lm_head(&c));
            for s in specs
                .iter()
                .filter(|s| store.contains(&format!("{}.qweight", s.name)))
            {
                check_gptq_shapes(&store, s, q)?;
            }
            writeln!(
                out,
                "quantization   gptq {}-bit, group {}, {}, desc_act {}, zeros {}",
                q.bits,
                q.group_size.as_i64(),
                if q.sym { "sym" } else { "asym" },
                q.desc_act,
                q.zeros.name()
            )?;
            let (weights, bytes) = (storage.weights(), storage.stored_bytes());
            writeln!(out,
                "packed         {} linears, {weights} weights, {} ({:.3} bits / {:.4} bytes per weight incl. scales, zeros, g_idx)",
                storage.layers.len(),
                human_bytes(bytes as u64),
                storage.stored_bits_per_weight(),
                bytes as f64 / weights.max(1) as f64
            )?;
        }
    }
    if !a.summary {
        let mut names: Vec<&str> = store.names().collect();
        names.sort_unstable_by_key(|x| natural_key(x));
        writeln!(out, "\n{:<56} {:>6}  shape", "tensor", "dtype")?;
        for n in names {
            let i = store.info(n)?;
            writeln!(out, "{n:<56} {:>6}  {:?}", i.dtype.name(), i.shape)?;
        }
    }
    Ok(())
}

/// Sort `layers.10` after `layers.9`.
fn natural_key(s: &str) -> Vec<(u64, String)> {
    s.split('.')
        .map(|p| {
            p.parse::<u64>()
                .map(|n| (n, String::new()))
                .unwrap_or((u64::MAX, p.to_string()))
        })
        .collect()
}

/// Mixed-width (BAQ) models: per-layer width histograms and the realized budget.
fn mixed_summary(q: &MixedConfig, storage: &ModelStorage, out: &mut String) -> Result<()> {
    writeln!(
        out,
        "quantization   {MIXED_METHOD}: target {} bits average, widths {:?}, {}",
        q.bits,
        q.allowed_bits,
        match (&q.levels, q.sym) {
            (Some(levels), _) if q.is_codebook() => format!("power codebooks, {levels} levels"),
            (_, true) => "sym".to_string(),
            _ => "asym".to_string(),
        }
    )?;
    writeln!(out, "allocation     per {}", q.allocate)?;
    writeln!(
        out,
        "packed         {} weights: {:.3} code bits, {:.3} stored bits per weight (incl. scales, {}, permutation)",
        storage.weights(),
        storage.code_bits_per_weight(),
        storage.stored_bits_per_weight(),
        if q.is_codebook() { "tables" } else { "zeros" }
    )?;
    let kinds: Vec<String> = storage
        .by_kind()
        .iter()
        .map(|(k, bits)| format!("{k} {bits:.2}"))
        .collect();
    writeln!(out, "code bits by projection: {}", kinds.join(", "))?;
    let blocks: Vec<String> = storage
        .by_block()
        .iter()
        .map(|(i, bits)| format!("{i}:{bits:.2}"))
        .collect();
    writeln!(out, "code bits by block: {}", blocks.join(" "))?;
    writeln!(out, "widths per layer (mean, histogram of column widths):")?;
    for l in &storage.layers {
        let hist = l.width_histogram.unwrap_or_default();
        let columns = hist.iter().sum::<usize>().max(1);
        let mean =
            hist.iter().enumerate().map(|(b, n)| b * n).sum::<usize>() as f64 / columns as f64;
        let h: Vec<String> = hist
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(b, n)| format!("{b}b:{n}"))
            .collect();
        writeln!(out, "  {:<40} {mean:>5.2} bits  {}", l.name, h.join(" "))?;
    }
    Ok(())
}

/// BAQ on power codebooks: each layer's exponent per width.
fn mixed_codebook_tables(store: &WeightStore, storage: &ModelStorage, out: &mut String) -> Result<()> {
    writeln!(out, "power-codebook exponents per layer (width: exponent):")?;
    for l in &storage.layers {
        let mut per_width = vec![];
        for b in 2..=8u8 {
            let name = format!("{}.w{b}.exponent", l.name);
            if store.contains(&name) {
                per_width.push(format!("{b}b: {:.4}", store.f32_vec(&name, &[1])?[0]));
            }
        }
        writeln!(out, "  {:<40} {}", l.name, per_width.join("  "))?;
    }
    Ok(())
}

/// Codebook (NUPES) models: each layer's exponent and table.
fn codebook_summary(
    q: &CodebookConfig,
    store: &WeightStore,
    storage: &ModelStorage,
    out: &mut String,
) -> Result<()> {
    writeln!(
        out,
        "quantization   {} {}-bit, group {}, {} codebook, {} levels",
        q.quant_method, q.bits, q.group_size, q.codebook, q.levels
    )?;
    writeln!(
        out,
        "packed         {} linears, {} weights, {:.3} bits per weight (incl. scales, g_idx, tables)",
        storage.layers.len(),
        storage.weights(),
        storage.stored_bits_per_weight()
    )?;
    writeln!(out, "exponent and table per layer:")?;
    for LayerStorage { name, .. } in &storage.layers {
        let table = store.f32_vec(&format!("{name}.codebook"), &[1usize << q.bits])?;
        let exponent = store.f32_vec(&format!("{name}.exponent"), &[1])?[0];
        let table: Vec<String> = table.iter().map(|t| format!("{t:.4}")).collect();
        writeln!(out, "  {name:<40} a {exponent:.4}  [{}]", table.join(" "))?;
    }
    Ok(())
}
