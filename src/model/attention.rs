//! Fused causal attention for CPU f32: softmax(Q Kᵀ / √d + mask) V computed tile by tile,
//! skipping the masked upper triangle and never materializing the `[heads, seq, seq]`
//! score tensor. Each rayon task owns one (batch, head, query tile); the two products
//! per tile are single-threaded GEMMs from the `gemm` crate (the kernels candle uses).

use crate::util::{softmax_in_place, SharedOut};
use gemm::Parallelism;
use rayon::prelude::*;

/// Query rows per task: small enough that a tile's scores stay in L2, large enough for
/// an efficient GEMM.
const QUERY_TILE: usize = 64;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    /// Keys further back than this are invisible (Mistral); `None` = full causal.
    pub window: Option<usize>,
}

/// `q`: `[batch, heads, seq, hd]`, `k`/`v`: `[batch, kv_heads, seq, hd]`, all contiguous.
/// Returns `[batch, seq, heads·hd]`, the layout the output projection reads.
pub fn causal_attention(q: &[f32], k: &[f32], v: &[f32], sh: AttentionShape) -> Vec<f32> {
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        seq,
        head_dim: hd,
        window,
    } = sh;
    assert_eq!(q.len(), batch * heads * seq * hd);
    assert_eq!(k.len(), batch * kv_heads * seq * hd);
    assert_eq!(v.len(), k.len());
    // uninitialized: each (batch, query, head) row is written by exactly one task's
    // second GEMM (read_dst false); zeroing it on the calling thread first faulted its
    // fresh pages in while the other core waited
    let len = batch * seq * heads * hd;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let out_ptr = SharedOut::from_ptr(out.spare_capacity_mut().as_mut_ptr() as *mut f32);
    let tiles = seq.div_ceil(QUERY_TILE);
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // longest tiles first: better load balance at the end of the parallel loop
    (0..batch * heads * tiles)
        .into_par_iter()
        .rev()
        .for_each_init(
            || vec![0f32; QUERY_TILE * seq],
            |scores, task| {
                let tile = task % tiles;
                let h = (task / tiles) % heads;
                let b = task / (tiles * heads);
                let kvh = h / group;
                let q0 = tile * QUERY_TILE;
                let rows = QUERY_TILE.min(seq - q0);
                let k_end = q0 + rows; // causal: no key beyond the last query of the tile
                let k_start = window.map_or(0, |w| (q0 + 1).saturating_sub(w));
                let keys = k_end - k_start;
                let q_tile = &q[((b * heads + h) * seq + q0) * hd..];
                let kv_base = ((b * kv_heads + kvh) * seq + k_start) * hd;
                let (k_tile, v_tile) = (&k[kv_base..], &v[kv_base..]);
                // scores[r, j] = scale · q[q0+r] · k[k_start+j]
                // SAFETY: all pointers address `rows × hd`, `keys × hd` and `rows × keys`
                // regions inside their slices, as the strides below describe.
                unsafe {
                    gemm::gemm(
                        rows,
                        keys,
                        hd,
                        scores.as_mut_ptr(),
                        1,
                        keys as isize,
                        false,
                        q_tile.as_ptr(),
                        1,
                        hd as isize,
                        k_tile.as_ptr(),
                        hd as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                for r in 0..rows {
                    let qi = q0 + r;
                    let row = &mut scores[r * keys..(r + 1) * keys];
                    let first = window.map_or(0, |w| (qi + 1).saturating_sub(w)) - k_start;
                    let last = qi - k_start; // inclusive
                    softmax_in_place(&mut row[first..=last]);
                    row[..first].iter_mut().for_each(|x| *x = 0.0);
                    row[last + 1..].iter_mut().for_each(|x| *x = 0.0);
                }
                // out[b, q0+r, h·hd..] = Σ_j p[r, j] · v[k_start+j]
                let row_stride = (heads * hd) as isize;
                // SAFETY: this task alone writes rows q0..q0+rows, columns h·hd..(h+1)·hd.
                unsafe {
                    let dst = out_ptr.at((b * seq + q0) * heads * hd + h * hd);
                    gemm::gemm(
                        rows,
                        hd,
                        keys,
                        dst,
                        1,
                        row_stride,
                        false,
                        scores.as_ptr(),
                        1,
                        keys as isize,
                        v_tile.as_ptr(),
                        1,
                        hd as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            },
        );
    // SAFETY: the tasks above wrote all `len` elements (every query tile of every head)
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(q: &[f32], k: &[f32], v: &[f32], sh: AttentionShape) -> Vec<f64> {
        let AttentionShape {
            batch,
            heads,
            kv_heads,
            seq,
            head_dim: hd,
            window,
        } = sh;
        let mut out = vec![0f64; batch * seq * heads * hd];
        for b in 0..batch {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                for i in 0..seq {
                    let qi = &q[((b * heads + h) * seq + i) * hd..][..hd];
                    let vis = |j: usize| j <= i && window.is_none_or(|w| i - j < w);
                    let s: Vec<f64> = (0..seq)
                        .map(|j| {
                            let kj = &k[((b * kv_heads + kvh) * seq + j) * hd..][..hd];
                            if vis(j) {
                                qi.iter()
                                    .zip(kj)
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                                    / (hd as f64).sqrt()
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        out[(b * seq + i) * heads * hd + h * hd + d] = (0..seq)
                            .map(|j| e[j] / z * v[((b * kv_heads + kvh) * seq + j) * hd + d] as f64)
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_float64_reference() {
        let mut x = 12345u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
                })
                .collect()
        };
        for sh in [
            AttentionShape {
                batch: 2,
                heads: 6,
                kv_heads: 2,
                seq: 150,
                head_dim: 16,
                window: None,
            },
            AttentionShape {
                batch: 1,
                heads: 3,
                kv_heads: 3,
                seq: 64,
                head_dim: 8,
                window: None,
            },
            AttentionShape {
                batch: 1,
                heads: 4,
                kv_heads: 1,
                seq: 131,
                head_dim: 10,
                window: Some(37),
            },
            AttentionShape {
                batch: 1,
                heads: 2,
                kv_heads: 1,
                seq: 1,
                head_dim: 4,
                window: None,
            },
        ] {
            let q = rnd(sh.batch * sh.heads * sh.seq * sh.head_dim);
            let k = rnd(sh.batch * sh.kv_heads * sh.seq * sh.head_dim);
            let v = rnd(k.len());
            let got = causal_attention(&q, &k, &v, sh);
            let want = reference(&q, &k, &v, sh);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-5, "{sh:?}: max error {err}");
        }
    }
}
