//! Load a model folder or repo id — float or packed — as a runnable [`CausalLm`].

use super::causal_lm::CausalLm;
use super::spec::LinearSpec;
use crate::loader::{ModelConfig, ModelFiles, WeightStore};
use crate::pack::{read_quantized_linear, GptqConfig};
use anyhow::Result;
use candle_core::{DType, Device};

/// A float model as-is, or a GPTQ-layout packed model with its linears dequantized on load
/// (the exact values the quantizer produced).
pub fn load_model(files: &ModelFiles, dtype: DType, device: &Device) -> Result<CausalLm> {
    let config = ModelConfig::from_file(&files.config)?;
    let store = WeightStore::open(&files.weights)?;
    let qcfg = GptqConfig::from_model_config(&config.raw)?;
    let loader = |spec: &LinearSpec| -> Result<Vec<f32>> {
        if let Some(q) = &qcfg {
            if store.contains(&format!("{}.qweight", spec.name)) {
                return Ok(read_quantized_linear(&store, spec, q)?.dequantize());
            }
        }
        store.f32_vec(
            &format!("{}.weight", spec.name),
            &[spec.out_features, spec.in_features],
        )
    };
    CausalLm::load(&config, &store, &loader, dtype, device)
}
