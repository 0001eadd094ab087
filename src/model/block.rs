//! One decoder block: pre-norm attention (GQA, RoPE) and pre-norm SwiGLU MLP.

use super::attention::{causal_attention, AttentionShape};
use super::causal_lm::{load_linear, LinearLoader};
use super::kv_cache::LayerKvCache;
use super::layers::{cpu_slice, Linear, RmsNorm};
use super::rope::RopeTables;
use super::spec::block_linears;
use crate::loader::{ModelConfig, WeightStore};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// What every block of one forward pass shares: rotary tables and the causal mask.
pub struct BlockContext {
    pub rope: RopeTables,
    /// Additive mask (0 or −∞) `[seq, keys]` over the keys attention reads (see
    /// [`first_visible_key`]); `None` for a single position, which sees all of them.
    pub mask: Option<Tensor>,
    /// Absolute position of the first of the `seq` positions: how many are already in
    /// the KV cache (0 without a cache).
    pub offset: usize,
}

impl BlockContext {
    /// Context for sequences of `seq_len` positions starting at 0.
    pub fn new(c: &ModelConfig, seq_len: usize, dtype: DType, device: &Device) -> Result<Self> {
        Self::at(c, 0, seq_len, dtype, device)
    }

    /// Context for `seq_len` new positions following `offset` cached ones.
    pub fn at(
        c: &ModelConfig,
        offset: usize,
        seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let rope = RopeTables::new(c, offset, seq_len, dtype, device)?;
        let mask = (seq_len > 1)
            .then(|| causal_mask(offset, seq_len, c.sliding_window, dtype, device))
            .transpose()?;
        Ok(Self { rope, mask, offset })
    }
}

/// The first key any of the queries at `offset..` can see: keys before it have left a
/// sliding window for all of them and are not read at all.
pub fn first_visible_key(offset: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (offset + 1).saturating_sub(w))
}

/// Queries at `offset..offset+n` against keys `first_visible_key(offset)..offset+n`.
fn causal_mask(
    offset: usize,
    n: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let k0 = first_visible_key(offset, window);
    let keys = offset + n - k0;
    let mut m = vec![0f32; n * keys];
    for i in 0..n {
        let qi = offset + i;
        for j in 0..keys {
            let kj = k0 + j;
            let visible = kj <= qi && window.is_none_or(|w| qi - kj < w);
            if !visible {
                m[i * keys + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (n, keys), device)?.to_dtype(dtype)?)
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct DecoderBlock {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl Attention {
    pub fn new(c: &ModelConfig, q: Linear, k: Linear, v: Linear, o: Linear) -> Self {
        Self {
            q_proj: q,
            k_proj: k,
            v_proj: v,
            o_proj: o,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            window: c.sliding_window,
        }
    }

    /// `x`: `[batch, seq, hidden]` (already normed).
    pub fn forward(&self, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        self.o_proj.forward(&self.core(x, ctx)?)
    }

    /// Everything before the output projection: `[batch, seq, heads·head_dim]`, the input
    /// of `o_proj`.
    pub fn core(&self, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        anyhow::ensure!(
            ctx.offset == 0,
            "a context at position {} needs a KV cache",
            ctx.offset
        );
        self.core_with_cache(x, ctx, None)
    }

    /// Attention over `x`'s positions and, with a cache, every position cached before
    /// them; the new keys and values are appended to the cache.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        cache: &mut LayerKvCache,
    ) -> Result<Tensor> {
        self.o_proj
            .forward(&self.core_with_cache(x, ctx, Some(cache))?)
    }

    fn core_with_cache(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(self.q_proj.forward(x)?, nh)?;
        let k = heads(self.k_proj.forward(x)?, nkv)?;
        let v = heads(self.v_proj.forward(x)?, nkv)?;
        let q = candle_nn::rotary_emb::rope(&q, &ctx.rope.cos, &ctx.rope.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &ctx.rope.cos, &ctx.rope.sin)?;
        let fused = q.device().is_cpu() && q.dtype() == DType::F32;
        if let Some(cache) = cache {
            anyhow::ensure!(
                cache.len() == ctx.offset,
                "KV cache holds {} positions but this step starts at position {} (clear the cache after a failed step)",
                cache.len(),
                ctx.offset
            );
            cache.append(&k, &v)?;
            // With history the queries also read cached keys, which the fused kernel
            // (square, causal from position 0) does not cover.
            if ctx.offset > 0 || !fused {
                let (k, v) = cache.keys_values(first_visible_key(ctx.offset, self.window))?;
                return attention_with_ops(&q, &k, &v, ctx.mask.as_ref());
            }
        }
        let y = if fused {
            let shape = AttentionShape {
                batch: b,
                heads: nh,
                kv_heads: nkv,
                seq: s,
                head_dim: hd,
                window: self.window,
            };
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let out = causal_attention(
                cpu_slice(&qs, ql)?,
                cpu_slice(&ks, kl)?,
                cpu_slice(&vs, vl)?,
                shape,
            );
            Tensor::from_vec(out, (b, s, nh * hd), q.device())?
        } else {
            attention_with_ops(&q, &k, &v, ctx.mask.as_ref())?
        };
        Ok(y)
    }
}

/// Attention from candle ops (any device and dtype): the reference the fused CPU kernel
/// is tested against, and the path for GPUs, half precision and cached decoding.
/// `q` `[batch, heads, seq, hd]` (contiguous); `k`, `v` `[batch, kv_heads, keys, hd]`
/// (views into a KV cache allowed); `mask` `[seq, keys]`.
pub fn attention_with_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, nh, s, hd) = q.dims4()?;
    let (nkv, t) = (k.dim(1)?, k.dim(2)?);
    let q = (q * (1.0 / (hd as f64).sqrt()))?;
    // GQA without repeating K/V: the `g` query heads of one KV head are stacked along
    // the sequence axis, so one batched GEMM per KV head covers them all.
    let g = nh / nkv;
    let q = q.reshape((b, nkv, g * s, hd))?;
    let scores = q.matmul(&k.t()?)?; // [b, nkv, g*s, t]
    let scores = match mask {
        Some(mask) => scores.reshape((b, nkv, g, s, t))?.broadcast_add(mask)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, nkv, g * s, t))?;
    let y = probs.matmul(v)?; // [b, nkv, g*s, hd]
    Ok(y.reshape((b, nh, s, hd))?
        .transpose(1, 2)?
        .reshape((b, s, nh * hd))?)
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&self.hidden(x)?)
    }

    /// `silu(gate(x)) · up(x)`: the input of `down_proj`.
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        Ok((gate * self.up_proj.forward(x)?)?)
    }
}

