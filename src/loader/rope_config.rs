//! The rotary-embedding settings of `config.json`, in both of the forms Hugging Face writes.
//!
//! transformers < 5 writes `rope_theta` at the top level and the scaling, if any, as
//! `rope_scaling`. transformers ≥ 5 writes one `rope_parameters` object holding
//! `rope_type`, `rope_theta` and the scaling fields, and no top-level `rope_theta` — so a
//! reader that only knows the old form silently falls back to θ = 10 000 for every model
//! saved by a current transformers (SmolLM2 trains with 100 000: perplexity +30 %).
//! Priorities follow transformers' own `convert_rope_params_to_dict`: a legacy
//! `rope_scaling` replaces `rope_parameters`; inside the chosen object its `rope_theta`
//! wins over the top-level one.

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

/// θ when a config names none (transformers' `default_theta`).
const DEFAULT_THETA: f64 = 10_000.0;

/// Llama 3 style frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Base and scaling of the rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

impl RopeConfig {
    /// Reads the rotary settings of a parsed `config.json`; `max_position_embeddings` is
    /// the fallback of a llama3 scaling that names no original context length.
    pub fn parse(raw: &Value, max_position_embeddings: usize) -> Result<Self> {
        let get = |key: &str| raw.get(key).filter(|v| !v.is_null());
        let (key, params) = match (get("rope_scaling"), get("rope_parameters")) {
            (Some(v), _) => ("rope_scaling", Some(v)),
            (None, Some(v)) => ("rope_parameters", Some(v)),
            (None, None) => ("rope_parameters", None),
        };
        let params = match params {
            None => None,
            Some(v) => Some(
                single_params(v)
                    .ok_or_else(|| anyhow!("config.json `{key}` must be an object, found {v}"))?
                    .map_err(|e| anyhow!("config.json `{key}`: {e}"))?,
            ),
        };
        let theta_value = params
            .and_then(|p| p.get("rope_theta").filter(|v| !v.is_null()))
            .map(|v| (format!("{key}.rope_theta"), v))
            .or_else(|| get("rope_theta").map(|v| ("rope_theta".to_string(), v)));
        let theta = match theta_value {
            None => DEFAULT_THETA,
            Some((name, v)) => {
                let t = v
                    .as_f64()
                    .ok_or_else(|| anyhow!("config.json `{name}` must be a number, found {v}"))?;
                if !(t.is_finite() && t > 0.0) {
                    bail!("config.json: {name} {t} must be a finite number > 0");
                }
                t
            }
        };
        let scaling = match params {
            None => None,
            Some(p) => scaling(p, key, raw, max_position_embeddings)?,
        };
        Ok(Self { theta, scaling })
    }
}

/// The one parameter object of a config: the object itself, or — when transformers nests
/// it by layer type (`{"full_attention": {…}, "sliding_attention": {…}}`) — the nested
/// objects if they all agree. `None` when `v` is not an object.
fn single_params(v: &Value) -> Option<Result<&Map<String, Value>>> {
    let obj = v.as_object()?;
    let nested: Vec<&Map<String, Value>> = obj.values().filter_map(|x| x.as_object()).collect();
    if nested.is_empty() {
        return Some(Ok(obj));
    }
    if nested.len() != obj.len() || nested.windows(2).any(|w| w[0] != w[1]) {
        return Some(Err(anyhow!(
            "a different RoPE per layer type ({}) is not supported",
            obj.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Some(Ok(nested[0]))
}

fn scaling(
    p: &Map<String, Value>,
    key: &str,
    raw: &Value,
    max_position_embeddings: usize,
) -> Result<Option<RopeScaling>> {
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let f = |k: &str| {
                p.get(k)
                    .and_then(|x| x.as_f64())
                    .ok_or_else(|| anyhow!("config.json {key} (llama3) is missing `{k}`"))
            };
            // transformers ≥ 5 fills a missing original length from the top level, then
            // from max_position_embeddings
            let original = p
                .get("original_max_position_embeddings")
                .or_else(|| raw.get("original_max_position_embeddings"))
                .filter(|v| !v.is_null());
            let original_max_position_embeddings = match original {
                None => max_position_embeddings,
                Some(v) => v.as_u64().ok_or_else(|| {
                    anyhow!(
                        "config.json {key}: original_max_position_embeddings must be a \
                         non-negative integer, found {v}"
                    )
                })? as usize,
            };
            Ok(Some(RopeScaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings,
            }))
        }
        other => bail!(
            "config.json {key} type `{other}` is not supported (supported: llama3, or none)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<RopeConfig> {
        RopeConfig::parse(&v, 2048)
    }

    #[test]
    fn legacy_and_transformers5_forms_give_the_same_settings() {
        let legacy = parse(json!({"rope_theta": 100000.0})).unwrap();
        let v5 = parse(json!({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}))
            .unwrap();
        assert_eq!(legacy, v5);
        assert_eq!(v5.theta, 100000.0);
        assert_eq!(v5.scaling, None);
        assert_eq!(parse(json!({})).unwrap().theta, DEFAULT_THETA);
    }

    #[test]
    fn the_parameter_object_wins_over_the_top_level_theta() {
        let c = parse(json!({"rope_theta": 10000.0, "rope_parameters": {"rope_theta": 5e5}})).unwrap();
        assert_eq!(c.theta, 5e5);
        // a legacy rope_scaling replaces rope_parameters, as in transformers
        let c = parse(json!({"rope_theta": 7.0, "rope_scaling": {"rope_type": "default"},
                             "rope_parameters": {"rope_theta": 5e5}}))
        .unwrap();
        assert_eq!(c.theta, 7.0);
    }

    #[test]
    fn llama3_scaling_in_either_form() {
        let fields = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let legacy = parse(json!({"rope_theta": 5e5, "rope_scaling": fields.clone()})).unwrap();
        let mut p = fields.clone();
        p["rope_theta"] = json!(5e5);
        let v5 = parse(json!({"rope_parameters": p})).unwrap();
        assert_eq!(legacy, v5);
        let s = v5.scaling.unwrap();
        assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 8192));
        // no original length: max_position_embeddings, as transformers fills it
        let mut p = fields;
        p.as_object_mut().unwrap().remove("original_max_position_embeddings");
        let s = parse(json!({"rope_parameters": p})).unwrap().scaling.unwrap();
        assert_eq!(s.original_max_position_embeddings, 2048);
    }

    #[test]
    fn nested_by_layer_type_reads_when_equal_and_is_refused_when_not() {
        let same = json!({"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e6}});
        assert_eq!(parse(json!({"rope_parameters": same})).unwrap().theta, 1e6);
        let differ = json!({"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}});
        let e = parse(json!({"rope_parameters": differ})).unwrap_err().to_string();
        assert!(e.contains("rope_parameters") && e.contains("sliding_attention"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (v, key) in [
            (json!({"rope_theta": 0}), "rope_theta"),
            (json!({"rope_parameters": {"rope_theta": -1.0}}), "rope_parameters.rope_theta"),
            (json!({"rope_parameters": {"rope_theta": "1e4"}}), "rope_parameters.rope_theta"),
            (json!({"rope_parameters": 3}), "rope_parameters"),
            (json!({"rope_parameters": {"rope_type": "yarn"}}), "yarn"),
            (json!({"rope_scaling": {"rope_type": "llama3"}}), "factor"),
        ] {
            let e = parse(v.clone()).unwrap_err().to_string();
            assert!(e.contains(key), "{v}: {e}");
        }
    }
}
