//! The K-quants (Q2_K … Q6_K: 256-weight super-blocks whose 16- or 32-weight sub-blocks
//! have their own scale, itself quantized against one f16 scale per super-block) and
//! IQ4_NL (32-weight blocks on a fixed non-uniform 16-level table).
//!
//! The encoders reproduce what `llama-quantize` writes without an importance matrix:
//! ggml's `quantize_row_qN_K_ref` for the K-quants and `quantize_iq4_nl` (7 scale tries)
//! for IQ4_NL, with the helpers they share (`make_qx_quants`, `make_q3_quants`,
//! `make_qkx2_quants`, `nearest_int`, `best_index_int8`) written out in the same f32
//! order of operations, so the bytes match. The decoders are the consumer's arithmetic.
//! Here: the block parameters, the reference fits and the code of one weight; ggml's
//! search helpers are in `search`, the importance-weighted fits in `weighted`, the byte
//! layouts (packing, decoding) in `layout`.

// The loops index several parallel arrays as ggml's C does, so each function can be read
// against its reference line by line (the order of f32 operations is what makes the bytes
// match).
#![allow(clippy::needless_range_loop)]

use half::f16;

pub use super::layout::{
    dequantize_iq4_nl, dequantize_q2_k, dequantize_q3_k, dequantize_q4_k, dequantize_q5_k,
    dequantize_q6_k, pack,
};
pub(super) use super::search::{
    best_index, imatrix_weights, iq4_nl_scale, make_q3_quants, make_qkx2_quants, make_qx_quants,
    make_qx_quants_weighted, mean_square, nearest_int, GROUP_MAX_EPS,
};
pub use super::weighted::fit_weighted;

/// Weights per K-quant super-block.
pub const QK_K: usize = 256;
/// Weights per IQ4_NL block.
pub const QK4_NL: usize = 32;

/// IQ4_NL's levels (`kvalues_iq4nl`), a scaled non-uniform 4-bit table.
pub const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

pub(super) fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// The f32 an f16 stored at `b[at..at + 2]` holds.
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// f32 of the f16 rounding of `v`: what a block's stored scale reads back as.
pub(super) fn through_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// One block's parameters as its header stores them, and as each sub-block decodes:
/// the K-quants `value = step[s]·q − offset[s]` for sub-block `s` (`step = d·sc`,
/// `offset = dmin·m`); the 32-weight types and IQ4_NL use `step[0]` (their `d`),
/// `offset[0]` (Q4_1/Q5_1's `m`) and `inv`/`min`, the unrounded `1/d` and block minimum
/// their reference rounding divides and subtracts with.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockParams {
    pub step: [f32; 16],
    pub offset: [f32; 16],
    pub inv: f32,
    pub min: f32,
    /// The header bytes (scales, `d`, `dmin`) in the order [`pack`] writes them.
    pub header: [u8; 20],
}

/// Clamp a code argument into `nearest_int`'s valid range (a GPTQ-updated weight can lie
/// far outside its block's range); values inside it are unchanged.
fn bounded(v: f32) -> f32 {
    v.clamp(-4_000_000.0, 4_000_000.0)
}

/// Q2_K: 16 sub-blocks of 16, 4-bit scales and mins against f16 `d` and `dmin`.
/// Header: `scales[16]`, `d`, `dmin`.
pub fn fit_q2_k(x: &[f32]) -> (BlockParams, [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|k| xs[k].abs());
        let (s, m) = make_qkx2_quants(
            3,
            xs,
            &weights,
            &mut l[16 * j..16 * j + 16],
            -0.5,
            0.1,
            15,
            true,
        );
        (scales[j], mins[j]) = (s, m);
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let mut sb = [0u8; 16];
    let mut d = 0f32;
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for j in 0..16 {
            sb[j] = nearest_int(iscale * scales[j]) as u8;
        }
        d = max_scale / 15.0;
    }
    let mut dmin = 0f32;
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for j in 0..16 {
            sb[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        dmin = max_min / 15.0;
    }
    let mut p = BlockParams::default();
    let (dq, mq) = (through_f16(d), through_f16(dmin));
    for j in 0..16 {
        p.step[j] = dq * (sb[j] & 0xF) as f32;
        p.offset[j] = mq * (sb[j] >> 4) as f32;
    }
    p.header[..16].copy_from_slice(&sb);
    p.header[16..18].copy_from_slice(&f16_bytes(d));
    p.header[18..20].copy_from_slice(&f16_bytes(dmin));
    requantize(GgmlKind::Q2K, x, &p, &mut l);
    (p, l)
}

