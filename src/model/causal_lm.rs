//! The whole decoder: embedding → blocks → final norm → LM head.

use super::block::{BlockContext, DecoderBlock, Mode};
use super::kv_cache::KvCache;
use super::layers::{DenseGemv, Linear, PackedMatmul, RmsNorm};
use super::spec::{lm_head, LinearSpec};
use crate::error::{fail, tagged, ErrorKind};
use crate::loader::{ModelConfig, WeightStore};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Build one linear from `linear` (weights) and `store` (bias).
pub fn load_linear(
    store: &WeightStore,
    spec: &LinearSpec,
    linear: &LinearLoader,
    dtype: DType,
    device: &Device,
) -> Result<Linear> {
    let w = linear(spec).with_context(|| format!("loading `{}`", spec.name))?;
    let b = spec
        .bias
        .then(|| {
            store.tensor(
                &format!("{}.bias", spec.name),
                &[spec.out_features],
                dtype,
                device,
            )
        })
        .transpose()?;
    Ok(match w {
        LinearSource::Dense(w) => {
            let w = Tensor::from_vec(w, (spec.out_features, spec.in_features), device)?
                .to_dtype(dtype)?;
            Linear::new(w, b)
        }
        LinearSource::Packed(kernel) => {
            anyhow::ensure!(
                kernel.out_features() == spec.out_features
                    && kernel.in_features() == spec.in_features,
                "`{}`: packed kernel is {}x{}, expected {}x{}",
                spec.name,
                kernel.out_features(),
                kernel.in_features(),
                spec.out_features,
                spec.in_features
            );
            Linear::packed(kernel, b)
        }
    })
}

/// What a [`LinearLoader`] supplies for one linear.
pub enum LinearSource {
    /// f32 weights `[out, in]` row-major: read from the store for a float model,
    /// unpacked and dequantized for a packed one.
    Dense(Vec<f32>),
    /// Weights kept packed, run by a kernel.
    Packed(Arc<dyn PackedMatmul>),
}

/// Supplies the weights of each linear layer.
pub type LinearLoader<'a> = dyn Fn(&LinearSpec) -> Result<LinearSource> + 'a;

/// Which positions [`CausalLm::forward_cached`] computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every position: `[batch, seq, vocab]`.
    All,
    /// The last position only, `[batch, 1, vocab]`: all that sampling needs, and it skips
    /// the LM head (the largest matmul of a small model) for the rest of a prompt.
    Last,
}

#[derive(Debug, Clone)]
pub struct CausalLm {
    pub config: ModelConfig,
    embed_tokens: Tensor,
    pub blocks: Vec<DecoderBlock>,
    norm: RmsNorm,
    pub lm_head: Linear,
    /// `lm_head` reads the embedding matrix (tied weights, no separate head tensor).
    tied_head: bool,
    /// Decode steps take the fused CPU path (`super::decode`) when the model allows it.
    fused_decode: bool,
    /// The fused step's product for dense linears.
    dense_gemv: Option<Arc<dyn DenseGemv>>,
    dtype: DType,
    device: Device,
}

