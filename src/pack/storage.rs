//! What a model stores for its linear layers: bytes and bits per weight, per layer and in
//! total, for float, GPTQ-layout and mixed-width (BAQ) models. `bitsmith inspect` prints it;
//! `bitsmith compare` plots quality against it.

use crate::loader::{ModelConfig, WeightStore};
use crate::pack::gguf::resolve_model_or_gguf;
use crate::model::spec::lm_head;
use super::{CodebookConfig, GptqConfig, MixedConfig, CODEBOOK_METHOD, MIXED_METHOD};
use crate::quant::pipeline::target_linears;
use anyhow::Result;

/// How a model's linears are stored.
#[derive(Debug, Clone)]
pub enum Quantization {
    Float,
    Gptq(GptqConfig),
    /// Mixed column widths; the model's `quantization_config` as written.
    Mixed(MixedConfig),
    /// A codebook per layer (NUPES).
    Codebook(CodebookConfig),
}

/// One linear layer's storage.
#[derive(Debug, Clone)]
pub struct LayerStorage {
    /// Full module name, e.g. `model.layers.3.mlp.down_proj`.
    pub name: String,
    pub weights: usize,
    /// Every byte stored for the layer (codes, scales, zeros, indices; the weight itself
    /// for a float layer).
    pub stored_bytes: usize,
    /// Bits of the codes alone (float: the weight's own bits).
    pub code_bits: usize,
    /// Mixed widths: how many input columns have each width 0..=8.
    pub width_histogram: Option<[usize; 9]>,
}

impl LayerStorage {
    /// The decoder block, for `model.layers.N.*`.
    pub fn block(&self) -> Option<usize> {
        self.name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|b| b.parse().ok())
    }

    /// The projection, e.g. `q_proj`.
    pub fn kind(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or("")
    }

    pub fn code_bits_per_weight(&self) -> f64 {
        self.code_bits as f64 / self.weights.max(1) as f64
    }
}

/// A model's linear layers as stored.
#[derive(Debug, Clone)]
pub struct ModelStorage {
    pub quantization: Quantization,
    pub layers: Vec<LayerStorage>,
}

impl ModelStorage {
    /// Resolve `model` (folder or repo id) and read its storage.
    pub fn open(model: &str, revision: Option<&str>) -> Result<Self> {
        let files = resolve_model_or_gguf(model, revision)?;
        let c = ModelConfig::from_file(&files.config)?;
        Self::read(&c, &WeightStore::open(&files.weights)?)
    }

    pub fn read(c: &ModelConfig, store: &WeightStore) -> Result<Self> {
        let q = c.raw.get("quantization_config").filter(|v| !v.is_null());
        match q
            .and_then(|q| q.get("quant_method"))
            .and_then(|m| m.as_str())
        {
            Some(MIXED_METHOD) => return Self::mixed(c, store),
            Some(CODEBOOK_METHOD) => return Self::codebook(c, store),
            _ => {}
        }
        let Some(gptq) = GptqConfig::from_model_config(&c.raw)? else {
            return Self::float(c, store);
        };
        let mut specs = target_linears(c, false);
        if store.contains("lm_head.qweight") {
            specs.push(lm_head(c));
        }
        let mut layers = vec![];
        for s in specs
            .iter()
            .filter(|s| store.contains(&format!("{}.qweight", s.name)))
        {
            let mut bytes = 0;
            for leaf in ["qweight", "qzeros", "scales", "g_idx"] {
                bytes += store.info(&format!("{}.{leaf}", s.name))?.byte_len();
            }
            let weights = s.out_features * s.in_features;
            layers.push(LayerStorage {
                name: s.name.clone(),
                weights,
                stored_bytes: bytes,
                code_bits: weights * gptq.bits as usize,
                width_histogram: None,
            });
        }
        Ok(Self {
            quantization: Quantization::Gptq(gptq),
            layers,
        })
    }

    fn float(c: &ModelConfig, store: &WeightStore) -> Result<Self> {
        let mut layers = vec![];
        for s in target_linears(c, false) {
            let name = format!("{}.weight", s.name);
            if !store.contains(&name) {
                continue;
            }
            let bytes = store.info(&name)?.byte_len();
            layers.push(LayerStorage {
                name: s.name.clone(),
                weights: s.out_features * s.in_features,
                stored_bytes: bytes,
                code_bits: 8 * bytes,
                width_histogram: None,
            });
        }
        Ok(Self {
            quantization: Quantization::Float,
            layers,
        })
    }

