//! The K-quants (Q2_K … Q6_K: 256-weight super-blocks whose 16- or 32-weight sub-blocks
//! have their own scale, itself quantized against one f16 scale per super-block) and
//! IQ4_NL (32-weight blocks on a fixed non-uniform 16-level table).
//!
//! The encoders reproduce what `llama-quantize` writes without an importance matrix:
//! ggml's `quantize_row_qN_K_ref` for the K-quants and `quantize_iq4_nl` (7 scale tries)
//! for IQ4_NL, with the helpers they share (`make_qx_quants`, `make_q3_quants`,
//! `make_qkx2_quants`, `nearest_int`, `best_index_int8`) written out in the same f32
//! order of operations, so the bytes match. The decoders are the consumer's arithmetic.

// The loops index several parallel arrays as ggml's C does, so each function can be read
// against its reference line by line (the order of f32 operations is what makes the bytes
// match).
#![allow(clippy::needless_range_loop)]

use half::f16;

/// Weights per K-quant super-block.
pub const QK_K: usize = 256;
/// Weights per IQ4_NL block.
pub const QK4_NL: usize = 32;

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below this is all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// IQ4_NL's levels (`kvalues_iq4nl`), a scaled non-uniform 4-bit table.
pub const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// ggml's `nearest_int`: round half to even through the float adder (valid for |v| < 2^22).
fn nearest_int(v: f32) -> i32 {
    let biased = v + 12_582_912.0;
    (biased.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// The f32 an f16 stored at `b[at..at + 2]` holds.
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// f32 of the f16 rounding of `v`: what a block's stored scale reads back as.
fn through_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// The largest-magnitude value with its sign, the first one on ties.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

/// `make_qx_quants` with `rmse_type = 1` (weights `x²` unless `qw` is given): a symmetric
/// scale for codes `−nmax..nmax−1` (stored offset by `nmax`), the least-squares scale of
/// the rounding at 19 trial scales around `nmax / max`.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [u8]) -> f32 {
    make_qx_quants_weighted(nmax, x, l_out, None)
}

pub(super) fn make_qx_quants_weighted(
    nmax: i32,
    x: &[f32],
    l_out: &mut [u8],
    qw: Option<&[f32]>,
) -> f32 {
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for (i, &v) in x.iter().enumerate() {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = qw.map_or(v * v, |q| q[i]);
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let codes = |iscale: f32, l_out: &mut [u8]| {
        for (o, &v) in l_out.iter_mut().zip(x) {
            *o = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as u8;
        }
    };
    let iscale = -nmaxf / max;
    codes(iscale, l_out);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&i| i != 0) {
        let iscale = -(nmaxf + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            codes(iscale, l_out);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_q3_quants` with `do_rmse`: codes `−nmax..nmax−1` (stored offset by `nmax`) from
/// `nmax / max`, then up to 5 sweeps that move single codes while the `x²`-weighted
/// least-squares fit improves.
fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [u8]) -> f32 {
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut l = [0i32; 16];
    let l = &mut l[..x.len()];
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (li, &v) in l.iter_mut().zip(x) {
        *li = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        let w = v * v;
        sumlx += w * v * *li as f32;
        suml2 += w * *li as f32 * *li as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for (li, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let mut slx = sumlx - w * v * *li as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * *li as f32 * *li as f32;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *li {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    for (o, &li) in l_out.iter_mut().zip(l.iter()) {
        *o = (li + nmax) as u8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// `make_qkx2_quants`: an asymmetric fit `x ≈ scale·l − min` (codes `0..=nmax`, `min ≥ 0`)
/// that tries `nstep + 1` scales from `(nmax + rmin) / range` in steps of `rdelta`, each
/// with the weighted least-squares scale and offset of its rounding, and keeps the one with
/// the least weighted squared (or absolute, `use_mad`) error. Returns `(scale, min)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        best_error += weights[i] * err(scale * l as f32 + min - x[i]);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                cur_error += weights[i] * err(this_scale * aux[i] as f32 + this_min - x[i]);
            }
            if cur_error < best_error {
                l_out.copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
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

/// Q2_K/Q3_K's 2-bit code layout: 4 codes per byte, 32 apart, in two 128-weight halves.
fn push_2bit(out: &mut Vec<u8>, l: &[u8]) {
    for j in (0..QK_K).step_by(128) {
        for k in 0..32 {
            out.push(
                (l[j + k] & 3)
                    | (l[j + k + 32] & 3) << 2
                    | (l[j + k + 64] & 3) << 4
                    | (l[j + k + 96] & 3) << 6,
            );
        }
    }
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
fn q3_k_scale(sb: &[u8], j: usize) -> i32 {
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
    let mut sb = [0u8; 12];
    let mut d = 0f32;
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            let q = (nearest_int(iscale * scales[j]) as i8 as i32).clamp(-32, 31) + 32;
            if j < 8 {
                sb[j] = (q & 0xF) as u8;
            } else {
                sb[j - 8] |= ((q & 0xF) << 4) as u8;
            }
            sb[j % 4 + 8] |= ((q >> 4) << (2 * (j / 4))) as u8;
        }
        d = 1.0 / iscale;
    }
    let mut p = BlockParams::default();
    let dq = through_f16(d);
    for j in 0..16 {
        p.step[j] = dq * q3_k_scale(&sb, j) as f32;
    }
    p.header[..12].copy_from_slice(&sb);
    p.header[12..14].copy_from_slice(&f16_bytes(d));
    requantize(GgmlKind::Q3K, x, &p, &mut l);
    (p, l)
}

/// Q4_K/Q5_K's 6-bit scale and min of sub-block `j` (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
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
    let mut sb = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sb[j] = ls;
            sb[j + 4] = lm;
        } else {
            sb[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sb[j - 4] |= (ls >> 4) << 6;
            sb[j] |= (lm >> 4) << 6;
        }
    }
    let (d, dmin) = (max_scale / 63.0, max_min / 63.0);
    let (dq, mq) = (through_f16(d), through_f16(dmin));
    let mut p = BlockParams::default();
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &sb);
        p.step[j] = dq * sc as f32;
        p.offset[j] = mq * m as f32;
    }
    p.header[0..2].copy_from_slice(&f16_bytes(d));
    p.header[2..4].copy_from_slice(&f16_bytes(dmin));
    p.header[4..16].copy_from_slice(&sb);
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
    let iscale = -128.0 / max_scale;
    let d = 1.0 / iscale;
    let dq = through_f16(d);
    for j in 0..16 {
        let sc = nearest_int(iscale * scales[j]).min(127) as i8;
        p.header[j] = sc as u8;
        p.step[j] = dq * sc as f32;
    }
    p.header[16..18].copy_from_slice(&f16_bytes(d));
    requantize(GgmlKind::Q6K, x, &p, &mut l);
    (p, l)
}