/// Q3_K's 6-bit scale `j` (offset by 32) from its 12 packed bytes.
pub(super) fn q3_k_scale(sb: &[u8], j: usize) -> i32 {
    let low = if j < 8 { sb[j] & 0xF } else { sb[j - 8] >> 4 };
    let high = (sb[8 + j % 4] >> (2 * (j / 4))) & 3;
    (low | high << 4) as i32 - 32
}

/// Q3_K: 16 symmetric sub-blocks of 16, 6-bit signed scales against f16 `d`.
/// Header: `scales[12]`, `d`.
pub fn fit_q3_k(x: &[f32]) -> (BlockParams, [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let (mut amax, mut max_scale) = (0f32, 0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }
    let mut q = [0u8; 16];
    let mut d = 0f32;
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            q[j] = ((nearest_int(iscale * scales[j]) as i8 as i32).clamp(-32, 31) + 32) as u8;
        }
        d = 1.0 / iscale;
    }
    let mut p = BlockParams::default();
    set_q3_k_header(&mut p, &q, d);
    requantize(GgmlKind::Q3K, x, &p, &mut l);
    (p, l)
}

/// Q3_K's header from its 16 six-bit scales (`q`, offset by 32) and `d`: the scales packed
/// in 12 bytes, each sub-block's step `f16(d)·(q − 32)`.
pub(super) fn set_q3_k_header(p: &mut BlockParams, q: &[u8; 16], d: f32) {
    let mut sb = [0u8; 12];
    for (j, &q) in q.iter().enumerate() {
        if j < 8 {
            sb[j] = q & 0xF;
        } else {
            sb[j - 8] |= (q & 0xF) << 4;
        }
        sb[j % 4 + 8] |= (q >> 4) << (2 * (j / 4));
    }
    let dq = through_f16(d);
    for j in 0..16 {
        p.step[j] = dq * q3_k_scale(&sb, j) as f32;
    }
    p.header[..12].copy_from_slice(&sb);
    p.header[12..14].copy_from_slice(&f16_bytes(d));
}

/// Q4_K/Q5_K's header from the 6-bit scales `ls` and mins `lm` of the 8 sub-blocks and
/// `d`, `dmin`: the 12 packed bytes, each sub-block's step `f16(d)·ls` and offset
/// `f16(dmin)·lm`.
pub(super) fn set_k4_header(p: &mut BlockParams, ls: &[u8; 8], lm: &[u8; 8], d: f32, dmin: f32) {
    let mut sb = [0u8; 12];
    for j in 0..8 {
        let (s6, m6) = (ls[j].min(63), lm[j].min(63));
        if j < 4 {
            sb[j] = s6;
            sb[j + 4] = m6;
        } else {
            sb[j + 4] = (s6 & 0xF) | ((m6 & 0xF) << 4);
            sb[j - 4] |= (s6 >> 4) << 6;
            sb[j] |= (m6 >> 4) << 6;
        }
    }
    let (dq, mq) = (through_f16(d), through_f16(dmin));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &sb);
        p.step[j] = dq * sc as f32;
        p.offset[j] = mq * m as f32;
    }
    p.header[0..2].copy_from_slice(&f16_bytes(d));
    p.header[2..4].copy_from_slice(&f16_bytes(dmin));
    p.header[4..16].copy_from_slice(&sb);
}

