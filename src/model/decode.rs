//! The fused CPU decode step: one new token for each of 1..=8 sequences, run on f32 slices
//! in host memory instead of candle ops.
//!
//! Why: at batch 1 a small model's decode step is ~40 tiny tensor ops per block (norms,
//! reshapes, RoPE, cache views, softmax, residual adds), each with its own allocation and
//! dispatch; for the 30-block fixture that per-op cost exceeded the weight traffic itself.
//! Here each block is its declared linear groups (`spec::LINEAR_GROUPS`: q/k/v, o,
//! gate/up, down), each group one parallel region of matrix–vector products through the
//! linears' host kernels (`PackedMatmul::host` for packed layers, the [`DenseGemv`] that
//! `infer` attaches for float ones), plus a few loops over the hidden state (the glue of
//! `block.rs`), the whole step on one rayon worker so the kernels' parallel loops start
//! without a cross-thread hand-off.
//!
//! It computes what the tensor path computes — RMSNorm as candle does (f32 sum of squares),
//! the same RoPE tables, softmax attention over the cached keys, SiLU·up, the online
//! Hadamard before `down_proj` when the model has one (the fast transform, where the tensor
//! path multiplies by its two dense factors) — in a different summation order, so logits
//! agree to f32 rounding (`tests/kv_cache.rs` checks the two against each other and
//! against the full forward).

use super::block::{first_visible_key, DecoderBlock};
use super::causal_lm::CausalLm;
use super::kv_cache::{HostKv, LayerKvCache};
use super::layers::{cpu_slice, DenseGemv, Linear, LinearWeight, RmsNorm, MAX_GEMV_ROWS};
use super::rope::inverse_frequencies;
use super::spec::LINEAR_GROUPS;
use crate::util::exp_poly;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Whether every weight of `m` can run on host slices: a CPU model in f32 or bf16 (bf16
/// weights and KV cache are widened to f32 in registers; activations are f32), every linear
/// dense in the model's dtype or packed with a host kernel.
pub fn eligible(m: &CausalLm, batch: usize) -> bool {
    let host_linear = |l: &Linear| match l.weights() {
        LinearWeight::Dense(w) => {
            m.dense_gemv().is_some() && w.dtype() == m.dtype() && w.is_contiguous()
        }
        LinearWeight::Packed(k) => k.host().is_some(),
    };
    (1..=MAX_GEMV_ROWS).contains(&batch)
        && m.device().is_cpu()
        && matches!(m.dtype(), DType::F32 | DType::BF16)
        && host_linear(&m.lm_head)
        && m.blocks.iter().all(|b| b.linears().all(host_linear))
}

/// Run `f` on the values of a small contiguous f32 or bf16 CPU tensor (norm weights,
/// biases) as f32.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    Ok(match t.dtype() {
        DType::BF16 => {
            let v: &[half::bf16] = cpu_slice(&storage, layout)?;
            f(&v.iter().map(|b| b.to_f32()).collect::<Vec<_>>())
        }
        _ => f(cpu_slice(&storage, layout)?),
    })
}

/// `y` `[rows, out]` = `x` `[rows, in]` · Wᵀ (+ bias).
fn linear(
    dense: Option<&dyn DenseGemv>,
    l: &Linear,
    x: &[f32],
    rows: usize,
    y: &mut [f32],
) -> Result<()> {
    let n = l.out_features();
    match l.weights() {
        LinearWeight::Dense(w) => dense
            .context("fused decode: a dense layer without a dense GEMV")?
            .gemv(w, x, rows, y)?,
        LinearWeight::Packed(p) => p
            .host()
            .context("fused decode: a packed layer without a host kernel")?
            .matmul_host(x, rows, y),
    }
    if let Some(b) = l.bias() {
        with_f32(b, |b| {
            for row in y.chunks_exact_mut(n) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        })?;
    }
    Ok(())
}

