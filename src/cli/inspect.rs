use super::human_bytes;
use crate::loader::{resolve_model, ModelConfig, WeightStore};
use crate::model::spec::lm_head;
use crate::pack::GptqConfig;
use crate::quant::pipeline::target_linears;
use anyhow::Result;

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
    let files = resolve_model(&a.path, a.revision.as_deref())?;
    let c = ModelConfig::from_file(&files.config)?;
    let store = WeightStore::open(&files.weights)?;
    let qcfg = GptqConfig::from_model_config(&c.raw)?;
    println!(
        "model          {}{}",
        files.source,
        files
            .revision
            .as_ref()
            .map(|r| format!(" @ {r}"))
            .unwrap_or_default()
    );
    println!("architecture   {}", c.architecture.hf_name());
    println!(
        "shape          {} layers, hidden {}, intermediate {}, heads {} (kv {}), head_dim {}, vocab {}",
        c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size
    );
    println!(
        "parameters     {} ({} tied embeddings)",
        c.parameter_count(),
        if c.tie_word_embeddings {
            "with"
        } else {
            "without"
        }
    );
    let total_bytes: u64 = files
        .weights
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "weights        {} in {} file(s)",
        human_bytes(total_bytes),
        files.weights.len()
    );
    match &qcfg {
        None => println!("quantization   none (float model)"),
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
                layers += 1;
                weights += s.out_features * s.in_features;
                for leaf in ["qweight", "qzeros", "scales", "g_idx"] {
                    bytes += store.info(&format!("{}.{leaf}", s.name))?.byte_len();
                }
            }
            println!(
                "quantization   gptq {}-bit, group {}, {}, desc_act {}, zeros {}",
                q.bits,
                q.group_size.as_i64(),
                if q.sym { "sym" } else { "asym" },
                q.desc_act,
                q.zeros.name()
            );
            println!(
                "packed         {layers} linears, {weights} weights, {} ({:.3} bits / {:.4} bytes per weight incl. scales, zeros, g_idx)",
                human_bytes(bytes as u64),
                8.0 * bytes as f64 / weights.max(1) as f64,
                bytes as f64 / weights.max(1) as f64
            );
        }
    }
    if !a.summary {
        let mut names: Vec<&str> = store.names().collect();
        names.sort_unstable_by(|x, y| natural_key(x).cmp(&natural_key(y)));
        println!("\n{:<56} {:>6}  shape", "tensor", "dtype");
        for n in names {
            let i = store.info(n)?;
            println!("{n:<56} {:>6}  {:?}", i.dtype.name(), i.shape);
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
