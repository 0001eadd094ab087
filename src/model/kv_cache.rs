//! Key/value cache for incremental decoding: per layer, the rotated keys and the values
//! of every position seen so far, `[batch, kv_heads, positions, head_dim]`.
//!
//! The buffers are preallocated and grow by whole chunks (candle-nn's `Cache`): a decode
//! step writes one position in place instead of concatenating (and so copying) the whole
//! history per token and layer.

use super::layers::cpu_slice;
use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_nn::kv_cache::Cache;
use half::slice::HalfFloatSliceExt;

/// Positions a buffer grows by when it is full and no larger reservation was asked for.
pub const GROW_CHUNK: usize = 256;

/// The cache of one attention layer.
#[derive(Debug, Clone)]
pub struct LayerKvCache {
    k: Cache,
    v: Cache,
}

impl LayerKvCache {
    fn new(capacity: usize) -> Self {
        // the sequence axis of `[batch, kv_heads, positions, head_dim]`
        Self {
            k: Cache::new(2, capacity),
            v: Cache::new(2, capacity),
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.k.current_seq_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append `k`, `v` `[batch, kv_heads, new, head_dim]` (contiguous, keys after RoPE).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        if let Some(cached) = self.k.all_data() {
            ensure!(
                cached.dim(0)? == k.dim(0)?,
                "KV cache holds a batch of {} sequences, the input has {}",
                cached.dim(0)?,
                k.dim(0)?
            );
        }
        self.k.append(k)?;
        self.v.append(v)?;
        Ok(())
    }

    /// Keys and values of positions `from..len()`, as views into the buffers (no copy).
    pub fn keys_values(&self, from: usize) -> Result<(Tensor, Tensor)> {
        let n = self.len();
        ensure!(from < n, "KV cache: position {from} requested, {n} cached");
        let view = |c: &Cache| -> Result<Tensor> {
            let all = c
                .all_data()
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("KV cache is empty"))?;
            Ok(all.narrow(2, from, n - from)?)
        };
        Ok((view(&self.k)?, view(&self.v)?))
    }

    /// Run `f` on the host data of the key and value buffers, each `[batch, kv_heads,
    /// capacity, head_dim]`, with the capacity: the fused CPU decode step reads the cache in
    /// place through this.
    pub fn with_host<R>(&self, f: impl FnOnce(HostKv<'_>, usize) -> R) -> Result<R> {
        let (k, v) = match (self.k.all_data(), self.v.all_data()) {
            (Some(k), Some(v)) => (k, v),
            _ => anyhow::bail!("KV cache is empty"),
        };
        let capacity = k.dim(2)?;
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let kv = match k.dtype() {
            DType::F32 => HostKv::F32(cpu_slice(&ks, kl)?, cpu_slice(&vs, vl)?),
            DType::BF16 => HostKv::Bf16(
                cpu_slice::<half::bf16>(&ks, kl)?.reinterpret_cast(),
                cpu_slice::<half::bf16>(&vs, vl)?.reinterpret_cast(),
            ),
            other => anyhow::bail!("the fused decode step reads f32 or bf16 caches, not {other:?}"),
        };
        Ok(f(kv, capacity))
    }

    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> usize {
        self.k.max_seq_len()
    }
}

/// Keys and values in host memory: f32, or bf16 bit patterns.
#[derive(Debug, Clone, Copy)]
pub enum HostKv<'a> {
    F32(&'a [f32], &'a [f32]),
    Bf16(&'a [u16], &'a [u16]),
}

/// The KV cache of a whole model: one [`LayerKvCache`] per decoder block, all at the same
/// length (the number of positions of each sequence processed so far).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKvCache>,
}

impl KvCache {
    /// An empty cache for a model of `layers` blocks. `reserve` positions are allocated on
    /// the first forward (rounded up to [`GROW_CHUNK`]); longer sequences grow the buffers
    /// by that amount again.
    pub fn new(layers: usize, reserve: usize) -> Self {
        let capacity = reserve.max(1).div_ceil(GROW_CHUNK) * GROW_CHUNK;
        Self {
            layers: (0..layers).map(|_| LayerKvCache::new(capacity)).collect(),
        }
    }

    /// Positions cached per sequence: the absolute position of the next token.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKvCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequences in the cached batch (`None` before the first forward).
    pub fn batch(&self) -> Option<usize> {
        self.layers
            .first()
            .and_then(|l| l.k.all_data().as_ref())
            .map(|t| t.dims()[0])
    }

    pub fn layers_mut(&mut self) -> &mut [LayerKvCache] {
        &mut self.layers
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Forget every position (the buffers are freed too).
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.k.reset();
            l.v.reset();
        }
    }

    /// Bytes held by the key and value buffers (allocated capacity, not just the filled part).
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [l.k.all_data(), l.v.all_data()])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}
