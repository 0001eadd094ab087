//! The comparison report of `bitsmith compare`: one row per model against the base, as a
//! markdown table and as JSON.

use super::kl::KlResult;
use super::plot::ParetoPoint;
use std::fmt::Write as _;

/// One compared model.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModelRow {
    /// Short name (method and widths).
    pub label: String,
    /// The model as the user named it.
    pub model: String,
    pub stored_bits_per_weight: f64,
    pub code_bits_per_weight: f64,
    #[serde(flatten)]
    pub result: KlResult,
}

/// The base the models were compared with.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BaseRow {
    pub label: String,
    pub model: String,
    /// `None` when the base came from a logits file (its weights are not at hand).
    pub stored_bits_per_weight: Option<f64>,
    pub ppl: f64,
    pub ppl_se: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    pub corpus: String,
    pub seqlen: usize,
    pub windows: usize,
    pub predicted_tokens: usize,
    pub base: BaseRow,
    pub models: Vec<ModelRow>,
    /// Top-k of the base when it came from a logits file (KL is then a close lower bound).
    pub base_top_k: Option<usize>,
}

/// `value ± se` (one standard error across windows), or the value alone without one.
pub fn pm(v: f64, se: Option<f64>, digits: usize) -> String {
    match se {
        Some(se) => format!("{v:.digits$} ± {se:.digits$}"),
        None => format!("{v:.digits$}"),
    }
}

impl Comparison {
    /// A markdown table, every figure with its standard error across windows where it has
    /// one.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} windows × {} tokens of {} ({} predicted tokens); ± is one standard error across windows.\n",
            self.windows, self.seqlen, self.corpus, self.predicted_tokens
        );
        s.push_str(
            "| model | stored bits/weight | PPL | Δ ln PPL vs base | mean KL | median KL | p99 KL | top-1 agreement | RMS Δp |\n",
        );
        s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let b = &self.base;
        let _ = writeln!(
            s,
            "| {} (base) | {} | {} | 0 | 0 | 0 | 0 | 100 % | 0 |",
            b.label,
            b.stored_bits_per_weight
                .map_or("–".to_string(), |x| format!("{x:.3}")),
            pm(b.ppl, b.ppl_se, 3),
        );
        for m in &self.models {
            let r = &m.result;
            let kl = &r.kl_divergence;
            let _ = writeln!(
                s,
                "| {} | {:.3} | {} | {} | {} | {:.4} | {:.3} | {} % | {:.4} |",
                m.label,
                m.stored_bits_per_weight,
                pm(r.ppl, r.ppl_se, 3),
                pm(r.delta_nll, r.delta_nll_se, 4),
                pm(kl.mean, kl.mean_se, 4),
                kl.median,
                kl.p99,
                pm(
                    100.0 * r.top1_agreement,
                    r.top1_agreement_se.map(|x| 100.0 * x),
                    2
                ),
                r.rms_delta_p,
            );
        }
        if let Some(k) = self.base_top_k {
            let tail = self
                .models
                .iter()
                .filter_map(|m| m.result.base_tail_mass.as_ref())
                .map(|t| t.mean)
                .next()
                .unwrap_or(0.0);
            let _ = writeln!(
                s,
                "\nThe base came from saved top-{k} logits: its other tokens are one bucket \
                 (mean base mass {tail:.2e}), which makes each KL a lower bound, short by at \
                 most that mass times the divergence inside the bucket."
            );
        }
        s
    }

    /// The points of the Pareto chart: the base (when its size is known) and every model.
    pub fn pareto_points(&self) -> Vec<ParetoPoint> {
        let b = &self.base;
        let base = b.stored_bits_per_weight.map(|bits| ParetoPoint {
            label: format!("{} (base)", b.label),
            bits,
            ppl: b.ppl,
            ppl_se: b.ppl_se,
            kl: 0.0,
            kl_se: None,
        });
        base.into_iter()
            .chain(self.models.iter().map(|m| ParetoPoint {
                label: m.label.clone(),
                bits: m.stored_bits_per_weight,
                ppl: m.result.ppl,
                ppl_se: m.result.ppl_se,
                kl: m.result.kl_divergence.mean,
                kl_se: m.result.kl_divergence.mean_se,
            }))
            .collect()
    }
}