/// Q4_K/Q5_K's 6-bit scale and min of sub-block `j` (`get_scale_min_k4`).
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K (`nmax` 15) and Q5_K (31): 8 asymmetric sub-blocks of 32, 6-bit scales and mins
/// against f16 `d` and `dmin`. Header: `d`, `dmin`, `scales[12]`.
fn fit_k4(kind: GgmlKind, x: &[f32]) -> (BlockParams, [u8; QK_K]) {
    let (nmax, rmin, nstep) = if kind == GgmlKind::Q4K {
        (15, -1.0, 20)
    } else {
        (31, -0.5, 15)
    };
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|k| av_x + xs[k].abs());
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
        (scales[j], mins[j]) = (s, m);
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        ls[j] = nearest_int(inv_scale * scales[j]) as u8;
        lm[j] = nearest_int(inv_min * mins[j]) as u8;
    }
    let mut p = BlockParams::default();
    set_k4_header(&mut p, &ls, &lm, max_scale / 63.0, max_min / 63.0);
    requantize(kind, x, &p, &mut l);
    (p, l)
}

pub fn fit_q4_k(x: &[f32]) -> (BlockParams, [u8; QK_K]) {
    fit_k4(GgmlKind::Q4K, x)
}

pub fn fit_q5_k(x: &[f32]) -> (BlockParams, [u8; QK_K]) {
    fit_k4(GgmlKind::Q5K, x)
}

/// Q6_K: 16 symmetric sub-blocks of 16, 8-bit signed scales against f16 `d`.
/// Header: `scales[16]` (i8), `d`.
pub fn fit_q6_k(x: &[f32]) -> (BlockParams, [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_abs, mut max_scale) = (0f32, 0f32);
    for j in 0..16 {
        scales[j] = make_qx_quants(32, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > max_abs {
            max_abs = scales[j].abs();
            max_scale = scales[j];
        }
    }
    let mut p = BlockParams::default();
    if max_abs < GROUP_MAX_EPS {
        // ggml writes an all-zero block: codes 0 with scale 0
        return (p, [0u8; QK_K]);
    }
    q6_k_scales(&mut p, &scales, max_scale);
    requantize(GgmlKind::Q6K, x, &p, &mut l);
    (p, l)
}

/// Q6_K's header from its 16 sub-block scales: 8-bit signed scales against f16
/// `d = max_scale / −128` (the signed largest scale on the −128 end).
pub(super) fn q6_k_scales(p: &mut BlockParams, scales: &[f32; 16], max_scale: f32) {
    let iscale = -128.0 / max_scale;
    let d = 1.0 / iscale;
    let dq = through_f16(d);
    for j in 0..16 {
        let sc = nearest_int(iscale * scales[j]).min(127) as i8;
        p.header[j] = sc as u8;
        p.step[j] = dq * sc as f32;
    }
    p.header[16..18].copy_from_slice(&f16_bytes(d));
}

/// The reference quantizers' last step: every weight re-rounded against its sub-block's
/// quantized scale (and min); a sub-block whose scale quantized to zero keeps the codes
/// its own fit chose (any code decodes to the same value there).
fn requantize(kind: GgmlKind, x: &[f32], p: &BlockParams, l: &mut [u8; QK_K]) {
    let sub = kind.sub_block();
    for (j, (xs, ls)) in x.chunks(sub).zip(l.chunks_mut(sub)).enumerate() {
        if p.step[j] == 0.0 {
            continue;
        }
        for (o, &w) in ls.iter_mut().zip(xs) {
            *o = encode(kind, w, p, j * sub);
        }
    }
}

/// The block types this module encodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlKind {
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Iq4Nl,
}

impl GgmlKind {
    /// Weights per sub-block (one scale each).
    pub fn sub_block(self) -> usize {
        match self {
            Self::Q2K | Self::Q3K | Self::Q6K => 16,
            Self::Q4K | Self::Q5K | Self::Iq4Nl => 32,
        }
    }
}

