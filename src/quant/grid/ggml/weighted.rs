//! The fits ggml runs with an importance matrix (`quantize_row_qN_K_impl`,
//! `quantize_iq4_nl` with weights), weighted here by the Hessian's diagonal.

#![allow(clippy::needless_range_loop)]

use super::kquants::{
    f16_bytes, q6_k_scales, set_k4_header, set_q3_k_header, through_f16, BlockParams, GgmlKind,
    QK_K,
};
use super::search::{
    imatrix_weights, iq4_nl_scale, make_qkx2_quants, make_qp_quants, make_qx_quants_weighted,
    mean_square, GROUP_MAX_EPS,
};

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
            set_q3_k_header(&mut p, &ls, d);
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
            set_k4_header(&mut p, &ls, &lm, d, dmin);
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
                q6_k_scales(&mut p, &scales, max_scale);
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