/// `make_qp_quants`: quantize non-negative `x` (sub-block scales or mins) to
/// `0..=nmax` against one scale, weighted by `qw`: 9 trial scales, then up to 5 sweeps of
/// single-code moves while the weighted least-squares fit improves. Returns the scale.
fn make_qp_quants(nmax: i32, x: &[f32], l_out: &mut [u8], qw: &[f32]) -> f32 {
    let max = x.iter().fold(0f32, |m, &v| m.max(v));
    if max < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mse = |iscale: f32, clamp: bool| {
        let scale = 1.0 / iscale;
        let mut e = 0f32;
        for (&v, &w) in x.iter().zip(qw) {
            let mut l = nearest_int(iscale * v);
            if clamp {
                l = l.min(nmax);
            }
            let diff = v - scale * l as f32;
            e += w * diff * diff;
        }
        e
    };
    let mut iscale = nmaxf / max;
    let mut best_mse = mse(iscale, false);
    for is in (-4..=4).filter(|&i| i != 0) {
        let iscale_is = (0.1 * is as f32 + nmaxf) / max;
        let e = mse(iscale_is, true);
        if e < best_mse {
            best_mse = e;
            iscale = iscale_is;
        }
    }
    let mut l = [0i32; 16];
    let l = &mut l[..x.len()];
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for ((li, &v), &w) in l.iter_mut().zip(x).zip(qw) {
        *li = nearest_int(iscale * v).min(nmax);
        sumlx += w * v * *li as f32;
        suml2 += w * *li as f32 * *li as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for ((li, &v), &w) in l.iter_mut().zip(x).zip(qw) {
            let mut slx = sumlx - w * v * *li as f32;
            let mut sl2 = suml2 - w * *li as f32 * *li as f32;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(v * sl2 / slx).min(nmax);
                if new_l != *li {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    for (o, &li) in l_out.iter_mut().zip(l.iter()) {
        *o = li as u8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Per-weight importance as llama.cpp weighs an importance matrix: `qw·√(σ² + x²)`.
pub(super) fn imatrix_weights(x: &[f32], qw: &[f32], sigma2: f32) -> Vec<f32> {
    x.iter()
        .zip(qw)
        .map(|(&v, &q)| q * (sigma2 + v * v).sqrt())
        .collect()
}

pub(super) fn mean_square(x: &[f32]) -> f32 {
    let mut s = 0f32;
    for &v in x {
        s += v * v;
    }
    s / x.len() as f32
}

/// The fits ggml uses with an importance matrix (`quantize_row_qN_K_impl`,
/// `quantize_iq4_nl` with weights), here weighted by `importance` (the Hessian's diagonal,
/// which is what an importance matrix estimates). Returns the block's parameters; the
/// codes are the caller's (GPTQ's) to choose.
pub fn fit_weighted(kind: GgmlKind, x: &[f32], importance: &[f32]) -> BlockParams {
    let mut l = [0u8; QK_K];
    let mut p = BlockParams::default();
    match kind {
        GgmlKind::Q2K => {
            let w = imatrix_weights(x, importance, mean_square(x));
            let (mut scales, mut mins, mut sw) = ([0f32; 16], [0f32; 16], [0f32; 16]);
            for j in 0..16 {
                let r = 16 * j..16 * j + 16;
                sw[j] = w[r.clone()].iter().sum();
                (scales[j], mins[j]) = make_qkx2_quants(
                    3,
                    &x[r.clone()],
                    &w[r.clone()],
                    &mut l[r],
                    -0.9,
                    0.05,
                    36,
                    false,
                );
            }
            let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
            let dm = make_qp_quants(15, &scales, &mut ls, &sw);
            let mm = make_qp_quants(15, &mins, &mut lm, &sw);
            let (dq, mq) = (through_f16(dm), through_f16(mm));
            for j in 0..16 {
                p.header[j] = ls[j] | lm[j] << 4;
                p.step[j] = dq * ls[j] as f32;
                p.offset[j] = mq * lm[j] as f32;
            }
            p.header[16..18].copy_from_slice(&f16_bytes(dm));
            p.header[18..20].copy_from_slice(&f16_bytes(mm));
        }
        GgmlKind::Q3K => {
            let w = imatrix_weights(x, importance, 2.0 * mean_square(x));
            let (mut scales, mut sw) = ([0f32; 16], [0f32; 16]);
            for j in 0..16 {
                let r = 16 * j..16 * j + 16;
                sw[j] = w[r.clone()].iter().sum();
                scales[j] =
                    make_qx_quants_weighted(4, &x[r.clone()], &mut l[r.clone()], Some(&w[r]));
            }
            let mut ls = [0u8; 16];
            let d = make_qx_quants_weighted(32, &scales, &mut ls, Some(&sw));
            let mut sb = [0u8; 12];
            for (j, &q) in ls.iter().enumerate() {
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
        GgmlKind::Q4K | GgmlKind::Q5K => {
            let nmax = if kind == GgmlKind::Q4K { 15 } else { 31 };
            let w = imatrix_weights(x, importance, 2.0 * mean_square(x));
            let (mut scales, mut mins, mut sw) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            for j in 0..8 {
                let r = 32 * j..32 * j + 32;
                sw[j] = w[r.clone()].iter().sum();
                (scales[j], mins[j]) = make_qkx2_quants(
                    nmax,
                    &x[r.clone()],
                    &w[r.clone()],
                    &mut l[r],
                    -0.9,
                    0.05,
                    36,
                    false,
                );
            }
            let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
            let d = make_qp_quants(63, &scales, &mut ls, &sw);
            let dmin = make_qp_quants(63, &mins, &mut lm, &sw);
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
        GgmlKind::Q6K => {
            let mut scales = [0f32; 16];
            let (mut max_abs, mut max_scale) = (0f32, 0f32);
            for j in 0..16 {
                let r = 16 * j..16 * j + 16;
                scales[j] = make_qx_quants_weighted(
                    32,
                    &x[r.clone()],
                    &mut l[r.clone()],
                    Some(&importance[r]),
                );
                if scales[j].abs() > max_abs {
                    max_abs = scales[j].abs();
                    max_scale = scales[j];
                }
            }
            if max_abs >= GROUP_MAX_EPS {
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
        }
        GgmlKind::Iq4Nl => {
            let w = imatrix_weights(x, importance, 2.0 * mean_square(x));
            let d = iq4_nl_scale(x, &w);
            p.inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            p.step[0] = through_f16(d);
            p.header[..2].copy_from_slice(&f16_bytes(d));
        }
    }
    p
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

/// Append one block: header and codes in the type's layout.
pub fn pack(kind: GgmlKind, p: &BlockParams, l: &[u8], out: &mut Vec<u8>) {
    match kind {
        GgmlKind::Q2K => {
            out.extend_from_slice(&p.header[..16]);
            push_2bit(out, l);
            out.extend_from_slice(&p.header[16..20]);
        }
        GgmlKind::Q3K => {
            let mut hmask = [0u8; 32];
            let low: Vec<u8> = l
                .iter()
                .enumerate()
                .map(|(j, &c)| {
                    if c > 3 {
                        hmask[j % 32] |= 1 << (j / 32);
                        c - 4
                    } else {
                        c
                    }
                })
                .collect();
            out.extend_from_slice(&hmask);
            push_2bit(out, &low);
            out.extend_from_slice(&p.header[..14]);
        }
        GgmlKind::Q4K => {
            out.extend_from_slice(&p.header[..16]);
            for j in (0..QK_K).step_by(64) {
                out.extend((0..32).map(|k| (l[j + k] & 0xF) | l[j + k + 32] << 4));
            }
        }
        GgmlKind::Q5K => {
            out.extend_from_slice(&p.header[..16]);
            let mut qh = [0u8; 32];
            let mut ql = [0u8; 128];
            for (c, j) in (0..QK_K).step_by(64).enumerate() {
                for k in 0..32 {
                    let (l1, l2) = (l[j + k], l[j + k + 32]);
                    qh[k] |= (l1 >> 4 & 1) << (2 * c) | (l2 >> 4 & 1) << (2 * c + 1);
                    ql[32 * c + k] = (l1 & 0xF) | (l2 & 0xF) << 4;
                }
            }
            out.extend_from_slice(&qh);
            out.extend_from_slice(&ql);
        }
        GgmlKind::Q6K => {
            let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
            for (h, j) in (0..QK_K).step_by(128).enumerate() {
                for k in 0..32 {
                    let q = |o: usize| l[j + k + o];
                    ql[64 * h + k] = (q(0) & 0xF) | (q(64) & 0xF) << 4;
                    ql[64 * h + k + 32] = (q(32) & 0xF) | (q(96) & 0xF) << 4;
                    qh[32 * h + k] =
                        (q(0) >> 4) | (q(32) >> 4) << 2 | (q(64) >> 4) << 4 | (q(96) >> 4) << 6;
                }
            }
            out.extend_from_slice(&ql);
            out.extend_from_slice(&qh);
            out.extend_from_slice(&p.header[..18]);
        }
        GgmlKind::Iq4Nl => {
            out.extend_from_slice(&p.header[..2]);
            out.extend((0..16).map(|j| (l[j] & 0xF) | l[j + 16] << 4));
        }
    }
}

pub fn dequantize_q2_k(b: &[u8], out: &mut Vec<f32>) {
    let (sb, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for e in 0..QK_K {
        let (half, j, k) = (e / 128, (e % 128) / 32, e % 32);
        let code = (qs[32 * half + k] >> (2 * j)) & 3;
        let sc = sb[e / 16];
        let dl = d * (sc & 0xF) as f32;
        let ml = dmin * (sc >> 4) as f32;
        out.push(dl * code as f32 - ml);
    }
}

pub fn dequantize_q3_k(b: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, sb) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    for e in 0..QK_K {
        let (half, j, k) = (e / 128, (e % 128) / 32, e % 32);
        let low = ((qs[32 * half + k] >> (2 * j)) & 3) as i32;
        let high = hmask[k] & (1 << (e / 32)) != 0;
        let dl = d * q3_k_scale(sb, e / 16) as f32;
        out.push(dl * (low - if high { 0 } else { 4 }) as f32);
    }
}

pub fn dequantize_q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, sb, qs) = (f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[16..144]);
    for e in 0..QK_K {
        let (c, hi, k) = (e / 64, (e % 64) / 32, e % 32);
        let byte = qs[32 * c + k];
        let code = if hi == 0 { byte & 0xF } else { byte >> 4 };
        let (sc, m) = scale_min_k4(2 * c + hi, sb);
        out.push(d * sc as f32 * code as f32 - dmin * m as f32);
    }
}

pub fn dequantize_q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, sb) = (f16_at(b, 0), f16_at(b, 2), &b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for e in 0..QK_K {
        let (c, hi, k) = (e / 64, (e % 64) / 32, e % 32);
        let byte = qs[32 * c + k];
        let low = if hi == 0 { byte & 0xF } else { byte >> 4 };
        let high = if qh[k] & (1 << (2 * c + hi)) != 0 {
            16
        } else {
            0
        };
        let (sc, m) = scale_min_k4(2 * c + hi, sb);
        out.push(d * sc as f32 * (low + high) as f32 - dmin * m as f32);
    }
}

pub fn dequantize_q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for e in 0..QK_K {
        let (h, quarter, k) = (e / 128, (e % 128) / 32, e % 32);
        let low_byte = ql[64 * h + k + 32 * (quarter % 2)];
        let low = if quarter < 2 {
            low_byte & 0xF
        } else {
            low_byte >> 4
        };
        let high = (qh[32 * h + k] >> (2 * quarter)) & 3;
        let q = (low | high << 4) as i32 - 32;
        let s = sc[8 * h + k / 16 + 2 * quarter] as i8;
        out.push(d * s as f32 * q as f32);
    }
}

/// ggml's `best_index_int8` (the sorted-table search of the llama.cpp this matches):
/// the nearest level, the upper one on a tie.
fn best_index(x: f32) -> usize {
    let v = |i: usize| IQ4_NL_VALUES[i] as f32;
    if x <= v(0) {
        return 0;
    }
    if x >= v(15) {
        return 15;
    }
    let (mut ml, mut mu) = (0usize, 15usize);
    while mu - ml > 1 {
        let mid = (ml + mu) / 2;
        if x < v(mid) {
            mu = mid;
        } else {
            ml = mid;
        }
    }
    if x - v(mu - 1) < v(mu) - x {
        mu - 1
    } else {
        mu
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

/// IQ4_NL's block scale, weighted by `weights`: from the signed extreme on the table's −127
/// end, then the weighted least-squares scale at 15 trial scales.
fn iq4_nl_scale(x: &[f32], weights: &[f32]) -> f32 {
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let sums = |id: f32| {
        let (mut sumqx, mut sumq2) = (0f32, 0f32);
        for (&v, &w) in x.iter().zip(weights) {
            let q = IQ4_NL_VALUES[best_index(id * v)] as f32;
            sumqx += w * q * v;
            sumq2 += w * q * q;
        }
        (sumqx, sumq2)
    };
    let d0 = -max / IQ4_NL_VALUES[0] as f32;
    let (sumqx, sumq2) = sums(1.0 / d0);
    let mut d = sumqx / sumq2;
    let mut best = d * sumqx;
    for itry in -7..=7 {
        let id = (itry + IQ4_NL_VALUES[0] as i32) as f32 / max;
        let (sumqx, sumq2) = sums(id);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

pub fn dequantize_iq4_nl(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    for j in 0..QK4_NL {
        let byte = b[2 + j % 16];
        let q = if j < 16 { byte & 0xF } else { byte >> 4 };
        out.push(d * IQ4_NL_VALUES[q as usize] as f32);
    }
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