impl DecoderBlock {
    /// Build block `layer`, taking linear weights from `linear` and norms/biases from `store`.
    pub fn load(
        c: &ModelConfig,
        store: &WeightStore,
        layer: usize,
        linear: &LinearLoader,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut l = block_linears(c, layer)
            .iter()
            .map(|spec| load_linear(store, spec, linear, dtype, device))
            .collect::<Result<Vec<_>>>()?
            .into_iter();
        let mut next = || l.next().expect("seven linears per block");
        let norm = |n: &str| -> Result<RmsNorm> {
            let w = store.tensor(
                &format!("model.layers.{layer}.{n}.weight"),
                &[c.hidden_size],
                dtype,
                device,
            )?;
            Ok(RmsNorm::new(w, c.rms_norm_eps))
        };
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(c, next(), next(), next(), next()),
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp {
                gate_proj: next(),
                up_proj: next(),
                down_proj: next(),
            },
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, ctx)?)?;
        self.finish(&h)
    }

    /// [`Self::forward`] reading and extending this block's KV cache.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        cache: &mut LayerKvCache,
    ) -> Result<Tensor> {
        let xn = self.input_layernorm.forward(x)?;
        let h = (x + self.self_attn.forward_cached(&xn, ctx, cache)?)?;
        self.finish(&h)
    }

    /// The MLP half, after the attention residual `h`.
    fn finish(&self, h: &Tensor) -> Result<Tensor> {
        let out = (h + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(h)?)?)?;
        Ok(out)
    }

    /// The block's linears by suffix (`self_attn.q_proj`, …), for quantizers to swap.
    pub fn linear_mut(&mut self, suffix: &str) -> Option<&mut Linear> {
        Some(match suffix {
            "self_attn.q_proj" => &mut self.self_attn.q_proj,
            "self_attn.k_proj" => &mut self.self_attn.k_proj,
            "self_attn.v_proj" => &mut self.self_attn.v_proj,
            "self_attn.o_proj" => &mut self.self_attn.o_proj,
            "mlp.gate_proj" => &mut self.mlp.gate_proj,
            "mlp.up_proj" => &mut self.mlp.up_proj,
            "mlp.down_proj" => &mut self.mlp.down_proj,
            _ => return None,
        })
    }
}