    fn mixed(c: &ModelConfig, store: &WeightStore) -> Result<Self> {
        let mut layers = vec![];
        for s in target_linears(c, false) {
            let name = format!("{}.col_widths", s.name);
            if !store.contains(&name) {
                continue;
            }
            let (_, widths) = store.raw(&name)?;
            let mut hist = [0usize; 9];
            widths.iter().for_each(|&b| hist[(b as usize).min(8)] += 1);
            let prefix = format!("{}.", s.name);
            let bytes = store
                .names()
                .filter(|n| n.starts_with(&prefix))
                .map(|n| store.info(n).map(|i| i.byte_len()).unwrap_or(0))
                .sum::<usize>();
            layers.push(LayerStorage {
                name: s.name.clone(),
                weights: s.out_features * s.in_features,
                stored_bytes: bytes,
                code_bits: s.out_features * widths.iter().map(|&b| b as usize).sum::<usize>(),
                width_histogram: Some(hist),
            });
        }
        Ok(Self {
            quantization: Quantization::Mixed(MixedConfig::from_model_config(&c.raw)?),
            layers,
        })
    }

    fn codebook(c: &ModelConfig, store: &WeightStore) -> Result<Self> {
        let cfg = CodebookConfig::from_model_config(&c.raw)?;
        let mut layers = vec![];
        for s in target_linears(c, false) {
            if !store.contains(&format!("{}.codebook", s.name)) {
                continue;
            }
            let mut bytes = 0;
            for leaf in ["qweight", "scales", "g_idx", "codebook", "exponent"] {
                bytes += store.info(&format!("{}.{leaf}", s.name))?.byte_len();
            }
            let weights = s.out_features * s.in_features;
            layers.push(LayerStorage {
                name: s.name.clone(),
                weights,
                stored_bytes: bytes,
                code_bits: weights * cfg.bits as usize,
                width_histogram: None,
            });
        }
        Ok(Self {
            quantization: Quantization::Codebook(cfg),
            layers,
        })
    }

    pub fn weights(&self) -> usize {
        self.layers.iter().map(|l| l.weights).sum()
    }

    pub fn stored_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.stored_bytes).sum()
    }

    /// Stored bits per weight of the linears, everything included.
    pub fn stored_bits_per_weight(&self) -> f64 {
        8.0 * self.stored_bytes() as f64 / self.weights().max(1) as f64
    }

    pub fn code_bits_per_weight(&self) -> f64 {
        self.layers.iter().map(|l| l.code_bits).sum::<usize>() as f64 / self.weights().max(1) as f64
    }

    pub fn is_mixed(&self) -> bool {
        matches!(self.quantization, Quantization::Mixed(_))
    }

    /// Code bits per weight of each projection kind, in the order they first appear.
    pub fn by_kind(&self) -> Vec<(String, f64)> {
        let mut sums: Vec<(String, usize, usize)> = vec![];
        for l in &self.layers {
            match sums.iter_mut().find(|e| e.0 == l.kind()) {
                Some(e) => {
                    e.1 += l.code_bits;
                    e.2 += l.weights;
                }
                None => sums.push((l.kind().to_string(), l.code_bits, l.weights)),
            }
        }
        sums.into_iter()
            .map(|(k, cb, w)| (k, cb as f64 / w.max(1) as f64))
            .collect()
    }

    /// Code bits per weight of each decoder block that has stored layers.
    pub fn by_block(&self) -> Vec<(usize, f64)> {
        let mut sums: std::collections::BTreeMap<usize, (usize, usize)> = Default::default();
        for l in &self.layers {
            if let Some(b) = l.block() {
                let e = sums.entry(b).or_default();
                e.0 += l.code_bits;
                e.1 += l.weights;
            }
        }
        sums.into_iter()
            .map(|(b, (cb, w))| (b, cb as f64 / w.max(1) as f64))
            .collect()
    }

    /// A short name for tables and plots: `gptq w4g128`, `baq 3.206b`, `float bf16`.
    pub fn label(&self) -> String {
        match &self.quantization {
            Quantization::Float => format!("float {:.0}-bit", self.stored_bits_per_weight()),
            Quantization::Gptq(q) => {
                let method = q.meta["method"].as_str().unwrap_or("gptq");
                match q.group_size.as_i64() {
                    g if g > 0 => format!("{method} w{}g{g}", q.bits),
                    _ => format!("{method} w{}", q.bits),
                }
            }
            Quantization::Codebook(q) => {
                let method = q.meta["method"].as_str().unwrap_or("codebook");
                match q.group_size {
                    g if g > 0 => format!("{method} w{}g{g}", q.bits),
                    _ => format!("{method} w{}", q.bits),
                }
            }
            Quantization::Mixed(q) => {
                format!("{} {}b", q.method(), q.bits)
            }
        }
    }
}
