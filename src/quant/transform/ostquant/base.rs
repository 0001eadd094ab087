//! The source model prepared for the transforms (methods.md §6.2 step 1): every RMSNorm
//! weight folded into the linears that read it, so that the norms become weightless and
//! a rotation of the residual stream commutes with them.

use super::compose::BaseLayer;
use super::params::Widths;
use crate::loader::{ModelConfig, WeightStore};
use crate::model::block_linears;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

/// Layer `l` of `store` with its norms folded: q/k/v columns × `input_layernorm`, gate/up
/// columns × `post_attention_layernorm`; f32 on `device`.
pub fn base_layer(
    c: &ModelConfig,
    store: &WeightStore,
    l: usize,
    device: &Device,
) -> Result<BaseLayer> {
    let w = Widths::of(c);
    let gamma = |n: &str| store.f32_vec(&format!("model.layers.{l}.{n}.weight"), &[w.hidden]);
    let (g_in, g_post) = (
        gamma("input_layernorm")?,
        gamma("post_attention_layernorm")?,
    );
    let specs = block_linears(c, l);
    let mut ws = Vec::with_capacity(7);
    let mut bs = Vec::with_capacity(7);
    for (i, s) in specs.iter().enumerate() {
        let mut v = store
            .f32_vec(
                &format!("{}.weight", s.name),
                &[s.out_features, s.in_features],
            )
            .with_context(|| format!("OSTQuant reads `{}`", s.name))?;
        let fold = match i {
            0..=2 => Some(&g_in),
            4 | 5 => Some(&g_post),
            _ => None,
        };
        if let Some(g) = fold {
            v.chunks_mut(s.in_features)
                .for_each(|row| row.iter_mut().zip(g).for_each(|(x, g)| *x *= g));
        }
        ws.push(Tensor::from_vec(
            v,
            (s.out_features, s.in_features),
            device,
        )?);
        bs.push(if s.bias {
            let name = format!("{}.bias", s.name);
            Some(Tensor::from_vec(
                store.f32_vec(&name, &[s.out_features])?,
                s.out_features,
                device,
            )?)
        } else {
            None
        });
    }
    let arr = |v: Vec<Tensor>| -> Result<[Tensor; 7]> {
        v.try_into()
            .map_err(|v: Vec<Tensor>| anyhow::anyhow!("a block of {} linears, expected 7", v.len()))
    };
    let barr: [Option<Tensor>; 7] = bs
        .try_into()
        .map_err(|v: Vec<Option<Tensor>>| anyhow::anyhow!("{} biases, expected 7", v.len()))?;
    Ok(BaseLayer {
        w: arr(ws)?,
        b: barr,
    })
}

/// The head's weight with the final norm folded in, `[vocab, hidden]` (the embedding
/// when tied).
pub fn head_with_norm(c: &ModelConfig, store: &WeightStore) -> Result<Vec<f32>> {
    let h = c.hidden_size;
    let name = if store.contains("lm_head.weight") {
        "lm_head.weight"
    } else {
        "model.embed_tokens.weight"
    };
    let mut w = store.f32_vec(name, &[c.vocab_size, h])?;
    let g = store.f32_vec("model.norm.weight", &[h])?;
    w.chunks_mut(h)
        .for_each(|row| row.iter_mut().zip(&g).for_each(|(x, g)| *x *= g));
    Ok(w)
}
