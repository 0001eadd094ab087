//! A training-free random Hadamard rotation of the residual stream (QuaRot-style, weights
//! only): the float model computes the same function, but every linear that reads or
//! writes the residual stream sees its weights mixed by an orthogonal `R = D H / √n`
//! (`D` random signs, `H` a Hadamard matrix), which spreads outlier channels over all
//! channels and makes the weights easier to quantize. No online op is left behind.
//!
//! With the residual stream carried as `x R` (rows are tokens):
//! * RMSNorm commutes with `R` only when its weight is 1 (`‖x R‖ = ‖x‖`), so each norm
//!   weight `γ` is folded into the linears after it first and then set to 1;
//! * readers of the stream (q/k/v, gate/up, the head): `W ← W diag(γ) R`;
//! * writers to the stream (o_proj, down_proj): `W ← Rᵀ W`, their biases `b ← b R`;
//! * the embedding: `E ← E R`.
//!
//! A tied head becomes its own tensor (`lm_head.weight = E diag(γ_final) R`) and the
//! written config says `tie_word_embeddings: false`. The linears the rounding stage reads
//! are kept in f32 (rotated values are no longer bf16 numbers, and rounding them twice
//! would add an error); the head and embedding, which are stored as they are, keep the
//! source's dtype unless `f32_head` (see `transform::head_dtype`).

use super::{Transform, TransformContext, TransformedModel};
use crate::loader::{ModelConfig, Rewritten, SourceDType, TensorRewrite, WeightStore};
use crate::model::Hadamard;
use crate::util::SplitMix64;
use anyhow::{Context, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// The rotation as a transform stage; `seed` draws the signs of `D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HadamardRotation {
    pub seed: u64,
    /// Store the rotated head and embedding in f32 instead of the source's dtype.
    pub f32_head: bool,
}

impl Transform for HadamardRotation {
    fn name(&self) -> &'static str {
        "hadamard"
    }

    fn apply(
        &self,
        config: &ModelConfig,
        store: &WeightStore,
        _ctx: &TransformContext,
    ) -> Result<TransformedModel> {
        let n = config.hidden_size;
        let rotation = ResidualRotation::new(n, self.seed)
            .with_context(|| format!("rotating the {n}-wide residual stream"))?;
        let tied = !store.contains("lm_head.weight");
        let rewrite = RotatedWeights {
            rotation,
            head_dtype: super::head_dtype(store, self.f32_head)?,
            layers: config.num_hidden_layers,
            tied,
            added: if tied {
                vec!["lm_head.weight".into()]
            } else {
                vec![]
            },
        };
        let mut config = config.clone();
        config.tie_word_embeddings = false;
        config.raw["tie_word_embeddings"] = false.into();
        Ok(TransformedModel {
            config,
            store: store.with_rewrite(Arc::new(rewrite)),
        })
    }
}

/// `R = D H / √n`.
#[derive(Debug, Clone)]
pub struct ResidualRotation {
    hadamard: Hadamard,
    signs: Vec<f32>,
}

impl ResidualRotation {
    pub fn new(n: usize, seed: u64) -> Result<Self> {
        let hadamard = Hadamard::new(n)?;
        let mut rng = SplitMix64::new(seed);
        let signs = (0..n)
            .map(|_| if rng.next_u64() >> 63 == 0 { 1.0 } else { -1.0 })
            .collect();
        Ok(Self { hadamard, signs })
    }

    pub fn order(&self) -> usize {
        self.signs.len()
    }

    /// `x ← x R` for one row.
    pub fn rotate_row(&self, x: &mut [f32]) {
        x.iter_mut().zip(&self.signs).for_each(|(v, s)| *v *= s);
        let norm = 1.0 / (self.order() as f32).sqrt();
        self.hadamard.apply_row_scaled(x, norm);
    }

    /// `W ← W R` for `W` `[rows, n]`.
    pub fn rotate_rows(&self, w: &mut [f32]) {
        w.par_chunks_mut(self.order())
            .for_each(|r| self.rotate_row(r));
    }

    /// `W ← Rᵀ W` for `W` `[n, cols]`: `(Rᵀ W)ᵀ = Wᵀ R`.
    pub fn rotate_cols(&self, w: &mut [f32], cols: usize) {
        let n = self.order();
        let mut t = vec![0f32; n * cols];
        for i in 0..n {
            for j in 0..cols {
                t[j * n + i] = w[i * cols + j];
            }
        }
        self.rotate_rows(&mut t);
        for i in 0..n {
            for j in 0..cols {
                w[i * cols + j] = t[j * n + i];
            }
        }
    }
}

/// The weights of a rotated model, computed when a tensor is read.
struct RotatedWeights {
    rotation: ResidualRotation,
    /// The dtype of the rotated head and embedding.
    head_dtype: SourceDType,
    layers: usize,
    /// The source has no `lm_head.weight`: the head is made from the embedding.
    tied: bool,
    /// `lm_head.weight` when tied.
    added: Vec<String>,
}

