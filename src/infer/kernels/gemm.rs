//! Large-batch (prefill) path: each rayon task owns a block of output rows, dequantizes a
//! small tile of it (`ROW_TILE × COL_TILE` f32, L2-sized) into its own buffer and hands it
//! to the `gemm` crate's f32 micro-kernels. No dequantized copy of the whole matrix ever
//! exists; the tile values are exactly `scale · (code − zero)`, so the result differs
//! from dequantize-then-matmul by f32 accumulation order only.

use super::super::layout::PackedLayout;
use crate::util::SharedOut;
use rayon::prelude::*;

/// Output rows per task/tile.
const ROW_TILE: usize = 64;
/// Padded input columns per tile (a multiple of 16): 64 × 512 × 4 B = 128 KiB.
const COL_TILE: usize = 512;

/// `y` `[m, out]` = `x` `[m, padded_in]` (padded order) · `Wᵀ`.
pub fn gemm(l: &PackedLayout, x: &[f32], m: usize, y: &mut [f32]) {
    let (n, kp) = (l.out_features, l.padded_in);
    debug_assert_eq!(y.len(), m * n);
    debug_assert_eq!(x.len(), m * kp);
    if kp == 0 {
        y.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let out = SharedOut::new(y);
    (0..n.div_ceil(ROW_TILE)).into_par_iter().for_each(|tile| {
        let rows = tile * ROW_TILE..((tile + 1) * ROW_TILE).min(n);
        let nr = rows.len();
        let mut buf = vec![0f32; nr * COL_TILE];
        for (ci, c0) in (0..kp).step_by(COL_TILE).enumerate() {
            let c1 = (c0 + COL_TILE).min(kp);
            let kc = c1 - c0;
            l.dequantize_tile(rows.clone(), c0..c1, &mut buf[..nr * kc]);
            // SAFETY: dst is y[:, rows] (row stride n), written by this task alone; lhs is
            // x[:, c0..c1] (row stride kp); rhs(k, j) = buf[j * kc + k]. All in bounds.
            unsafe {
                gemm::gemm(
                    m,
                    nr,
                    kc,
                    out.at(rows.start),
                    1,
                    n as isize,
                    ci > 0,
                    x.as_ptr().add(c0),
                    1,
                    kp as isize,
                    buf.as_ptr(),
                    kc as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
}
