//! ggml's search helpers, shared by the reference fits (`kquants`) and the importance-
//! weighted ones (`weighted`): `nearest_int`, the scale searches (`make_qx_quants`,
//! `make_q3_quants`, `make_qkx2_quants` — with weights it is also `make_qkx3_quants` —,
//! `make_qp_quants`) and IQ4_NL's table search, in ggml's f32 order of operations.

// The loops index several parallel arrays as ggml's C does, so each function can be read
// against its reference line by line (the order of f32 operations is what makes the bytes
// match).
#![allow(clippy::needless_range_loop)]

use super::kquants::IQ4_NL_VALUES;

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below this is all zero.
pub(super) const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round half to even through the float adder (valid for |v| < 2^22).
pub(super) fn nearest_int(v: f32) -> i32 {
    let biased = v + 12_582_912.0;
    (biased.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// The largest-magnitude value with its sign, the first one on ties.
pub(super) fn signed_absmax(x: &[f32]) -> (f32, f32) {
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
pub(super) fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [u8]) -> f32 {
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
pub(super) fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [u8]) -> f32 {
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

/// `make_qp_quants`: quantize non-negative `x` (sub-block scales or mins) to
/// `0..=nmax` against one scale, weighted by `qw`: 9 trial scales, then up to 5 sweeps of
/// single-code moves while the weighted least-squares fit improves. Returns the scale.
pub(super) fn make_qp_quants(nmax: i32, x: &[f32], l_out: &mut [u8], qw: &[f32]) -> f32 {
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

/// ggml's `best_index_int8` (the sorted-table search of the llama.cpp this matches):
/// the nearest level, the upper one on a tie.
pub(super) fn best_index(x: f32) -> usize {
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

/// IQ4_NL's block scale, weighted by `weights`: from the signed extreme on the table's −127
/// end, then the weighted least-squares scale at 15 trial scales.
pub(super) fn iq4_nl_scale(x: &[f32], weights: &[f32]) -> f32 {
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
