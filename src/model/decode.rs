//! The fused CPU decode step: one new token for each of 1..=8 sequences, run on f32 slices
//! in host memory instead of candle ops.
//!
//! Why: at batch 1 a small model's decode step is ~40 tiny tensor ops per block (norms,
//! reshapes, RoPE, cache views, softmax, residual adds), each with its own allocation and
//! dispatch; for the 30-block fixture that per-op cost exceeded the weight traffic itself.
//! Here each block is four matrix–vector products (q/k/v, o, gate/up, down) through the
//! linears' host kernels ([`PackedMatmul::host`] for packed layers, the dense GEMV for
//! float ones) plus a few loops over the hidden state, the whole step on one rayon worker
//! so the kernels' parallel loops start without a cross-thread hand-off.
//!
//! It computes what the tensor path computes — RMSNorm as candle does (f32 sum of squares),
//! the same RoPE tables, softmax attention over the cached keys, SiLU·up — in a different
//! summation order, so logits agree to f32 rounding (`tests/kv_cache.rs` checks the two
//! against each other and against the full forward).

use super::block::{first_visible_key, DecoderBlock};
use super::causal_lm::CausalLm;
use super::kv_cache::LayerKvCache;
use super::layers::{Linear, LinearWeight, RmsNorm};
use super::rope::inverse_frequencies;
use crate::infer::kernels::dense::{self, DenseRows};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

/// Largest batch the fused step takes (the packed GEMV's limit).
pub const MAX_BATCH: usize = 8;

/// Whether every weight of `m` can run on host slices (CPU, f32, host kernels).
pub fn eligible(m: &CausalLm, batch: usize) -> bool {
    let host_linear = |l: &Linear| match l.weights() {
        LinearWeight::Dense(w) => w.dtype() == DType::F32 && w.is_contiguous(),
        LinearWeight::Packed(k) => k.host().is_some(),
    };
    (1..=MAX_BATCH).contains(&batch)
        && m.device().is_cpu()
        && m.dtype() == DType::F32
        && host_linear(&m.lm_head)
        && m.blocks.iter().all(|b| {
            [
                &b.self_attn.q_proj,
                &b.self_attn.k_proj,
                &b.self_attn.v_proj,
                &b.self_attn.o_proj,
                &b.mlp.gate_proj,
                &b.mlp.up_proj,
                &b.mlp.down_proj,
            ]
            .into_iter()
            .all(host_linear)
        })
}

/// Run `f` on the f32 data of a contiguous CPU tensor.
fn with_host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("fused decode: expected a CPU tensor")
    };
    let (start, end) = layout
        .contiguous_offsets()
        .context("fused decode: expected a contiguous tensor")?;
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

/// `y` `[rows, out]` = `x` `[rows, in]` · Wᵀ (+ bias).
fn linear(l: &Linear, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
    let (n, k) = (l.out_features(), l.in_features());
    match l.weights() {
        LinearWeight::Dense(w) => with_host(w, |w| dense::gemv(DenseRows::F32(w), n, k, x, y))?,
        LinearWeight::Packed(p) => p
            .host()
            .context("fused decode: a packed layer without a host kernel")?
            .matmul_host(x, rows, y),
    }
    if let Some(b) = l.bias() {
        with_host(b, |b| {
            for row in y.chunks_exact_mut(n) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        })?;
    }
    Ok(())
}

/// `out = x / rms(x) · weight`, per row, exactly as candle's CPU `rms_norm` computes it.
fn rms_norm(norm: &RmsNorm, x: &[f32], out: &mut [f32]) -> Result<()> {
    with_host(norm.weight(), |w| {
        let h = w.len();
        for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let sum2: f32 = xr.iter().map(|v| v * v).sum();
            let m = (sum2 / h as f32 + norm.eps()).sqrt();
            for ((o, &v), &a) in or.iter_mut().zip(xr).zip(w) {
                *o = v / m * a;
            }
        }
    })
}

/// Rotate every head of every row in place (HF rotate-half layout) at one position.
fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x1 * sin[i] + x2 * cos[i];
        }
    }
}

/// Dimensions of the attention of one block.
#[derive(Clone, Copy)]
struct Heads {
    n: usize,
    kv: usize,
    dim: usize,
}

/// Per-step work buffers, allocated once per step and reused by every block.
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    out: Vec<f32>,
}

