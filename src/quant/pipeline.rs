//! Quantize every linear of a model with a layer-wise method, streaming one weight at a
//! time from the memory-mapped store (peak memory: one layer in f32 plus packed results).

use super::{LayerCodes, LayerQuantizer, LayerToQuantize, QuantizedLinear};
use crate::loader::{ModelConfig, WeightStore};
use crate::model::spec::{block_linears, lm_head};
use crate::model::LinearSpec;
use anyhow::{bail, Context, Result};
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct QuantizeOptions {
    /// Quantize `lm_head` too (tied heads are quantized from the embedding matrix, which
    /// itself stays unquantized).
    pub include_lm_head: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

pub struct QuantizedModel {
    pub layers: Vec<(LinearSpec, QuantizedLinear)>,
    pub seconds: f64,
}

/// The linears a quantizer will visit, in order.
pub fn target_linears(config: &ModelConfig, include_lm_head: bool) -> Vec<LinearSpec> {
    let mut specs: Vec<LinearSpec> = (0..config.num_hidden_layers)
        .flat_map(|l| block_linears(config, l))
        .collect();
    if include_lm_head {
        specs.push(lm_head(config));
    }
    specs
}

/// Quantize every linear of `target_linears` with a data-free method, in the uniform
/// layout (an error for a method that yields mixed-width layers).
pub fn quantize_model(
    config: &ModelConfig,
    store: &WeightStore,
    quantizer: &dyn LayerQuantizer,
    opts: &QuantizeOptions,
) -> Result<QuantizedModel> {
    let start = Instant::now();
    let layers = quantize_model_codes(config, store, quantizer, opts)?
        .into_iter()
        .map(|(s, c)| Ok((s, c.into_uniform()?)))
        .collect::<Result<_>>()?;
    Ok(QuantizedModel {
        layers,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Quantize every linear of `target_linears` with a data-free method.
pub fn quantize_model_codes(
    config: &ModelConfig,
    store: &WeightStore,
    quantizer: &dyn LayerQuantizer,
    opts: &QuantizeOptions,
) -> Result<Vec<(LinearSpec, LayerCodes)>> {
    if quantizer.needs_hessian() {
        bail!(
            "method `{}` needs calibration data, which this pipeline does not collect",
            quantizer.name()
        );
    }
    let specs = target_linears(config, opts.include_lm_head);
    let bar = crate::util::progress_bar(
        opts.progress,
        specs.len(),
        "layers",
        &quantizer.name().to_uppercase(),
    );
    let mut layers = Vec::with_capacity(specs.len());
    for spec in specs {
        bar.set_message(spec.name.clone());
        let weight_name = if spec.name == "lm_head" && !store.contains("lm_head.weight") {
            "model.embed_tokens.weight".to_string()
        } else {
            format!("{}.weight", spec.name)
        };
        let w = store.f32_vec(&weight_name, &[spec.out_features, spec.in_features])?;
        let q = quantizer
            .quantize(&LayerToQuantize {
                name: &spec.name,
                weight: &w,
                out_features: spec.out_features,
                in_features: spec.in_features,
                hessian: None,
            })
            .with_context(|| format!("quantizing `{}`", spec.name))?
            .codes;
        layers.push((spec, q));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(layers)
}