/// `out = x / rms(x) · weight`, per row, exactly as candle's CPU `rms_norm` computes it.
fn rms_norm(norm: &RmsNorm, x: &[f32], out: &mut [f32]) -> Result<()> {
    with_f32(norm.weight(), |w| {
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
    attn: Vec<f32>,
    /// Per linear group, per linear (declared order): its output.
    outs: Vec<Vec<Vec<f32>>>,
}

/// One decode step: `ids` holds one token per sequence, at position `cache.len()`.
/// Returns logits `[batch, 1, vocab]` in the model's dtype. The caller
/// ([`CausalLm::forward_cached`]) has checked [`eligible`] and the cache's batch.
pub(crate) fn step(m: &CausalLm, ids: &[u32], cache: &mut super::KvCache) -> Result<Tensor> {
    let b = ids.len();
    debug_assert!(eligible(m, b));
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
    let mut s = Scratch {
        x: m.embed_rows(ids)?,
        xn: vec![0.0; b * h],
        attn: vec![0.0; b * heads.n * heads.dim],
        outs: LINEAR_GROUPS
            .iter()
            .map(|g| {
                g.linears
                    .iter()
                    .map(|l| vec![0.0; b * l.out.size(c)])
                    .collect()
            })
            .collect(),
    };
    let st = Step {
        batch: b,
        heads,
        cos: &cos,
        sin: &sin,
        pos,
        window: c.sliding_window,
        dtype: m.dtype(),
        dense: m.dense_gemv(),
    };
    // the whole step on a pool worker: the kernels' parallel loops then fork locally
    rayon::scope(|_| -> Result<()> {
        for (blk, layer) in m.blocks.iter().zip(cache.layers_mut()) {
            block(blk, layer, &mut s, &st)?;
        }
        Ok(())
    })?;
    // final norm and head
    rms_norm(m.final_norm_layer(), &s.x, &mut s.xn)?;
    let vocab = m.lm_head.out_features();
    let mut logits = vec![0f32; b * vocab];
    rayon::scope(|_| linear(m.dense_gemv(), &m.lm_head, &s.xn, b, &mut logits))?;
    Ok(Tensor::from_vec(logits, (b, 1, vocab), &Device::Cpu)?.to_dtype(m.dtype())?)
}

/// What every block of one step shares.
struct Step<'a> {
    batch: usize,
    heads: Heads,
    /// RoPE at `pos`.
    cos: &'a [f32],
    sin: &'a [f32],
    /// Position of the new tokens (= cached positions before the step).
    pos: usize,
    window: Option<usize>,
    /// Dtype of the KV cache (the model's).
    dtype: DType,
    /// The product for dense linears.
    dense: Option<&'a dyn DenseGemv>,
}

/// The linears of group `g` (`LINEAR_GROUPS[g]`) of `blk` on their shared input `x`
/// `[rows, in]`, into `outs` (one buffer per linear), as one parallel region.
fn group(
    st: &Step,
    blk: &DecoderBlock,
    g: usize,
    x: &[f32],
    rows: usize,
    outs: &mut [Vec<f32>],
) -> Result<()> {
    LINEAR_GROUPS[g]
        .linears
        .par_iter()
        .zip(outs.par_iter_mut())
        .try_for_each(|(l, y)| linear(st.dense, blk.linear(l.suffix)?, x, rows, y))
}

/// One block on host slices: the glue between the groups is `block.rs`'s (norms, RoPE,
/// attention over the cache, residuals, SwiGLU).
fn block(blk: &DecoderBlock, cache: &mut LayerKvCache, s: &mut Scratch, st: &Step) -> Result<()> {
    let Step {
        batch: b,
        heads,
        cos,
        sin,
        pos,
        window,
        dtype,
        ..
    } = *st;
    let [qkv, o, gate_up, down] = &mut s.outs[..] else {
        anyhow::bail!("the fused step knows a block of four linear groups")
    };
    rms_norm(&blk.input_layernorm, &s.x, &mut s.xn)?;
    group(st, blk, 0, &s.xn, b, qkv)?;
    let [q, k, v] = &mut qkv[..] else {
        anyhow::bail!("attention reads three projections")
    };
    rope(q, heads.dim, cos, sin);
    rope(k, heads.dim, cos, sin);
    // [b, kv_heads, 1, head_dim] is the memory order of `k`/`v` already
    let shape = (b, heads.kv, 1, heads.dim);
    cache.append(
        &Tensor::from_slice(k, shape, &Device::Cpu)?.to_dtype(dtype)?,
        &Tensor::from_slice(v, shape, &Device::Cpu)?.to_dtype(dtype)?,
    )?;
    let k0 = first_visible_key(pos, window);
    let (q, out) = (&*q, &mut s.attn);
    cache.with_host(|kv, capacity| match kv {
        HostKv::F32(k, v) => attend(q, k, v, capacity, k0, pos + 1, heads, out),
        HostKv::Bf16(k, v) => attend(q, k, v, capacity, k0, pos + 1, heads, out),
    })?;
    group(st, blk, 1, &s.attn, b, o)?;
    s.x.iter_mut().zip(&o[0]).for_each(|(x, o)| *x += o);

    rms_norm(&blk.post_attention_layernorm, &s.x, &mut s.xn)?;
    group(st, blk, 2, &s.xn, b, gate_up)?;
    let [gate, up] = &mut gate_up[..] else {
        anyhow::bail!("SwiGLU reads two projections")
    };
    for (g, u) in gate.iter_mut().zip(&*up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
    if let Some(r) = &blk.mlp.down_input {
        gate.chunks_exact_mut(r.order())
            .for_each(|row| r.apply_row(row));
    }
    group(st, blk, 3, gate, b, down)?;
    s.x.iter_mut().zip(&down[0]).for_each(|(x, o)| *x += o);
    Ok(())
}

/// An element of the KV cache: f32, or bf16 bits (widened to f32 exactly on load).
trait KvElem: Copy + Send + Sync {
    fn f32(self) -> f32;
    /// 16 consecutive elements as f32.
    ///
    /// # Safety
    /// `p` must point to 16 readable elements, on a CPU with AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    fn f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl KvElem for u16 {
    fn f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// Keys per attention task: enough to amortise a task, few enough that a short context
/// still splits over both cores.
const KEY_CHUNK: usize = 128;

/// Softmax attention of each sequence's query heads `q` `[b, heads, dim]` over cached
/// positions `k0..end` of `keys`/`values` `[b, kv_heads, capacity, dim]`, into `out`
/// `[b, heads, dim]`.
///
/// Split like flash-decoding: one task per (sequence, KV head, chunk of keys) handles all
/// the query heads sharing that KV head, so each cached key and value is read once per
/// step (the cache, not the weights, is the larger read at long contexts); each task keeps
/// its chunk's running max, sum and weighted values, and the chunks are merged after.
#[allow(clippy::too_many_arguments)]
fn attend<T: KvElem>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    capacity: usize,
    k0: usize,
    end: usize,
    heads: Heads,
    out: &mut [f32],
) {
    let d = heads.dim;
    let group = heads.n / heads.kv;
    let scale = 1.0 / (d as f32).sqrt();
    let chunks = (end - k0).div_ceil(KEY_CHUNK);
    let b = q.len() / (heads.n * d);
    // per task and query head of its group: [max, sum, weighted values (d)]
    let part_len = group * (d + 2);
    let mut parts = vec![0f32; b * heads.kv * chunks * part_len];
    parts
        .par_chunks_mut(part_len)
        .enumerate()
        .for_each(|(i, part)| {
            let (seq_kv, c) = (i / chunks, i % chunks);
            let (from, to) = (k0 + c * KEY_CHUNK, (k0 + (c + 1) * KEY_CHUNK).min(end));
            let base = (seq_kv * capacity + from) * d;
            let len = (to - from) * d;
            // the group's query heads are consecutive: heads kv·g .. kv·g + g
            let qg = &q[seq_kv * group * d..(seq_kv + 1) * group * d];
            attend_chunk(
                qg,
                &keys[base..base + len],
                &values[base..base + len],
                d,
                scale,
                part,
            );
        });
    // merge the chunks of each (sequence, query head)
    for (i, o) in out.chunks_exact_mut(d).enumerate() {
        let (seq_kv, h) = (i / group, i % group);
        let chunk_parts = |c: usize| {
            let p = &parts[(seq_kv * chunks + c) * part_len + h * (d + 2)..][..d + 2];
            (p[0], p[1], &p[2..])
        };
        let max = (0..chunks).fold(f32::NEG_INFINITY, |m, c| m.max(chunk_parts(c).0));
        let mut sum = 0f32;
        o.iter_mut().for_each(|v| *v = 0.0);
        for c in 0..chunks {
            let (m, l, acc) = chunk_parts(c);
            let w = (m - max).exp();
            sum += w * l;
            o.iter_mut().zip(acc).for_each(|(v, a)| *v += w * a);
        }
        o.iter_mut().for_each(|v| *v /= sum);
    }
}

/// One chunk of keys against a group of query heads `qg` `[group, d]`: per head
/// `[max, Σ exp, Σ exp·v]` into `part` `[group, d + 2]`.
fn attend_chunk<T: KvElem>(
    qg: &[f32],
    keys: &[T],
    values: &[T],
    d: usize,
    scale: f32,
    part: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected at run time.
        unsafe {
            match d {
                64 => return x86::attend_chunk::<4, T>(qg, keys, values, scale, part),
                128 => return x86::attend_chunk::<8, T>(qg, keys, values, scale, part),
                _ => {}
            }
        }
    }
    attend_chunk_portable(qg, keys, values, d, scale, part)
}

fn attend_chunk_portable<T: KvElem>(
    qg: &[f32],
    keys: &[T],
    values: &[T],
    d: usize,
    scale: f32,
    part: &mut [f32],
) {
    let n = keys.len() / d;
    let mut scores = vec![0f32; (qg.len() / d) * n];
    for (j, k) in keys.chunks_exact(d).enumerate() {
        for (h, qh) in qg.chunks_exact(d).enumerate() {
            scores[h * n + j] = qh.iter().zip(k).map(|(a, b)| a * b.f32()).sum::<f32>() * scale;
        }
    }
    for (s, p) in scores.chunks_exact_mut(n).zip(part.chunks_exact_mut(d + 2)) {
        let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        s.iter_mut().for_each(|v| *v = exp_poly(*v - max));
        p[0] = max;
        p[1] = s.iter().sum();
        let acc = &mut p[2..];
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (&w, v) in s.iter().zip(values.chunks_exact(d)) {
            acc.iter_mut().zip(v).for_each(|(a, v)| *a += w * v.f32());
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{exp_poly, KvElem};
    use std::arch::x86_64::*;

    /// [`super::attend_chunk`] for a head size of `16·V`: each score is one chain of `V`
    /// FMAs and a tree reduction, each head's weighted sum `V` registers.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn attend_chunk<const V: usize, T: KvElem>(
        qg: &[f32],
        keys: &[T],
        values: &[T],
        scale: f32,
        part: &mut [f32],
    ) {
        let d = 16 * V;
        let group = qg.len() / d;
        let n = keys.len() / d;
        let mut scores = vec![0f32; group * n];
        for h in 0..group {
            let mut q = [_mm512_setzero_ps(); V];
            for (v, qv) in q.iter_mut().enumerate() {
                *qv = _mm512_loadu_ps(qg.as_ptr().add(h * d + 16 * v));
            }
            for j in 0..n {
                let k = keys.as_ptr().add(j * d);
                let mut acc = _mm512_mul_ps(q[0], T::load16(k));
                for (v, &qv) in q.iter().enumerate().skip(1) {
                    acc = _mm512_fmadd_ps(qv, T::load16(k.add(16 * v)), acc);
                }
                scores[h * n + j] = _mm512_reduce_add_ps(acc) * scale;
            }
        }
        for (s, p) in scores.chunks_exact_mut(n).zip(part.chunks_exact_mut(d + 2)) {
            let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            s.iter_mut().for_each(|v| *v = exp_poly(*v - max));
            p[0] = max;
            p[1] = s.iter().sum();
            let mut acc = [_mm512_setzero_ps(); V];
            for (j, &w) in s.iter().enumerate() {
                let wv = _mm512_set1_ps(w);
                let vp = values.as_ptr().add(j * d);
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(wv, T::load16(vp.add(16 * v)), *a);
                }
            }
            for (v, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(p.as_mut_ptr().add(2 + 16 * v), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_attention_equals_one_softmax_in_float64() {
        // 2 sequences, 4 query heads on 2 KV heads, 300 cached keys (3 chunks), capacity 320
        let heads = Heads {
            n: 4,
            kv: 2,
            dim: 24,
        };
        let (b, cap, k0, end) = (2, 320, 7, 300);
        let mut s = 12345u64;
        let mut r = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        };
        let q: Vec<f32> = (0..b * heads.n * heads.dim).map(|_| r()).collect();
        let keys: Vec<f32> = (0..b * heads.kv * cap * heads.dim).map(|_| r()).collect();
        let values: Vec<f32> = (0..b * heads.kv * cap * heads.dim).map(|_| r()).collect();
        let mut out = vec![0f32; q.len()];
        attend(&q, &keys, &values, cap, k0, end, heads, &mut out);
        // a bf16 cache: the same values rounded to bf16, widened exactly in the kernel
        let bits = |v: &[f32]| -> Vec<u16> {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect()
        };
        let (kb, vb) = (bits(&keys), bits(&values));
        let mut out_b = vec![0f32; q.len()];
        attend(&q, &kb, &vb, cap, k0, end, heads, &mut out_b);
        let widen = |v: &[u16]| -> Vec<f32> { v.iter().map(|&b| b.f32()).collect() };
        let (keys_b, values_b) = (widen(&kb), widen(&vb));
        check_attention(&q, &keys_b, &values_b, &out_b, heads, cap, k0, end);
        check_attention(&q, &keys, &values, &out, heads, cap, k0, end);
    }

    #[allow(clippy::too_many_arguments)]
    fn check_attention(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        out: &[f32],
        heads: Heads,
        cap: usize,
        k0: usize,
        end: usize,
    ) {
        let b = q.len() / (heads.n * heads.dim);
        let d = heads.dim;
        for i in 0..b * heads.n {
            let (seq, h) = (i / heads.n, i % heads.n);
            let kv = seq * heads.kv + h / (heads.n / heads.kv);
            let row = |buf: &[f32], t: usize| buf[(kv * cap + t) * d..][..d].to_vec();
            let sc: Vec<f64> = (k0..end)
                .map(|t| {
                    let k = row(keys, t);
                    (0..d)
                        .map(|c| q[i * d + c] as f64 * k[c] as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = sc.iter().map(|v| (v - m).exp()).sum();
            for c in 0..d {
                let want: f64 = (k0..end)
                    .zip(&sc)
                    .map(|(t, v)| (v - m).exp() / z * row(values, t)[c] as f64)
                    .sum();
                let got = out[i * d + c] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "head size {d}, head {i} dim {c}: {got} vs {want}"
                );
            }
        }
    }
}
