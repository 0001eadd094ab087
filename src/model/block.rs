//! One decoder block: pre-norm attention (GQA, RoPE) and pre-norm SwiGLU MLP.
//!
//! The block's linears and their groups come from [`super::spec::LINEAR_GROUPS`]; this file
//! holds the glue between the groups (norms, attention, SwiGLU, residuals) and the one
//! tensor forward every caller runs:
//! - inference and evaluation: [`DecoderBlock::forward`] / [`DecoderBlock::forward_cached`]
//!   with the fused, forward-only kernels ([`Mode::Fused`]);
//! - calibration: [`DecoderBlock::forward_observed`] with a [`BlockObserver`] that sees each
//!   group's input and may pause the forward there, so a quantizer can swap that group's
//!   weights before [`DecoderBlock::resume`] runs the rest (true-sequential);
//! - training (FlexRound, OSTQuant): a context made [`BlockContext::differentiable`] runs
//!   ops that have a backward pass in candle's autograd. The weights to learn go in as
//!   tensors: [`DecoderBlock::weights`] gives the block's float weights, a method builds new
//!   ones from its `Var`s (a rounding `w_q(w, Var)`, a rotation `W·Rᵀ`, a scaled norm), and
//!   [`DecoderBlock::with_weights`] returns the block that runs them; gradients then flow
//!   from the block's output to the `Var`s (`tests/differentiable.rs`).

use super::attention::{causal_attention, AttentionShape};
use super::causal_lm::{load_linear, LinearLoader};
use super::fused_ops::{residual_add, swiglu};
use super::kv_cache::LayerKvCache;
use super::layers::{cpu_slice, Linear, RmsNorm};
use super::online::OnlineHadamard;
use super::rope::RopeTables;
use super::spec::{block_linears, BLOCK_LINEARS, LINEAR_GROUPS};
use super::split_gemm::forward_dense_group;
use crate::loader::{ModelConfig, WeightStore};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::sync::Arc;

/// Which ops a forward runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Fused kernels (candle's `rms_norm`, `rope`, `softmax_last_dim`, bitsmith's CPU
    /// attention): fast, and forward-only: gradients through them are silently zero.
    #[default]
    Fused,
    /// Ops with a backward pass: RMSNorm, RoPE and softmax from elementwise ops, attention
    /// as matmul + mask + softmax + matmul. Same function, to f32 rounding.
    Differentiable,
}

/// What every block of one forward pass shares: rotary tables and the causal mask.
pub struct BlockContext {
    pub rope: RopeTables,
    /// Additive mask (0 or −∞) `[seq, keys]` over the keys attention reads (see
    /// [`first_visible_key`]); `None` for a single position, which sees all of them.
    pub mask: Option<Tensor>,
    /// Absolute position of the first of the `seq` positions: how many are already in
    /// the KV cache (0 without a cache).
    pub offset: usize,
    /// Fused (default) or differentiable ops.
    pub mode: Mode,
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
        Ok(Self {
            rope,
            mask,
            offset,
            mode: Mode::Fused,
        })
    }

    /// The same context running [`Mode::Differentiable`] ops.
    pub fn differentiable(self) -> Self {
        self.with_mode(Mode::Differentiable)
    }

    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
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
    /// The rotation `down_proj`'s input gets first (OSTQuant's online `R4`), when the
    /// config says so.
    pub down_input: Option<Arc<OnlineHadamard>>,
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

    /// Everything before the output projection: `[batch, seq, heads·head_dim]`, the input
    /// of `o_proj`. `x`: `[batch, seq, hidden]` (already normed).
    pub fn core(&self, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        self.attend(&q, &k, &v, ctx, None)
    }

    /// Attention of the projected queries, keys and values (`[batch, seq, heads·head_dim]`
    /// each) over their own positions and, with a cache, every position cached before
    /// them; the new keys and values are appended to the cache.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &BlockContext,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<Tensor> {
        anyhow::ensure!(
            ctx.offset == 0 || cache.is_some(),
            "a context at position {} needs a KV cache",
            ctx.offset
        );
        let (b, s, _) = q.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let (q, k) = match ctx.mode {
            Mode::Fused => (
                candle_nn::rotary_emb::rope(&q, &ctx.rope.cos, &ctx.rope.sin)?,
                candle_nn::rotary_emb::rope(&k, &ctx.rope.cos, &ctx.rope.sin)?,
            ),
            Mode::Differentiable => (
                candle_nn::rotary_emb::rope_slow(&q, &ctx.rope.cos, &ctx.rope.sin)?,
                candle_nn::rotary_emb::rope_slow(&k, &ctx.rope.cos, &ctx.rope.sin)?,
            ),
        };
        // bf16 runs the fused kernel too, on its q/k/v widened to f32 (exact): candle's
        // bf16 matmul widens its operands on every call anyway, and materializes the scores
        let fused = ctx.mode == Mode::Fused
            && q.device().is_cpu()
            && matches!(q.dtype(), DType::F32 | DType::BF16);
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
                return attention_in(&q, &k, &v, ctx.mask.as_ref(), ctx.mode);
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
            let f32_of =
                |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
            let (q32, k32, v32) = (f32_of(&q)?, f32_of(&k)?, f32_of(&v)?);
            let (qs, ql) = q32.storage_and_layout();
            let (ks, kl) = k32.storage_and_layout();
            let (vs, vl) = v32.storage_and_layout();
            let out = causal_attention(
                cpu_slice(&qs, ql)?,
                cpu_slice(&ks, kl)?,
                cpu_slice(&vs, vl)?,
                shape,
            );
            Tensor::from_vec(out, (b, s, nh * hd), q.device())?.to_dtype(q.dtype())?
        } else {
            attention_in(&q, &k, &v, ctx.mask.as_ref(), ctx.mode)?
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
    attention_in(q, k, v, mask, Mode::Fused)
}