impl CausalLm {
    /// Build the model, taking linear weights from `linear` and everything else
    /// (embeddings, norms, biases) from `store`.
    pub fn load(
        config: &ModelConfig,
        store: &WeightStore,
        linear: &LinearLoader,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let c = config;
        let h = c.hidden_size;
        let dense = |name: &str, shape: &[usize]| store.tensor(name, shape, dtype, device);
        let embed_tokens = dense("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let blocks = (0..c.num_hidden_layers)
            .map(|layer| DecoderBlock::load(c, store, layer, linear, dtype, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(dense("model.norm.weight", &[h])?, c.rms_norm_eps);
        let head_spec = lm_head(c);
        let tied_head = c.tie_word_embeddings
            && !store.contains("lm_head.weight")
            && !store.contains("lm_head.qweight");
        let lm_head = if tied_head {
            Linear::new(embed_tokens.clone(), None)
        } else {
            load_linear(store, &head_spec, linear, dtype, device)?
        };
        Ok(Self {
            config: c.clone(),
            embed_tokens,
            blocks,
            norm,
            lm_head,
            tied_head,
            fused_decode: true,
            dense_gemv: None,
            dtype,
            device: device.clone(),
        })
    }

    /// Whether the LM head reads the embedding matrix (tied weights).
    pub fn tied_head(&self) -> bool {
        self.tied_head
    }

    /// Run the LM head with `kernel` (same shape, bias kept), e.g. the same values held
    /// narrower. A tied embedding is then looked up in `embedding` (`[vocab, hidden]`, the
    /// same values, e.g. the kernel's own tensor: one copy serves both) when given.
    pub fn replace_head(
        &mut self,
        kernel: Arc<dyn PackedMatmul>,
        embedding: Option<Tensor>,
    ) -> Result<()> {
        let (out, inp) = (self.lm_head.out_features(), self.lm_head.in_features());
        anyhow::ensure!(
            kernel.out_features() == out && kernel.in_features() == inp,
            "replacement head is {}x{}, expected {out}x{inp}",
            kernel.out_features(),
            kernel.in_features()
        );
        if let Some(e) = embedding {
            anyhow::ensure!(
                self.tied_head && e.dims() == self.embed_tokens.dims(),
                "a replacement embedding needs a tied head and shape {:?}",
                self.embed_tokens.dims()
            );
            self.embed_tokens = e;
        }
        let bias = self.lm_head.bias().cloned();
        self.lm_head = Linear::packed(kernel, bias);
        Ok(())
    }

    /// The GEMV the fused CPU decode step runs dense linears with (`infer` supplies
    /// its kernel when it loads a model); without one, decode steps of a model with dense
    /// linears run through candle ops.
    pub fn set_dense_gemv(&mut self, gemv: Arc<dyn DenseGemv>) {
        self.dense_gemv = Some(gemv);
    }

    pub(crate) fn dense_gemv(&self) -> Option<&dyn DenseGemv> {
        self.dense_gemv.as_deref()
    }

    /// Take the fused CPU decode step when possible (the default) or always run decode
    /// steps through candle ops (for comparisons).
    pub fn set_fused_decode(&mut self, on: bool) {
        self.fused_decode = on;
    }

    /// A float model: every linear read as-is from the store.
    pub fn load_dense(
        config: &ModelConfig,
        store: &WeightStore,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let loader = |s: &LinearSpec| {
            store
                .f32_vec(
                    &format!("{}.weight", s.name),
                    &[s.out_features, s.in_features],
                )
                .map(LinearSource::Dense)
        };
        Self::load(config, store, &loader, dtype, device)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token ids `[batch, seq]` (u32) → hidden states `[batch, seq, hidden]`.
    /// Embedding of ids `[batch, seq]` (u32); ids of another shape or type, or outside the
    /// vocabulary, are the caller's error ([`ErrorKind::InvalidInput`]).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2().map_err(|_| {
            tagged(
                ErrorKind::InvalidInput,
                format!("token ids must be [batch, seq], got shape {:?}", ids.dims()),
            )
        })?;
        if ids.dtype() != DType::U32 {
            fail!(InvalidInput, "token ids must be u32, got {:?}", ids.dtype());
        }
        let flat = ids.flatten_all()?;
        let vocab = self.config.vocab_size as u32;
        if let Some(bad) = flat.to_vec1::<u32>()?.into_iter().find(|&t| t >= vocab) {
            fail!(
                InvalidInput,
                "token id {bad} is outside the vocabulary (size {vocab})"
            );
        }
        Ok(self
            .embed_tokens
            .index_select(&flat, 0)?
            .to_dtype(self.dtype)?
            .reshape((b, s, self.config.hidden_size))?)
    }

    /// Embedding rows of `ids` as f32, `[ids.len(), hidden]` row-major.
    pub fn embed_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let vocab = self.config.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            fail!(
                InvalidInput,
                "token id {bad} is outside the vocabulary (size {vocab})"
            );
        }
        let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
        Ok(self
            .embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }

    /// The final RMSNorm.
    pub fn final_norm_layer(&self) -> &RmsNorm {
        &self.norm
    }

    /// Rotary tables and mask for sequences of `seq_len` tokens.
    pub fn context(&self, seq_len: usize) -> Result<BlockContext> {
        BlockContext::new(&self.config, seq_len, self.dtype, &self.device)
    }

