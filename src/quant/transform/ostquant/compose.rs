//! How the transforms enter one layer's weights (methods.md §6.3), as candle ops: the
//! same code builds the "virtual" weights of every training step (on variables, so the
//! gradient reaches the parameters) and the deployed weights after training (on plain
//! tensors), so the deployed model is the trained one.
//!
//! Two deliberate departures from the official code, both making the transform an exact
//! identity for any parameter values (we train from scratch, so nothing is lost):
//! `S_qk` is tied across RoPE's rotation pairs, and with `R4` on, `S_ud` scales `down`'s
//! columns before the offline Hadamard half (`W ← (W diag s) H/√n`), in the same basis in
//! which `up`'s rows are divided.

use super::params::{LayerParams, Widths};
use crate::model::OnlineHadamard;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// Index of each linear in [`crate::model::spec::BLOCK_LINEARS`] order.
pub const Q: usize = 0;
pub const K: usize = 1;
pub const V: usize = 2;
pub const O: usize = 3;
pub const GATE: usize = 4;
pub const UP: usize = 5;
pub const DOWN: usize = 6;

/// One layer of the source model with its RMSNorm weights already folded into the
/// readers (q/k/v and gate/up columns × γ): f32 `[out, in]` weights and biases.
#[derive(Debug, Clone)]
pub struct BaseLayer {
    pub w: [Tensor; 7],
    pub b: [Option<Tensor>; 7],
}

/// One layer's parameters as tensors (variables while training).
#[derive(Debug, Clone)]
pub struct LayerTensors {
    pub r1: Tensor,
    /// `[kv_heads, head_dim, head_dim]`.
    pub r2: Tensor,
    pub s_qkv: Tensor,
    pub s_ug: Tensor,
    /// `[kv_heads, head_dim / 2]`.
    pub s_qk: Tensor,
    pub s_ov: Tensor,
    pub s_ud: Tensor,
}

impl LayerTensors {
    pub fn new(r1: &[f32], p: &LayerParams, w: Widths, device: &Device) -> Result<Self> {
        let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, device);
        Ok(Self {
            r1: t(r1, &[w.hidden, w.hidden])?,
            r2: t(&p.r2, &[w.kv_heads, w.head_dim, w.head_dim])?,
            s_qkv: t(&p.s_qkv, &[w.hidden])?,
            s_ug: t(&p.s_ug, &[w.hidden])?,
            s_qk: t(&p.s_qk, &[w.kv_heads, w.head_dim / 2])?,
            s_ov: t(&p.s_ov, &[w.kv_dim()])?,
            s_ud: t(&p.s_ud, &[w.d_ff])?,
        })
    }
}

/// A layer after the transforms.
#[derive(Debug, Clone)]
pub struct ComposedLayer {
    pub w: [Tensor; 7],
    pub b: [Option<Tensor>; 7],
    pub input_norm: Tensor,
    pub post_norm: Tensor,
}

/// A per-KV-head vector `[kv_heads · head_dim]` repeated for each query head of its group.
fn per_query_head(v: &Tensor, w: Widths) -> Result<Tensor> {
    let g = w.heads / w.kv_heads;
    Ok(v.reshape((w.kv_heads, 1, w.head_dim))?
        .broadcast_as((w.kv_heads, g, w.head_dim))?
        .contiguous()?
        .reshape(w.heads * w.head_dim)?)
}

/// Apply the transforms to `base` (methods.md §6.3, in its order).
pub fn compose(
    base: &BaseLayer,
    p: &LayerTensors,
    w: Widths,
    r4: Option<&OnlineHadamard>,
) -> Result<ComposedLayer> {
    let rows = |t: &Tensor, s: &Tensor| t.broadcast_mul(&s.unsqueeze(1)?);
    let rows_div = |t: &Tensor, s: &Tensor| t.broadcast_div(&s.unsqueeze(1)?);
    let cols = |t: &Tensor, s: &Tensor| t.broadcast_mul(&s.unsqueeze(0)?);
    let [q, k, v, o, gate, up, down] = base.w.clone();
    let [bq, bk, bv, bo, bgate, bup, bdown] = base.b.clone();

    // 1. S_ud between up and down (and R4's offline half on down's input columns)
    let up = rows_div(&up, &p.s_ud)?;
    let bup = bup.map(|b| b.broadcast_div(&p.s_ud)).transpose()?;
    let mut down = cols(&down, &p.s_ud)?;
    if let Some(r4) = r4 {
        down = r4.forward(&down)?;
    }
    // 2. S_qk between k and q, the same factor on both halves of each rotary pair
    let s_k = Tensor::cat(&[&p.s_qk, &p.s_qk], 1)?.reshape(w.kv_dim())?;
    let s_q = per_query_head(&s_k, w)?;
    let k = rows(&k, &s_k)?;
    let bk = bk.map(|b| b.broadcast_mul(&s_k)).transpose()?;
    let q = rows_div(&q, &s_q)?;
    let bq = bq.map(|b| b.broadcast_div(&s_q)).transpose()?;
    // 3. S_ov between v and o
    let v = rows_div(&v, &p.s_ov)?;
    let bv = bv.map(|b| b.broadcast_div(&p.s_ov)).transpose()?;
    let o = cols(&o, &per_query_head(&p.s_ov, w)?)?;
    // 4. R1: readers W R1, writers R1ᵀ W (their biases b R1)
    let r1t = p.r1.t()?;
    let read = |t: &Tensor| t.matmul(&p.r1);
    let (q, k, v, gate, up) = (read(&q)?, read(&k)?, read(&v)?, read(&gate)?, read(&up)?);
    let o = r1t.matmul(&o)?;
    let down = r1t.matmul(&down)?;
    let row_r1 = |b: Tensor| b.unsqueeze(0)?.matmul(&p.r1)?.squeeze(0);
    let bo = bo.map(row_r1).transpose()?;
    let bdown = bdown.map(row_r1).transpose()?;
    // 5. R2 per KV head: v's rows R2ᵀ W_v,h, o's columns W_o,h R2_h for its query heads
    let (kvh, hd, d) = (w.kv_heads, w.head_dim, w.hidden);
    let v =
        p.r2.transpose(1, 2)?
            .matmul(&v.reshape((kvh, hd, d))?)?
            .reshape((kvh * hd, d))?;
    let bv = bv
        .map(|b| b.reshape((kvh, 1, hd))?.matmul(&p.r2)?.reshape(kvh * hd))
        .transpose()?;
    let g = w.heads / kvh;
    let r2q =
        p.r2.unsqueeze(1)?
            .broadcast_as((kvh, g, hd, hd))?
            .contiguous()?
            .reshape((w.heads, hd, hd))?;
    let o = o
        .reshape((d, w.heads, hd))?
        .transpose(0, 1)?
        .contiguous()?
        .matmul(&r2q)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((d, w.heads * hd))?;
    // 6. norm-side scalings: the norms carry 1/s, their readers' columns s
    let (q, k, v) = (
        cols(&q, &p.s_qkv)?,
        cols(&k, &p.s_qkv)?,
        cols(&v, &p.s_qkv)?,
    );
    let (gate, up) = (cols(&gate, &p.s_ug)?, cols(&up, &p.s_ug)?);
    Ok(ComposedLayer {
        w: [q, k, v, o, gate, up, down],
        b: [bq, bk, bv, bo, bgate, bup, bdown],
        input_norm: p.s_qkv.recip()?,
        post_norm: p.s_ug.recip()?,
    })
}
