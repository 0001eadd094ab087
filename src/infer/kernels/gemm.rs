//! Large-batch (prefill) path: each rayon task owns a block of output rows, dequantizes a
//! small tile of it (`ROW_TILE × COL_TILE` f32, L2-sized) into its own buffer and hands it
//! to the `gemm` crate's f32 micro-kernels. No dequantized copy of the whole matrix ever
//! exists; the tile values are exactly the layer's weights (`scale · (code − zero)` for
//! the uniform layout, `scale · table[code]` for a codebook layer), so the result differs
//! from dequantize-then-matmul by f32 accumulation order only.

use super::super::layout::PackedLayout;
use crate::util::SharedOut;
use rayon::prelude::*;
use std::ops::Range;

/// A packed layer the tiled GEMM expands tile by tile.
pub trait TileSource: Sync {
    fn out_features(&self) -> usize;
    /// Input columns in the order the GEMM's `x` holds them.
    fn padded_in(&self) -> usize;
    /// The weights of `rows × cols` into `out` (`[rows, cols]`, row-major); `cols` starts
    /// on a multiple of [`COL_TILE`] and is at most that wide.
    fn dequantize_tile(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]);
}

impl TileSource for PackedLayout {
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn padded_in(&self) -> usize {
        self.padded_in
    }
    fn dequantize_tile(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        PackedLayout::dequantize_tile(self, rows, cols, out)
    }
}

/// Output rows per task/tile.
const ROW_TILE: usize = 64;
/// Padded input columns per tile (a multiple of 16 and 32): 64 × 512 × 4 B = 128 KiB.
const COL_TILE: usize = 512;

/// `y` `[m, out]` = `x` `[m, padded_in]` (padded order) · `Wᵀ`.
pub fn gemm(l: &impl TileSource, x: &[f32], m: usize, y: &mut [f32]) {
    let (n, kp) = (l.out_features(), l.padded_in());
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