/// How one tensor changes under the rotation.
enum Role {
    Embedding,
    /// Norm weight, set to 1 (folded into the readers).
    Norm,
    /// Reads the stream after the norm `model.layers.{layer}.{norm}` (or the final norm).
    Reader {
        norm: String,
    },
    Writer,
    WriterBias,
    Head,
}

impl RotatedWeights {
    fn role(&self, name: &str) -> Option<Role> {
        if name == "model.embed_tokens.weight" {
            return Some(Role::Embedding);
        }
        if name == "model.norm.weight" {
            return Some(Role::Norm);
        }
        if name == "lm_head.weight" {
            return Some(Role::Head);
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, module) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        if layer >= self.layers {
            return None;
        }
        let norm = |n: &str| Role::Reader {
            norm: format!("model.layers.{layer}.{n}.weight"),
        };
        Some(match module {
            "input_layernorm.weight" | "post_attention_layernorm.weight" => Role::Norm,
            "self_attn.q_proj.weight" | "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => {
                norm("input_layernorm")
            }
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => norm("post_attention_layernorm"),
            "self_attn.o_proj.weight" | "mlp.down_proj.weight" => Role::Writer,
            "self_attn.o_proj.bias" | "mlp.down_proj.bias" => Role::WriterBias,
            _ => return None,
        })
    }

    fn read(base: &WeightStore, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let shape = base.info(name)?.shape.clone();
        Ok((base.f32_vec(name, &shape)?, shape))
    }

    /// `W diag(γ) R` for a reader of the stream.
    fn reader(&self, base: &WeightStore, name: &str, norm: &str) -> Result<Rewritten> {
        let (mut w, shape) = Self::read(base, name)?;
        let n = self.rotation.order();
        let gamma = base.f32_vec(norm, &[n])?;
        w.par_chunks_mut(n).for_each(|row| {
            row.iter_mut().zip(&gamma).for_each(|(v, g)| *v *= g);
            self.rotation.rotate_row(row);
        });
        Ok(Rewritten::f32(w, shape))
    }
}

impl TensorRewrite for RotatedWeights {
    fn describe(&self) -> String {
        format!(
            "random Hadamard rotation of the {}-wide residual stream",
            self.rotation.order()
        )
    }

    fn added(&self) -> &[String] {
        &self.added
    }

    fn rewrites(&self, name: &str) -> bool {
        self.role(name).is_some()
    }

    fn rewrite(&self, name: &str, base: &WeightStore) -> Result<Option<Rewritten>> {
        let Some(role) = self.role(name) else {
            return Ok(None);
        };
        let n = self.rotation.order();
        Ok(Some(match role {
            Role::Embedding => {
                let (mut w, shape) = Self::read(base, name)?;
                self.rotation.rotate_rows(&mut w);
                Rewritten::stored_as(w, shape, self.head_dtype)?
            }
            Role::Norm => {
                let info = base.info(name)?;
                let dtype = match info.dtype {
                    d @ (SourceDType::F32 | SourceDType::F16 | SourceDType::BF16) => d,
                    _ => SourceDType::F32,
                };
                Rewritten {
                    values: vec![1.0; n],
                    shape: vec![n],
                    dtype,
                }
            }
            Role::Reader { norm } => self.reader(base, name, &norm)?,
            Role::Head => {
                let source = if self.tied {
                    "model.embed_tokens.weight"
                } else {
                    name
                };
                let head = self.reader(base, source, "model.norm.weight")?;
                Rewritten::stored_as(head.values, head.shape, self.head_dtype)?
            }
            Role::Writer => {
                let (mut w, shape) = Self::read(base, name)?;
                self.rotation.rotate_cols(&mut w, shape[1]);
                Rewritten::f32(w, shape)
            }
            Role::WriterBias => {
                let (mut b, shape) = Self::read(base, name)?;
                self.rotation.rotate_row(&mut b);
                Rewritten::f32(b, shape)
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_orthogonal_and_transposes() {
        let r = ResidualRotation::new(12, 7).unwrap();
        // R Rᵀ = I: rotating the rows of the identity gives R; its rows are orthonormal
        let mut m = vec![0f32; 144];
        (0..12).for_each(|i| m[i * 12 + i] = 1.0);
        r.rotate_rows(&mut m);
        for i in 0..12 {
            for j in 0..12 {
                let d: f32 = (0..12).map(|t| m[i * 12 + t] * m[j * 12 + t]).sum();
                assert!((d - f32::from(i == j)).abs() < 1e-6, "({i},{j}) {d}");
            }
        }
        // Rᵀ (W R)... rotate_cols(rotate_rows(W)) applied to W = R gives Rᵀ R R = R
        let mut w = m.clone();
        r.rotate_cols(&mut w, 12);
        // Rᵀ R = I
        for i in 0..12 {
            for j in 0..12 {
                assert!((w[i * 12 + j] - f32::from(i == j)).abs() < 1e-6);
            }
        }
    }
}
