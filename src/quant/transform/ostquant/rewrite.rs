//! The trained transforms applied once to the weights (methods.md §6.5 step 1), lazily,
//! tensor by tensor, through the same [`compose`] the training ran.

use super::base::{base_layer, head_with_norm};
use super::compose::{compose, ComposedLayer, LayerTensors};
use super::params::OstParams;
use crate::loader::{ModelConfig, Rewritten, SourceDType, TensorRewrite, WeightStore};
use crate::model::spec::BLOCK_LINEARS;
use crate::model::OnlineHadamard;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Mutex;

pub struct OstRewrite {
    pub params: OstParams,
    /// The source model's config (before the transform).
    pub config: ModelConfig,
    pub r4: Option<OnlineHadamard>,
    /// The dtype the rotated head and embedding are stored in.
    pub head_dtype: SourceDType,
    pub added: Vec<String>,
    /// The last layer composed: a layer's nine tensors are read one after another.
    last: Mutex<Option<(usize, ComposedLayer)>>,
}

enum Role {
    Embedding,
    FinalNorm,
    Head,
    InputNorm(usize),
    PostNorm(usize),
    Weight(usize, usize),
    Bias(usize, usize),
}

impl OstRewrite {
    pub fn new(
        params: OstParams,
        config: ModelConfig,
        r4: bool,
        head_dtype: SourceDType,
    ) -> Result<Self> {
        let r4 = if r4 {
            Some(OnlineHadamard::new(
                config.intermediate_size,
                DType::F32,
                &Device::Cpu,
            )?)
        } else {
            None
        };
        Ok(Self {
            params,
            config,
            r4,
            head_dtype,
            added: vec!["lm_head.weight".into()],
            last: Mutex::new(None),
        })
    }

    fn role(&self, name: &str) -> Option<Role> {
        match name {
            "model.embed_tokens.weight" => return Some(Role::Embedding),
            "model.norm.weight" => return Some(Role::FinalNorm),
            "lm_head.weight" => return Some(Role::Head),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, module) = rest.split_once('.')?;
        let l: usize = layer.parse().ok()?;
        if l >= self.config.num_hidden_layers {
            return None;
        }
        match module {
            "input_layernorm.weight" => return Some(Role::InputNorm(l)),
            "post_attention_layernorm.weight" => return Some(Role::PostNorm(l)),
            _ => {}
        }
        let (linear, what) = module.rsplit_once('.')?;
        let i = BLOCK_LINEARS.iter().position(|s| *s == linear)?;
        match what {
            "weight" => Some(Role::Weight(l, i)),
            "bias" => Some(Role::Bias(l, i)),
            _ => None,
        }
    }

    fn layer<R>(
        &self,
        l: usize,
        base: &WeightStore,
        f: impl FnOnce(&ComposedLayer) -> Result<R>,
    ) -> Result<R> {
        let mut last = self
            .last
            .lock()
            .map_err(|_| anyhow::anyhow!("a poisoned layer cache"))?;
        if last.as_ref().map(|(i, _)| *i) != Some(l) {
            let dev = Device::Cpu;
            let b = base_layer(&self.config, base, l, &dev)?;
            let t = LayerTensors::new(
                &self.params.r1,
                &self.params.layers[l],
                self.params.widths,
                &dev,
            )?;
            *last = Some((l, compose(&b, &t, self.params.widths, self.r4.as_ref())?));
        }
        f(&last.as_ref().context("a composed layer")?.1)
    }

    /// `rows · R1` for `[rows, hidden]` values, computed in f32 and stored in the head's
    /// dtype.
    fn times_r1(&self, v: Vec<f32>, rows: usize) -> Result<Rewritten> {
        let h = self.config.hidden_size;
        let r1 = Tensor::from_slice(&self.params.r1, (h, h), &Device::Cpu)?;
        let out = Tensor::from_vec(v, (rows, h), &Device::Cpu)?.matmul(&r1)?;
        Rewritten::stored_as(out.flatten_all()?.to_vec1()?, vec![rows, h], self.head_dtype)
    }
}

fn host(t: &Tensor) -> Result<Rewritten> {
    Ok(Rewritten::f32(
        t.flatten_all()?.to_vec1()?,
        t.dims().to_vec(),
    ))
}

impl TensorRewrite for OstRewrite {
    fn describe(&self) -> String {
        format!(
            "OSTQuant: learned R1 ({h}×{h}), R2 per KV head, five scalings per layer{}",
            if self.r4.is_some() {
                ", R4 (online Hadamard before down_proj)"
            } else {
                ""
            },
            h = self.config.hidden_size
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
        let c = &self.config;
        Ok(Some(match role {
            Role::Embedding => {
                let e = base.f32_vec(name, &[c.vocab_size, c.hidden_size])?;
                self.times_r1(e, c.vocab_size)?
            }
            Role::FinalNorm => Rewritten::f32(vec![1.0; c.hidden_size], vec![c.hidden_size]),
            Role::Head => self.times_r1(head_with_norm(c, base)?, c.vocab_size)?,
            Role::InputNorm(l) => self.layer(l, base, |x| host(&x.input_norm))?,
            Role::PostNorm(l) => self.layer(l, base, |x| host(&x.post_norm))?,
            Role::Weight(l, i) => self.layer(l, base, |x| host(&x.w[i]))?,
            Role::Bias(l, i) => self.layer(l, base, |x| {
                host(
                    x.b[i]
                        .as_ref()
                        .with_context(|| format!("`{name}`: the source has no such bias"))?,
                )
            })?,
        }))
    }
}
