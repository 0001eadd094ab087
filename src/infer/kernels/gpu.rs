//! What the GPU launchers (`cuda.rs`, `metal.rs`) share, compiled in every build so the
//! default test suite checks it: the launch geometry of `kernels/bitsmith_matmul.{cu,metal}`
//! and the host-side tables a launcher uploads once per layer and device.

use super::super::layout::PackedLayout;

/// Threads per GEMV block (8 warps / simdgroups); `GEMV_THREADS` in the kernels.
pub const GEMV_THREADS: u32 = 256;
/// Threads per GEMM block; the GEMM's output tile is `GEMM_TILE × GEMM_TILE`.
pub const GEMM_THREADS: u32 = 256;
pub const GEMM_TILE: u32 = 64;

/// Rows per warp of the GEMV for a layer with `n_chunks` chunks per row: 1 when a row has
/// at least 8 chunks (one per 4-lane quad), else the largest power of two ≤ 8 that keeps
/// `rows · n_chunks ≤ 8`. `bitsmith_gemv_rows_per_warp` in the kernels.
pub fn gemv_rows_per_warp(n_chunks: usize) -> u32 {
    let mut r = 1;
    while r < 8 && (r * 2) * n_chunks <= 8 {
        r *= 2;
    }
    r as u32
}

/// GEMV grid (blocks of [`GEMV_THREADS`]) for `n` output rows.
pub fn gemv_blocks(n: usize, rows_per_warp: u32) -> u32 {
    let rows_per_block = (GEMV_THREADS / 32 * rows_per_warp) as usize;
    n.div_ceil(rows_per_block) as u32
}

/// GEMM grid `(x, y)` for `m` input rows and `n` output rows.
pub fn gemm_blocks(m: usize, n: usize) -> (u32, u32) {
    (
        n.div_ceil(GEMM_TILE as usize) as u32,
        m.div_ceil(GEMM_TILE as usize) as u32,
    )
}

/// Everything a launcher uploads for one layer, flattened to `u32` (see the kernels'
/// argument lists). `gather` maps padded columns to input columns, [`super::super::layout::PAD`]
/// mapped to `in_features` (a zero column the launcher appends), so a plain index-select
/// does the gather on the device.
#[derive(Debug, Clone)]
pub struct GpuTables {
    pub words: Vec<u32>,
    pub params: Vec<u32>,
    /// `[n_spans, 5]`: the kernels' `Span` struct.
    pub spans: Vec<u32>,
    /// `[n_chunks, 4]`: the GEMV's work list ([`PackedLayout::gemv_chunks`]).
    pub chunks: Vec<u32>,
    /// `[padded_in / 16]`: the GEMM's slot → span table.
    pub slot_spans: Vec<u32>,
    pub gather: Option<Vec<u32>>,
    pub n_spans: usize,
    pub n_chunks: usize,
    pub rows_per_warp: u32,
}

impl GpuTables {
    pub fn new(l: &PackedLayout) -> Self {
        let chunks = l.gemv_chunks();
        let n_chunks = chunks.len();
        Self {
            words: l.words.clone(),
            params: l.params.clone(),
            spans: l.gpu_spans().into_iter().flatten().collect(),
            chunks: chunks.into_iter().flatten().collect(),
            slot_spans: l.slot_spans(),
            gather: l.gather.as_ref().map(|g| {
                g.iter()
                    .map(|&j| {
                        if j == super::super::layout::PAD {
                            l.in_features as u32
                        } else {
                            j
                        }
                    })
                    .collect()
            }),
            n_spans: l.spans.len(),
            n_chunks,
            rows_per_warp: gemv_rows_per_warp(n_chunks),
        }
    }
}

/// A line-for-line host emulation of `bitsmith_gemv_m*` (the lane/quad/chunk walk, the 2²³
/// code trick, the shuffle tree) and of `bitsmith_gemm`'s indexing, on `x` already in the
/// padded order. It exists so that CPU-only builds test the tables and index arithmetic the
/// GPU kernels rely on (`tests/gpu_layout.rs`); it is not a kernel.
pub mod emulate {
    use super::*;

    fn scale_of(p: u32) -> f32 {
        half::f16::from_bits(p as u16).to_f32()
    }