/// [`attention_with_ops`] with the softmax `mode` asks for.
fn attention_in(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    mode: Mode,
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
    // the softmax in f32 whatever the compute dtype, as transformers does: candle sums a
    // bf16/f16 row in that dtype, and over thousands of keys that sum loses most of its
    // bits (bf16 perplexity drifted 11 % above f32 with it)
    let dtype = scores.dtype();
    let half = matches!(dtype, DType::BF16 | DType::F16);
    let scores = if half {
        scores.to_dtype(DType::F32)?
    } else {
        scores
    };
    let probs = match mode {
        Mode::Fused => candle_nn::ops::softmax_last_dim(&scores)?,
        Mode::Differentiable => candle_nn::ops::softmax(&scores, D::Minus1)?,
    }
    .to_dtype(dtype)?;
    let y = probs.reshape((b, nkv, g * s, t))?.matmul(v)?; // [b, nkv, g*s, hd]
    Ok(y.reshape((b, nh, s, hd))?
        .transpose(1, 2)?
        .reshape((b, s, nh * hd))?)
}

impl Mlp {
    /// `silu(gate(x)) · up(x)`, rotated online when the model says so: the input of
    /// `down_proj`.
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        self.down_input_of(&swiglu(
            &self.gate_proj.forward(x)?,
            &self.up_proj.forward(x)?,
            Mode::Fused,
        )?)
    }

    /// What `down_proj` reads given the activation `act`.
    pub fn down_input_of(&self, act: &Tensor) -> Result<Tensor> {
        match &self.down_input {
            Some(r) => r.forward(act),
            None => Ok(act.clone()),
        }
    }
}

/// Whether a forward goes on after its observer saw a group's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Pause the forward before the group's linears run ([`Outcome::Paused`]).
    Stop,
}

/// Sees the input of each linear group as a forward reaches it.
pub trait BlockObserver {
    /// `x` is the input shared by the linears of `LINEAR_GROUPS[group]`, before they run.
    fn group_input(&mut self, group: usize, x: &Tensor) -> Result<Flow>;
}

/// The observer of a plain forward.
pub struct NoObserver;

impl BlockObserver for NoObserver {
    fn group_input(&mut self, _group: usize, _x: &Tensor) -> Result<Flow> {
        Ok(Flow::Continue)
    }
}

/// A forward paused at the input of a linear group, holding what [`DecoderBlock::resume`]
/// needs: the residual stream and, paused at the output projection, the attention output
/// (the one group input that is not cheap to recompute).
#[derive(Debug, Clone)]
pub struct Paused {
    group: usize,
    /// The block's input before the attention residual is added (groups 0 and 1), the
    /// attention residual after (groups 2 and 3).
    residual: Tensor,
    attn: Option<Tensor>,
}

impl Paused {
    /// The group whose input the observer saw last.
    pub fn group(&self) -> usize {
        self.group
    }
}

/// How an observed forward ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The block's output.
    Done(Tensor),
    /// Stopped by the observer.
    Paused(Paused),
}

impl Outcome {
    pub fn done(self) -> Result<Tensor> {
        match self {
            Self::Done(t) => Ok(t),
            Self::Paused(p) => anyhow::bail!("the forward paused at linear group {}", p.group),
        }
    }