/// One decode step: `ids` holds one token per sequence, at position `cache.len()`.
/// Returns logits `[batch, 1, vocab]`.
pub fn step(m: &CausalLm, ids: &[u32], cache: &mut super::KvCache) -> Result<Tensor> {
    let b = ids.len();
    ensure!(
        eligible(m, b),
        "the fused decode step does not fit this model"
    );
    let c = &m.config;
    let pos = cache.len();
    let heads = Heads {
        n: c.num_attention_heads,
        kv: c.num_key_value_heads,
        dim: c.head_dim,
    };
    // RoPE at `pos`, formed exactly as `RopeTables` forms it
    let inv = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling.as_ref());
    let angles = || inv.iter().map(|&f| (pos as f32 * f) as f64);
    let cos: Vec<f32> = angles().map(|a| a.cos() as f32).collect();
    let sin: Vec<f32> = angles().map(|a| a.sin() as f32).collect();
    let h = c.hidden_size;
    let inter = m
        .blocks
        .first()
        .map_or(0, |blk| blk.mlp.gate_proj.out_features());
    let mut s = Scratch {
        x: m.embed_rows(ids)?,
        xn: vec![0.0; b * h],
        q: vec![0.0; b * heads.n * heads.dim],
        k: vec![0.0; b * heads.kv * heads.dim],
        v: vec![0.0; b * heads.kv * heads.dim],
        attn: vec![0.0; b * heads.n * heads.dim],
        gate: vec![0.0; b * inter],
        up: vec![0.0; b * inter],
        out: vec![0.0; b * h],
    };
    let window = c.sliding_window;
    // the whole step on a pool worker: the kernels' parallel loops then fork locally
    rayon::scope(|_| -> Result<()> {
        for (blk, layer) in m.blocks.iter().zip(cache.layers_mut()) {
            block(blk, layer, &mut s, b, heads, (&cos, &sin), pos, window)?;
        }
        Ok(())
    })?;
    // final norm and head
    rms_norm(m.final_norm_layer(), &s.x, &mut s.xn)?;
    let vocab = m.lm_head.out_features();
    let mut logits = vec![0f32; b * vocab];
    rayon::scope(|_| linear(&m.lm_head, &s.xn, b, &mut logits))?;
    Ok(Tensor::from_vec(logits, (b, 1, vocab), &Device::Cpu)?)
}

#[allow(clippy::too_many_arguments)]
fn block(
    blk: &DecoderBlock,
    cache: &mut LayerKvCache,
    s: &mut Scratch,
    b: usize,
    heads: Heads,
    (cos, sin): (&[f32], &[f32]),
    pos: usize,
    window: Option<usize>,
) -> Result<()> {
    let a = &blk.self_attn;
    rms_norm(&blk.input_layernorm, &s.x, &mut s.xn)?;
    linear(&a.q_proj, &s.xn, b, &mut s.q)?;
    linear(&a.k_proj, &s.xn, b, &mut s.k)?;
    linear(&a.v_proj, &s.xn, b, &mut s.v)?;
    rope(&mut s.q, heads.dim, cos, sin);
    rope(&mut s.k, heads.dim, cos, sin);
    // [b, kv_heads, 1, head_dim] is the memory order of `k`/`v` already
    let shape = (b, heads.kv, 1, heads.dim);
    cache.append(
        &Tensor::from_slice(&s.k, shape, &Device::Cpu)?,
        &Tensor::from_slice(&s.v, shape, &Device::Cpu)?,
    )?;
    let k0 = first_visible_key(pos, window);
    cache.with_host(|keys, values, capacity| {
        attend(
            &s.q,
            keys,
            values,
            capacity,
            k0,
            pos + 1,
            heads,
            &mut s.attn,
        )
    })?;
    linear(&a.o_proj, &s.attn, b, &mut s.out)?;
    s.x.iter_mut().zip(&s.out).for_each(|(x, o)| *x += o);

    let mlp = &blk.mlp;
    rms_norm(&blk.post_attention_layernorm, &s.x, &mut s.xn)?;
    linear(&mlp.gate_proj, &s.xn, b, &mut s.gate)?;
    linear(&mlp.up_proj, &s.xn, b, &mut s.up)?;
    for (g, u) in s.gate.iter_mut().zip(&s.up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
    linear(&mlp.down_proj, &s.gate, b, &mut s.out)?;
    s.x.iter_mut().zip(&s.out).for_each(|(x, o)| *x += o);
    Ok(())
}

/// Softmax attention of each sequence's query heads `q` `[b, heads, dim]` over cached
/// positions `k0..end` of `keys`/`values` `[b, kv_heads, capacity, dim]`, into `out`
/// `[b, heads, dim]`. One task per (sequence, head).
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    capacity: usize,
    k0: usize,
    end: usize,
    heads: Heads,
    out: &mut [f32],
) {
    let d = heads.dim;
    let group = heads.n / heads.kv;
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let (seq, head) = (i / heads.n, i % heads.n);
        let base = ((seq * heads.kv + head / group) * capacity + k0) * d;
        let len = (end - k0) * d;
        let qh = &q[i * d..(i + 1) * d];
        attend_head(
            qh,
            &keys[base..base + len],
            &values[base..base + len],
            scale,
            o,
        );
    });
}

fn attend_head(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected at run time.
        return unsafe { attend_head_avx512(q, keys, values, scale, out) };
    }
    attend_head_body(q, keys, values, scale, out)
}

/// The same body compiled with AVX-512 enabled, so its 16-lane loops vectorize.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_head_avx512(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    attend_head_body(q, keys, values, scale, out)
}

#[inline(always)]
fn attend_head_body(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    let d = q.len();
    let mut scores: Vec<f32> = keys
        .chunks_exact(d)
        .map(|k| dot_lanes(q, k) * scale)
        .collect();
    let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for s in &mut scores {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (p, v) in scores.iter().zip(values.chunks_exact(d)) {
        let p = p / sum;
        out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
    }
}

/// Dot product in 16 independent lanes (vectorizes without reassociating a single sum).
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}
