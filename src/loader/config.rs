//! `config.json` of a Llama-family decoder.

use crate::error::{ErrorKind, ResultExt};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The decoder families this crate runs. They share one block structure and differ in
/// biases and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED: &'static [&'static str] =
        &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

pub use super::rope_config::RopeScaling;
use super::rope_config::RopeConfig;

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias` also covers it).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Mistral's sliding attention window, if narrower than the context.
    pub sliding_window: Option<usize>,
    /// The MLP's activation is rotated by a fixed Hadamard matrix before `down_proj`
    /// (OSTQuant's `R4`, whose other half is folded into `down_proj`): config.json's
    /// `bitsmith_online_hadamard: ["mlp.down_proj"]`. A model that needs it computes
    /// nonsense without it, so an unknown entry there is an error, not a skip.
    pub online_hadamard_down: bool,
    /// The raw JSON, kept so a packed output can reproduce it with additions.
    pub raw: Value,
}

/// The config.json key that lists the linears whose input is rotated online.
pub const ONLINE_HADAMARD_KEY: &str = "bitsmith_online_hadamard";

impl ModelConfig {
    /// Reads and checks a config.json; an unreadable, malformed or unsupported one is
    /// [`ErrorKind::InvalidModel`].
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let read = || -> Result<Self> {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let raw: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", path.display()))?;
            Self::from_json(raw).with_context(|| format!("in {}", path.display()))
        };
        Ok(read().kind(ErrorKind::InvalidModel)?)
    }

    /// Checks a parsed config.json; what bitsmith cannot run is
    /// [`ErrorKind::InvalidModel`].
    pub fn from_json(raw: Value) -> Result<Self> {
        Self::parse(raw).kind(ErrorKind::InvalidModel)
    }

    fn parse(raw: Value) -> Result<Self> {
        let arch_name = raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .ok_or_else(|| anyhow!("config.json has no `architectures` list"))?;
        let architecture = Architecture::from_hf(arch_name).ok_or_else(|| {
            anyhow!(
                "unsupported architecture `{arch_name}`; supported: {}",
                Architecture::SUPPORTED.join(", ")
            )
        })?;
        let get = |key: &str| raw.get(key).filter(|v| !v.is_null());
        let req_usize = |key: &str| -> Result<usize> {
            get(key)
                .ok_or_else(|| anyhow!("config.json is missing the key `{key}`"))?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| anyhow!("config.json key `{key}` must be a non-negative integer"))
        };
        let opt_usize = |key: &str| -> Result<Option<usize>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| {
                    anyhow!("config.json key `{key}` must be a non-negative integer")
                }),
            }
        };
        let opt_f64 = |key: &str| -> Result<Option<f64>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| anyhow!("config.json key `{key}` must be a number")),
            }
        };
        let opt_bool = |key: &str| -> Result<Option<bool>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| anyhow!("config.json key `{key}` must be true or false")),
            }
        };

        let hidden_size = req_usize("hidden_size")?;
        let num_attention_heads = req_usize("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size == 0 {
            bail!("config.json: hidden_size and num_attention_heads must be positive");
        }
        let num_key_value_heads = opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "config.json: num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            );
        }
        let head_dim = opt_usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim % 2 != 0 {
            bail!("config.json: head_dim {head_dim} must be even for rotary embeddings");
        }
        if let Some(act) = get("hidden_act").and_then(|v| v.as_str()) {
            if act != "silu" {
                bail!("config.json: hidden_act `{act}` is not supported (only `silu`)");
            }
        }
        let attention_bias = opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => opt_usize("sliding_window")?,
            Architecture::Qwen2 if opt_bool("use_sliding_window")?.unwrap_or(false) => {
                bail!("config.json: Qwen2 `use_sliding_window: true` is not supported")
            }
            _ => None,
        };
        // values no model trains with, that turn every activation into NaN
        let rms_norm_eps = opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            bail!("config.json: rms_norm_eps {rms_norm_eps} must be a finite number ≥ 0");
        }
        let max_position_embeddings = opt_usize("max_position_embeddings")?.unwrap_or(2048);
        let rope = RopeConfig::parse(&raw, max_position_embeddings)?;
        let default_tie = matches!(architecture, Architecture::Qwen2);
        let online_hadamard_down = match get(ONLINE_HADAMARD_KEY) {
            None => false,
            Some(v) => {
                let list = v.as_array().ok_or_else(|| {
                    anyhow!(
                        "config.json key `{ONLINE_HADAMARD_KEY}` must be a list of module names"
                    )
                })?;
                for m in list {
                    if m.as_str() != Some("mlp.down_proj") {
                        bail!(
                            "config.json: `{ONLINE_HADAMARD_KEY}` names {m}; this build runs the \
                             online Hadamard only before `mlp.down_proj`"
                        );
                    }
                }
                !list.is_empty()
            }
        };
        Ok(Self {
            architecture,
            hidden_size,
            intermediate_size: req_usize("intermediate_size")?,
            num_hidden_layers: req_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: req_usize("vocab_size")?,
            rms_norm_eps,
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            max_position_embeddings,
            tie_word_embeddings: opt_bool("tie_word_embeddings")?.unwrap_or(default_tie),
            qkv_bias,
            o_bias,
            mlp_bias: opt_bool("mlp_bias")?.unwrap_or(false),
            sliding_window,
            online_hadamard_down,
            raw,
        })
    }

    /// Parameters of the decoder (embeddings, blocks, norm, untied head).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let bias = |on: bool, n: usize| if on { n } else { 0 };
        let block = h * q
            + 2 * h * kv
            + q * h
            + bias(self.qkv_bias, q + 2 * kv)
            + bias(self.o_bias, h)
            + 3 * h * i
            + bias(self.mlp_bias, 2 * i + h)
            + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * block + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 100})
    }

    #[test]
    fn unknown_architecture_names_the_supported_ones() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = ModelConfig::from_json(v).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn missing_key_is_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("intermediate_size");
        let e = ModelConfig::from_json(v).unwrap_err().to_string();
        assert!(e.contains("intermediate_size"), "{e}");
    }

    #[test]
    fn values_that_make_every_activation_nan_are_refused() {
        for (key, bad) in [
            ("rope_theta", json!(0)),
            ("rope_theta", json!(-1e4)),
            ("rms_norm_eps", json!(-1e-6)),
        ] {
            let mut v = base();
            v[key] = bad.clone();
            let e = ModelConfig::from_json(v).unwrap_err().to_string();
            assert!(e.contains(key), "{key} {bad}: {e}");
        }
        let mut v = base();
        v["rms_norm_eps"] = json!(0);
        assert!(ModelConfig::from_json(v).is_ok());
    }

    #[test]
    fn defaults_and_params() {
        let c = ModelConfig::from_json(base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert!(!c.tie_word_embeddings);
        // embed 6400 + 2 blocks * (64*64*2 + 64*32*2 + 3*64*128 + 128) + 64 + head 6400
        assert_eq!(
            c.parameter_count(),
            6400 + 2 * (8192 + 4096 + 24576 + 128) + 64 + 6400
        );
    }
}