    /// Final norm and LM head: `[batch, seq, hidden]` → logits `[batch, seq, vocab]`.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head_in(hidden, Mode::Fused)
    }

    /// [`Self::head`] with the norm `mode` asks for.
    pub fn head_in(&self, hidden: &Tensor, mode: Mode) -> Result<Tensor> {
        self.lm_head.forward(&self.norm.forward_in(hidden, mode)?)
    }

    /// A linear by its full module name (`model.layers.3.mlp.down_proj`, `lm_head`), for
    /// swapping in quantized weights.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        if name == "lm_head" {
            return Some(&mut self.lm_head);
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, suffix) = rest.split_once('.')?;
        self.blocks
            .get_mut(layer.parse::<usize>().ok()?)?
            .linear_mut(suffix)
    }

    /// Replace one linear's weights (`[out, in]` row-major f32).
    pub fn set_linear_weights(&mut self, name: &str, weights: Vec<f32>) -> Result<()> {
        let (device, dtype) = (self.device.clone(), self.dtype);
        let slot = self
            .linear_mut(name)
            .with_context(|| format!("the model has no linear `{name}`"))?;
        let (out, inp) = (slot.out_features(), slot.in_features());
        anyhow::ensure!(
            weights.len() == out * inp,
            "`{name}`: {} values for a {out}x{inp} weight",
            weights.len()
        );
        slot.set_weight(Tensor::from_vec(weights, (out, inp), &device)?.to_dtype(dtype)?)
    }

    /// Final norm only (callers that chunk the head themselves).
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.norm.forward(hidden)
    }

    /// All blocks on embedded inputs.
    pub fn run_blocks(&self, mut x: Tensor, ctx: &BlockContext) -> Result<Tensor> {
        for block in &self.blocks {
            x = block.forward(&x, ctx)?;
        }
        Ok(x)
    }

    /// An empty KV cache for this model with room for `reserve` positions per sequence.
    pub fn new_cache(&self, reserve: usize) -> KvCache {
        KvCache::new(self.blocks.len(), reserve)
    }

    /// Forward of new tokens `[batch, seq]` (u32) after the positions already in `cache`,
    /// which it extends: prefill (empty cache, any `seq`) and decode (`seq` = 1) alike.
    /// Every sequence of the batch is at the same position (no padding).
    ///
    /// Ids of the wrong shape, type or range, an empty sequence and a cache of another
    /// model or batch are the caller's errors ([`ErrorKind::InvalidInput`]).
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        logits: LogitsFor,
    ) -> crate::Result<Tensor> {
        Ok(self.forward_cached_checked(ids, cache, logits)?)
    }

    fn forward_cached_checked(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        logits: LogitsFor,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2().map_err(|_| {
            tagged(
                ErrorKind::InvalidInput,
                format!("token ids must be [batch, seq], got shape {:?}", ids.dims()),
            )
        })?;
        if s == 0 {
            fail!(InvalidInput, "forward of an empty sequence");
        }
        if cache.num_layers() != self.blocks.len() {
            fail!(
                InvalidInput,
                "KV cache has {} layers, the model {}",
                cache.num_layers(),
                self.blocks.len()
            );
        }
        if let Some(cached) = cache.batch().filter(|_| !cache.is_empty()) {
            if cached != b {
                fail!(
                    InvalidInput,
                    "KV cache holds {cached} sequences, the input has {b}"
                );
            }
        }
        if s == 1 && self.fused_decode && super::decode::eligible(self, b) {
            let logits = super::decode::step(self, &ids.flatten_all()?.to_vec1::<u32>()?, cache)?;
            return Ok(logits);
        }
        let ctx = BlockContext::at(&self.config, cache.len(), s, self.dtype, &self.device)?;
        let mut x = self.embed(ids)?;
        for (block, layer) in self.blocks.iter().zip(cache.layers_mut()) {
            x = block.forward_cached(&x, &ctx, layer)?;
        }
        let x = match logits {
            LogitsFor::All => x,
            LogitsFor::Last => x.narrow(1, s - 1, 1)?,
        };
        self.head(&x)
    }

    /// Whole-model forward: ids `[batch, seq]` → logits `[batch, seq, vocab]`.
    ///
    /// Ids of the wrong shape, type or range are [`ErrorKind::InvalidInput`].
    pub fn forward(&self, ids: &Tensor) -> crate::Result<Tensor> {
        self.forward_in(ids, Mode::Fused)
    }

    /// [`Self::forward`] with the ops `mode` asks for: [`Mode::Differentiable`] for a loss
    /// whose gradients reach the weights (put `Var`s in with
    /// [`DecoderBlock::with_weights`] on [`Self::blocks`]).
    pub fn forward_in(&self, ids: &Tensor, mode: Mode) -> crate::Result<Tensor> {
        let x = self.embed(ids)?;
        let ctx = self.context(ids.dim(1)?)?.with_mode(mode);
        let x = self.run_blocks(x, &ctx)?;
        Ok(self.head_in(&x, mode)?)
    }
}
