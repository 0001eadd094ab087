//! The `quantization_config` a packed model's config.json carries, from the recipe that
//! made it: the GPTQ block for uniform allocations, [`MixedConfig`] for BAQ's, [`CodebookConfig`]
//! for power grids.

use super::codebook::{CodebookConfig, CODEBOOK_METHOD};
use super::mixed::{MixedConfig, MIXED_CODEBOOK_LAYOUT, MIXED_METHOD};
use super::{GptqConfig, ZeroConvention};
use crate::quant::recipe::{AllocationSpec, BaqScope, Recipe};
use crate::quant::{GridSpec, GroupSize};
use anyhow::{bail, Result};
use serde_json::{json, Value};

/// `quantization_config` for a model quantized by `recipe`.
pub fn quantization_config(recipe: &Recipe, zeros: ZeroConvention) -> Result<Value> {
    let meta = json!({
        "quantizer": [format!("bitsmith:{}", env!("CARGO_PKG_VERSION"))],
        "method": recipe.method_name(),
    });
    Ok(match &recipe.allocation {
        AllocationSpec::Uniform {
            grid:
                GridSpec::Power {
                    bits,
                    group_size,
                    levels,
                    ..
                },
        } => serde_json::to_value(CodebookConfig {
            quant_method: CODEBOOK_METHOD.into(),
            bits: *bits,
            group_size: group_size.as_i64(),
            codebook: "power".into(),
            levels: serde_json::to_value(levels)?
                .as_str()
                .unwrap_or_default()
                .into(),
            layout: "row-codes-v1".into(),
            meta,
        })?,
        AllocationSpec::Uniform { grid } => {
            let grid = grid.uniform()?;
            let act_order = recipe.rounding.permutes_groups();
            GptqConfig {
                bits: grid.bits,
                group_size: grid.group_size,
                sym: grid.sym,
                desc_act: act_order && grid.group_size != GroupSize::PerChannel,
                lm_head: recipe.lm_head,
                zeros,
                meta,
            }
            .to_json()
        }
        AllocationSpec::BaqGgml(_) => {
            bail!("BAQ over GGML types writes a GGUF file, not a Hugging Face folder")
        }
        AllocationSpec::Baq(b) => serde_json::to_value(MixedConfig {
            quant_method: MIXED_METHOD.into(),
            bits: b.bits,
            sym: b.sym,
            allowed_bits: b.allowed_bits.clone(),
            theta: b.theta,
            allocate: match b.scope {
                BaqScope::Layer => "layer",
                BaqScope::Model => "model",
            }
            .into(),
            group_size: b.group_size.as_i64(),
            layout: match b.codebook {
                None => "column-runs-v1".into(),
                Some(_) => MIXED_CODEBOOK_LAYOUT.into(),
            },
            levels: b
                .codebook
                .map(|l| serde_json::to_value(l).map(|v| v.as_str().unwrap_or_default().to_string()))
                .transpose()?,
            meta,
        })?,
    })
}