    pub fn paused(self) -> Result<Paused> {
        match self {
            Self::Paused(p) => Ok(p),
            Self::Done(_) => anyhow::bail!("the forward ran to the end without pausing"),
        }
    }
}

/// The float weights of a block as tensors (see the module doc): [`DecoderBlock::weights`]
/// takes them out, [`DecoderBlock::with_weights`] runs new ones (e.g. built from `Var`s).
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// `[out, in]` weights of every linear, in [`BLOCK_LINEARS`] order.
    pub linears: Vec<Tensor>,
    /// `[hidden]` weights of the two RMSNorms.
    pub input_norm: Tensor,
    pub post_attention_norm: Tensor,
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
        let mut linears = BLOCK_LINEARS
            .iter()
            .zip(block_linears(c, layer))
            .map(|(suffix, spec)| Ok((*suffix, load_linear(store, &spec, linear, dtype, device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let mut take = |suffix: &str| {
            linears
                .remove(suffix)
                .with_context(|| format!("block {layer} declares no linear `{suffix}`"))
        };
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
            self_attn: Attention::new(
                c,
                take("self_attn.q_proj")?,
                take("self_attn.k_proj")?,
                take("self_attn.v_proj")?,
                take("self_attn.o_proj")?,
            ),
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp {
                gate_proj: take("mlp.gate_proj")?,
                up_proj: take("mlp.up_proj")?,
                down_proj: take("mlp.down_proj")?,
                down_input: if c.online_hadamard_down {
                    Some(Arc::new(OnlineHadamard::new(
                        c.intermediate_size,
                        dtype,
                        device,
                    )?))
                } else {
                    None
                },
            },
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        self.forward_observed(x, ctx, &mut NoObserver)?.done()
    }

    /// [`Self::forward`] reading and extending this block's KV cache.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        cache: &mut LayerKvCache,
    ) -> Result<Tensor> {
        self.run(Self::start(x), 0, ctx, Some(cache), &mut NoObserver)?
            .done()
    }

    /// The forward with `observer` shown each linear group's input; it may pause there.
    pub fn forward_observed(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        observer: &mut dyn BlockObserver,
    ) -> Result<Outcome> {
        self.run(Self::start(x), 0, ctx, None, observer)
    }

    /// Go on from where `paused` stopped: the paused group's input is recomputed (and not
    /// shown again), its linears run with the block's current weights, and `observer` sees
    /// the later groups' inputs.
    pub fn resume(
        &self,
        paused: Paused,
        ctx: &BlockContext,
        observer: &mut dyn BlockObserver,
    ) -> Result<Outcome> {
        let seen = paused.group + 1;
        self.run(paused, seen, ctx, None, observer)
    }

    fn start(x: &Tensor) -> Paused {
        Paused {
            group: 0,
            residual: x.clone(),
            attn: None,
        }
    }

    /// The one forward of the block, from `from.group` on; the observer sees the inputs
    /// of groups `seen..`.
    fn run(
        &self,
        from: Paused,
        seen: usize,
        ctx: &BlockContext,
        cache: Option<&mut LayerKvCache>,
        observer: &mut dyn BlockObserver,
    ) -> Result<Outcome> {
        let Paused {
            group: start,
            residual,
            attn,
        } = from;
        let mode = ctx.mode;
        let mut stop = |g: usize, x: &Tensor| -> Result<bool> {
            Ok(g >= seen && observer.group_input(g, x)? == Flow::Stop)
        };
        let h = if start < 2 {
            let attn = match attn {
                Some(a) => a,
                None => {
                    let xn = self.input_layernorm.forward_in(&residual, mode)?;
                    if stop(0, &xn)? {
                        return Ok(Outcome::Paused(Paused {
                            group: 0,
                            residual,
                            attn: None,
                        }));
                    }
                    let qkv = self.group_outputs(0, &xn, mode)?;
                    self.self_attn
                        .attend(&qkv[0], &qkv[1], &qkv[2], ctx, cache)?
                }
            };
            if stop(1, &attn)? {
                return Ok(Outcome::Paused(Paused {
                    group: 1,
                    residual,
                    attn: Some(attn),
                }));
            }
            let o = self.group_outputs(1, &attn, mode)?;
            residual_add(&residual, &o[0], mode)?
        } else {
            residual
        };
        let hn = self.post_attention_layernorm.forward_in(&h, mode)?;
        if stop(2, &hn)? {
            return Ok(Outcome::Paused(Paused {
                group: 2,
                residual: h,
                attn: None,
            }));
        }
        let gate_up = self.group_outputs(2, &hn, mode)?;
        // the observer sees what down_proj reads: after the online rotation
        let act = self
            .mlp
            .down_input_of(&swiglu(&gate_up[0], &gate_up[1], mode)?)?;
        if stop(3, &act)? {
            return Ok(Outcome::Paused(Paused {
                group: 3,
                residual: h,
                attn: None,
            }));
        }
        let down = self.group_outputs(3, &act, mode)?;
        Ok(Outcome::Done(residual_add(&h, &down[0], mode)?))
    }

    /// The outputs of group `g`'s linears on their shared input `x`, in declared order.
    fn group_outputs(&self, g: usize, x: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        let linears = LINEAR_GROUPS[g]
            .linears
            .iter()
            .map(|l| self.linear(l.suffix))
            .collect::<Result<Vec<_>>>()?;
        if mode == Mode::Fused {
            if let Some(ys) = forward_dense_group(&linears, x)? {
                return Ok(ys);
            }
        }
        linears.iter().map(|l| l.forward(x)).collect()
    }

    /// A linear by its suffix (`self_attn.q_proj`, …).
    pub fn linear(&self, suffix: &str) -> Result<&Linear> {
        Ok(match suffix {
            "self_attn.q_proj" => &self.self_attn.q_proj,
            "self_attn.k_proj" => &self.self_attn.k_proj,
            "self_attn.v_proj" => &self.self_attn.v_proj,
            "self_attn.o_proj" => &self.self_attn.o_proj,
            "mlp.gate_proj" => &self.mlp.gate_proj,
            "mlp.up_proj" => &self.mlp.up_proj,
            "mlp.down_proj" => &self.mlp.down_proj,
            _ => anyhow::bail!("a decoder block has no linear `{suffix}`"),
        })
    }

    /// The block's linears by suffix, for quantizers to swap.
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

    /// Every linear, in [`BLOCK_LINEARS`] order.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        BLOCK_LINEARS.iter().map(|s| {
            self.linear(s)
                .expect("every declared linear is a field of the block")
        })
    }

    /// The block's float weights (an error for packed linears).
    pub fn weights(&self) -> Result<BlockWeights> {
        Ok(BlockWeights {
            linears: self
                .linears()
                .map(|l| l.weight().cloned())
                .collect::<Result<_>>()?,
            input_norm: self.input_layernorm.weight().clone(),
            post_attention_norm: self.post_attention_layernorm.weight().clone(),
        })
    }

    /// This block running `w` (same shapes): the tensors are used as given, so gradients
    /// reach whatever they were computed from. Biases stay.
    pub fn with_weights(&self, w: &BlockWeights) -> Result<Self> {
        anyhow::ensure!(
            w.linears.len() == BLOCK_LINEARS.len(),
            "{} linear weights for a block of {}",
            w.linears.len(),
            BLOCK_LINEARS.len()
        );
        let mut out = self.clone();
        for (suffix, t) in BLOCK_LINEARS.iter().zip(&w.linears) {
            out.linear_mut(suffix)
                .expect("every declared linear is a field of the block")
                .set_weight(t.clone())
                .with_context(|| format!("weight of `{suffix}`"))?;
        }
        out.input_layernorm = self.input_layernorm.with_weight(w.input_norm.clone())?;
        out.post_attention_layernorm = self
            .post_attention_layernorm
            .with_weight(w.post_attention_norm.clone())?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_linear_is_a_field_of_the_block() {
        // `linear`, `linear_mut` and `load` name the fields; the declaration names the
        // linears: they must agree
        let w = || {
            Linear::new(
                Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
                None,
            )
        };
        let norm = || RmsNorm::new(Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(), 1e-5);
        let c = ModelConfig::from_json(serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 2, "intermediate_size": 2, "num_attention_heads": 1,
            "num_hidden_layers": 1, "vocab_size": 4,
        }))
        .unwrap();
        let mut b = DecoderBlock {
            input_layernorm: norm(),
            self_attn: Attention::new(&c, w(), w(), w(), w()),
            post_attention_layernorm: norm(),
            mlp: Mlp {
                gate_proj: w(),
                up_proj: w(),
                down_proj: w(),
                down_input: None,
            },
        };
        for s in BLOCK_LINEARS {
            assert!(b.linear(s).is_ok(), "{s}");
            assert!(b.linear_mut(s).is_some(), "{s}");
        }
        assert_eq!(b.linears().count(), BLOCK_LINEARS.len());
        assert!(b.linear("mlp.fc1").is_err());
    }
}
