//! QuaRot's online Hadamard before `down_proj`, training-free: `down_proj`'s weight
//! `W` `[hidden, d_ff]` becomes `W M` with `M = H / √d_ff` (no random signs, since the
//! online op [`OnlineHadamard`] has none), and the config declares the online op
//! (`bitsmith_online_hadamard: ["mlp.down_proj"]`), so the model multiplies the MLP's
//! activation by `M` before `down_proj`: `(a M)(W M)ᵀ = a M Mᵀ Wᵀ = a Wᵀ`. The float model
//! computes the same function; the activation's outlier channels are spread over all
//! channels, which helps the quantization of `down_proj` and of its input.
//!
//! Unlike the residual rotation this leaves an op in the model that a runtime must know:
//! transformers, vLLM or GPTQModel read the rewritten weights without it and compute
//! wrong outputs. It composes with the residual rotation in either order: that one mixes
//! `down_proj`'s rows (`Rᵀ W`), this one its columns.

use super::{Transform, TransformContext, TransformedModel};
use crate::loader::config::ONLINE_HADAMARD_KEY;
use crate::loader::{ModelConfig, Rewritten, TensorRewrite, WeightStore};
use crate::model::OnlineHadamard;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use rayon::prelude::*;
use std::sync::Arc;

/// The online Hadamard before `down_proj` as a transform stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DownProjHadamard;

impl Transform for DownProjHadamard {
    fn name(&self) -> &'static str {
        "down_hadamard"
    }

    fn apply(
        &self,
        config: &ModelConfig,
        store: &WeightStore,
        _ctx: &TransformContext,
    ) -> Result<TransformedModel> {
        if config.online_hadamard_down {
            bail!(
                "the model already rotates down_proj's input online (config.json \
                 `{ONLINE_HADAMARD_KEY}`); a second rotation would need a second online op"
            );
        }
        let n = config.intermediate_size;
        // the op the model will run, on the host: the weights get exactly its `M`
        let rotation = OnlineHadamard::new(n, DType::F32, &Device::Cpu)
            .with_context(|| format!("rotating the {n}-wide input of down_proj"))?;
        let rewrite = RotatedDownProj {
            rotation,
            layers: config.num_hidden_layers,
        };
        let mut config = config.clone();
        config.online_hadamard_down = true;
        config.raw[ONLINE_HADAMARD_KEY] = serde_json::json!(["mlp.down_proj"]);
        Ok(TransformedModel {
            config,
            store: store.with_rewrite(Arc::new(rewrite)),
        })
    }
}

/// `down_proj`'s weights times `M`, computed when read.
struct RotatedDownProj {
    rotation: OnlineHadamard,
    layers: usize,
}

impl RotatedDownProj {
    fn is_down_proj(&self, name: &str) -> bool {
        name.strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(layer, module)| {
                module == "mlp.down_proj.weight"
                    && layer.parse::<usize>().is_ok_and(|l| l < self.layers)
            })
    }
}

impl TensorRewrite for RotatedDownProj {
    fn describe(&self) -> String {
        format!(
            "Hadamard rotation of down_proj's {}-wide input (online op before down_proj)",
            self.rotation.order()
        )
    }

    fn added(&self) -> &[String] {
        &[]
    }

    fn rewrites(&self, name: &str) -> bool {
        self.is_down_proj(name)
    }

    fn rewrite(&self, name: &str, base: &WeightStore) -> Result<Option<Rewritten>> {
        if !self.is_down_proj(name) {
            return Ok(None);
        }
        let shape = base.info(name)?.shape.clone();
        let n = self.rotation.order();
        if shape.len() != 2 || shape[1] != n {
            bail!(
                "`{name}` has shape {shape:?}; down_proj's input is {n} wide (intermediate_size)"
            );
        }
        let mut w = base.f32_vec(name, &shape)?;
        w.par_chunks_mut(n)
            .for_each(|row| self.rotation.apply_row(row));
        Ok(Some(Rewritten::f32(w, shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_down_proj_weights_of_existing_layers_are_rewritten() {
        let r = RotatedDownProj {
            rotation: OnlineHadamard::new(12, DType::F32, &Device::Cpu).unwrap(),
            layers: 2,
        };
        assert!(r.rewrites("model.layers.0.mlp.down_proj.weight"));
        assert!(r.rewrites("model.layers.1.mlp.down_proj.weight"));
        assert!(!r.rewrites("model.layers.2.mlp.down_proj.weight"));
        assert!(!r.rewrites("model.layers.0.mlp.down_proj.bias"));
        assert!(!r.rewrites("model.layers.0.mlp.up_proj.weight"));
    }
}