/// The code of `w` at offset `col` in its block: nearest to `w` on its sub-block's grid, by
/// the reference quantizer's own arithmetic.
#[inline]
pub fn encode(kind: GgmlKind, w: f32, p: &BlockParams, col: usize) -> u8 {
    let s = col / kind.sub_block();
    let (d, off) = (p.step[s], p.offset[s]);
    if kind == GgmlKind::Iq4Nl {
        return best_index(p.inv * w) as u8;
    }
    if d == 0.0 {
        // every code decodes to −offset; the one ggml writes for a zero block
        return match kind {
            GgmlKind::Q3K => 4,
            GgmlKind::Q6K => 32,
            _ => 0,
        };
    }
    match kind {
        GgmlKind::Q2K => nearest_int(bounded((w + off) / d)).clamp(0, 3) as u8,
        GgmlKind::Q3K => (nearest_int(bounded(w / d)).clamp(-4, 3) + 4) as u8,
        GgmlKind::Q4K => nearest_int(bounded((w + off) / d)).clamp(0, 15) as u8,
        GgmlKind::Q5K => nearest_int(bounded((w + off) / d)).clamp(0, 31) as u8,
        GgmlKind::Q6K => (nearest_int(bounded(w / d)).clamp(-32, 31) + 32) as u8,
        GgmlKind::Iq4Nl => unreachable!(),
    }
}

/// The value of `code` at offset `col`, with the consumer's arithmetic.
#[inline]
pub fn decode(kind: GgmlKind, code: u8, p: &BlockParams, col: usize) -> f32 {
    let s = col / kind.sub_block();
    let q = code as i32;
    match kind {
        GgmlKind::Q2K | GgmlKind::Q4K | GgmlKind::Q5K => p.step[s] * q as f32 - p.offset[s],
        GgmlKind::Q3K => p.step[s] * (q - 4) as f32,
        GgmlKind::Q6K => p.step[s] * (q - 32) as f32,
        GgmlKind::Iq4Nl => p.step[0] * IQ4_NL_VALUES[code as usize & 15] as f32,
    }
}

/// IQ4_NL as `quantize_iq4_nl` writes it without an importance matrix: the scale from the
/// block's signed extreme on the table's −127 end, refined by the `x²`-weighted
/// least-squares scale over 15 trial scales, then every weight re-picked against it.
/// Header: `d`.
pub fn fit_iq4_nl(x: &[f32]) -> (BlockParams, [u8; QK4_NL]) {
    let w: Vec<f32> = x.iter().map(|v| v * v).collect();
    let d = iq4_nl_scale(x, &w);
    let mut p = BlockParams {
        inv: if d != 0.0 { 1.0 / d } else { 0.0 },
        ..BlockParams::default()
    };
    p.step[0] = through_f16(d);
    p.header[..2].copy_from_slice(&f16_bytes(d));
    let l: [u8; QK4_NL] = std::array::from_fn(|j| encode(GgmlKind::Iq4Nl, x[j], &p, j));
    (p, l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (v, want) in [
            (0.5f32, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (3.49, 3),
        ] {
            assert_eq!(nearest_int(v), want, "{v}");
        }
        for i in -5000..5000 {
            let v = i as f32 * 0.37;
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
    }

    #[test]
    fn best_index_picks_the_nearest_level() {
        for i in -1400..1400 {
            let x = i as f32 * 0.1;
            let got = IQ4_NL_VALUES[best_index(x)] as f32;
            let nearest = IQ4_NL_VALUES
                .iter()
                .map(|&v| (v as f32 - x).abs())
                .fold(f32::MAX, f32::min);
            assert!((got - x).abs() <= nearest + 1e-4, "{x}: {got}");
        }
    }

    /// The packed scale layouts decode to what was packed.
    #[test]
    fn packed_scales_round_trip() {
        // Q4_K/Q5_K: 8 six-bit scales and mins
        let ls: [u8; 8] = [0, 63, 17, 42, 5, 60, 33, 1];
        let lm: [u8; 8] = [63, 0, 9, 48, 31, 2, 62, 20];
        let mut sb = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                sb[j] = ls[j];
                sb[j + 4] = lm[j];
            } else {
                sb[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
                sb[j - 4] |= (ls[j] >> 4) << 6;
                sb[j] |= (lm[j] >> 4) << 6;
            }
        }
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &sb), (ls[j], lm[j]), "sub-block {j}");
        }
    }
}