    /// `y [m, n]` as `bitsmith_gemv_m{m}` computes it (m ≤ 8).
    pub fn gemv(l: &PackedLayout, t: &GpuTables, x: &[f32], m: usize) -> Vec<f32> {
        let (n, kp) = (l.out_features, l.padded_in);
        let rpw = t.rows_per_warp as usize;
        let lanes_per_row = 32 / rpw;
        let quads_per_row = lanes_per_row / 4;
        let mut y = vec![0f32; m * n];
        for row in 0..n {
            // per lane of this row's lane group: tot[m]
            let mut lanes = vec![vec![0f32; m]; lanes_per_row];
            for (li, tot) in lanes.iter_mut().enumerate() {
                let (quad, q) = (li >> 2, li & 3);
                let mut c = quad;
                while c < t.n_chunks {
                    let ch = &t.chunks[4 * c..4 * c + 4];
                    let w0 = row * l.row_words + 4 * q + ch[0] as usize;
                    let w = &l.words[w0..w0 + 4];
                    let p = t.params[row * t.n_spans + ch[1] as usize];
                    let (s, zb) = (scale_of(p), 8388608f32 + (p >> 16) as f32);
                    let (bits, t_lo, t_hi) = (ch[3] & 0xff, (ch[3] >> 8) & 0xff, ch[3] >> 16);
                    let col = ch[2] as usize + 4 * q;
                    let mask = (1u32 << bits) - 1;
                    let mut acc = vec![0f32; m];
                    for tt in 0..32 / bits {
                        if tt < t_lo || tt >= t_hi {
                            continue;
                        }
                        let qv: Vec<f32> = w
                            .iter()
                            .map(|&wd| {
                                f32::from_bits(0x4b00_0000 | ((wd >> (tt * bits)) & mask)) - zb
                            })
                            .collect();
                        for (mi, a) in acc.iter_mut().enumerate() {
                            let xo = mi * kp + col + 16 * tt as usize;
                            for (cc, &qc) in qv.iter().enumerate() {
                                *a = qc.mul_add(x[xo + cc], *a);
                            }
                        }
                    }
                    for (tm, a) in tot.iter_mut().zip(&acc) {
                        *tm = a.mul_add(s, *tm);
                    }
                    c += quads_per_row;
                }
            }
            // shuffle-xor tree: after it, lane 0 holds the sum
            let mut o = lanes_per_row >> 1;
            while o > 0 {
                let prev = lanes.clone();
                for (li, lane) in lanes.iter_mut().enumerate() {
                    for (v, pv) in lane.iter_mut().zip(&prev[li ^ o]) {
                        *v += pv;
                    }
                }
                o >>= 1;
            }
            for mi in 0..m {
                y[mi * n + row] = lanes[0][mi];
            }
        }
        y
    }

    /// `y [m, n]` with `bitsmith_gemm`'s weight indexing (plain f32 sums per slot).
    pub fn gemm(l: &PackedLayout, t: &GpuTables, x: &[f32], m: usize) -> Vec<f32> {
        let (n, kp) = (l.out_features, l.padded_in);
        let mut y = vec![0f32; m * n];
        for k0 in (0..kp).step_by(16) {
            let g = k0 / 16;
            let si = t.slot_spans[g] as usize;
            let sp = &t.spans[5 * si..5 * si + 5];
            let (bits, col0, tile_word0, t0) = (sp[0], sp[2], sp[3], sp[4]);
            let spt = 32 / bits;
            let mask = (1u32 << bits) - 1;
            let slot = t0 + g as u32 - col0 / 16;
            let (tile, tt) = (slot / spt, slot % spt);
            for j in 0..n {
                let p = t.params[j * t.n_spans + si];
                for k in 0..16 {
                    let wd = l.words[j * l.row_words + (tile_word0 + tile * 16) as usize + k];
                    let v = scale_of(p) * (((wd >> (tt * bits)) & mask) as f32 - (p >> 16) as f32);
                    for i in 0..m {
                        y[i * n + j] = x[i * kp + k0 + k].mul_add(v, y[i * n + j]);
                    }
                }
            }
        }
        y
    }
}
