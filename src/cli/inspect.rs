use super::human_bytes;
use crate::loader::{resolve_model, ModelConfig, WeightStore};
use crate::model::spec::lm_head;
use crate::pack::{check_gptq_shapes, GptqConfig, MIXED_METHOD};
use crate::quant::pipeline::target_linears;
use anyhow::Result;
use std::fmt::Write as _;
use std::io::Write as _;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (float or packed) or Hugging Face repo id.
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
    let files = resolve_model(&a.path, a.revision.as_deref())?;
    let c = ModelConfig::from_file(&files.config)?;
    let store = WeightStore::open(&files.weights)?;
    let mixed = c
        .raw
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        == Some(MIXED_METHOD);
    let qcfg = if mixed {
        None
    } else {
        GptqConfig::from_model_config(&c.raw)?
    };
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
    match &qcfg {
        None if mixed => mixed_summary(&c, &store, out)?,
        None => writeln!(out, "quantization   none (float model)")?,
        Some(q) => {
            let mut specs = target_linears(&c, false);
            if store.contains("lm_head.qweight") {
                specs.push(lm_head(&c));
            }
            let (mut weights, mut bytes, mut layers) = (0usize, 0usize, 0usize);
            for s in specs
                .iter()
                .filter(|s| store.contains(&format!("{}.qweight", s.name)))
            {
                // a config that contradicts the tensors is not shown as if it were true
                check_gptq_shapes(&store, s, q)?;
                layers += 1;
                weights += s.out_features * s.in_features;
                for leaf in ["qweight", "qzeros", "scales", "g_idx"] {
                    bytes += store.info(&format!("{}.{leaf}", s.name))?.byte_len();
                }
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
            writeln!(out,
                "packed         {layers} linears, {weights} weights, {} ({:.3} bits / {:.4} bytes per weight incl. scales, zeros, g_idx)",
                human_bytes(bytes as u64),
                8.0 * bytes as f64 / weights.max(1) as f64,
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
fn mixed_summary(
    c: &crate::loader::ModelConfig,
    store: &crate::loader::WeightStore,
    out: &mut String,
) -> Result<()> {
    let q = &c.raw["quantization_config"];
    writeln!(
        out,
        "quantization   {MIXED_METHOD}: target {} bits average, widths {}, {}",
        q["bits"],
        q["allowed_bits"],
        if q["sym"].as_bool() == Some(true) {
            "sym"
        } else {
            "asym"
        }
    )?;
    if let Some(mode) = q["allocate"].as_str() {
        writeln!(out, "allocation     per {mode}")?;
    }
    let (mut weights, mut code_bits, mut bytes) = (0usize, 0usize, 0usize);
    let mut lines = String::new();
    // code bits and weights by projection kind and by block, for "which layers got bits"
    let mut by_kind: Vec<(String, usize, usize)> = vec![];
    let mut by_block: Vec<(usize, usize)> = vec![(0, 0); c.num_hidden_layers];
    for s in target_linears(c, false) {
        let name = format!("{}.col_widths", s.name);
        if !store.contains(&name) {
            continue;
        }
        let (_, widths) = store.raw(&name)?;
        let mut hist = [0usize; 9];
        widths.iter().for_each(|&b| hist[(b as usize).min(8)] += 1);
        let mean =
            widths.iter().map(|&b| b as usize).sum::<usize>() as f64 / widths.len().max(1) as f64;
        let (w, cb) = (
            s.out_features * s.in_features,
            s.out_features * widths.iter().map(|&b| b as usize).sum::<usize>(),
        );
        weights += w;
        code_bits += cb;
        let kind = s.name.rsplit('.').next().unwrap_or("").to_string();
        match by_kind.iter_mut().find(|e| e.0 == kind) {
            Some(e) => {
                e.1 += cb;
                e.2 += w;
            }
            None => by_kind.push((kind, cb, w)),
        }
        if let Some(block) = s
            .name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|b| b.parse::<usize>().ok())
            .filter(|&b| b < by_block.len())
        {
            by_block[block].0 += cb;
            by_block[block].1 += w;
        }
        let prefix = format!("{}.", s.name);
        bytes += store
            .names()
            .filter(|n| n.starts_with(&prefix))
            .map(|n| store.info(n).map(|i| i.byte_len()).unwrap_or(0))
            .sum::<usize>();
        let h: Vec<String> = hist
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(b, n)| format!("{b}b:{n}"))
            .collect();
        writeln!(lines, "  {:<40} {mean:>5.2} bits  {}", s.name, h.join(" "))?;
    }
    writeln!(
        out,
        "packed         {weights} weights: {:.3} code bits, {:.3} stored bits per weight (incl. scales, zeros, permutation)",
        code_bits as f64 / weights.max(1) as f64,
        8.0 * bytes as f64 / weights.max(1) as f64
    )?;
    let kinds: Vec<String> = by_kind
        .iter()
        .map(|(k, cb, w)| format!("{k} {:.2}", *cb as f64 / (*w).max(1) as f64))
        .collect();
    writeln!(out, "code bits by projection: {}", kinds.join(", "))?;
    let blocks: Vec<String> = by_block
        .iter()
        .enumerate()
        .filter(|(_, (_, w))| *w > 0)
        .map(|(i, (cb, w))| format!("{i}:{:.2}", *cb as f64 / *w as f64))
        .collect();
    writeln!(out, "code bits by block: {}", blocks.join(" "))?;
    writeln!(out, "widths per layer (mean, histogram of column widths):")?;
    out.push_str(&lines);
    Ok(())
}
