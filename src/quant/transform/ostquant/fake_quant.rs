//! The student's weight quantizer during training (methods.md §6.4): symmetric, per row
//! or per group, the range searched anew at every forward (the shrink of `max |w|` with
//! the least squared error), rounded with a straight-through gradient. The gradient
//! passes where the weight fell inside the grid and is zero where it was clipped.

use rayon::prelude::*;

/// `x` rounded half to even and clamped to `[lo, hi]`: clamped first (to a range where
/// the trick is exact), then rounded by adding and subtracting 1.5 · 2²³, which leaves
/// the rounding to the FPU's round-to-nearest-even — plain adds that vectorise, where
/// `round_ties_even` is a library call per value without SSE4.1.
#[inline(always)]
fn round_even(x: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x.clamp(lo, hi) + MAGIC) - MAGIC
}

/// A symmetric `bits`-bit grid with codes `−2^(b−1) … 2^(b−1) − 1` (GPTQ's symmetric
/// convention: step `2·max / (2^b − 1)`), searched over `steps` shrinks of the range
/// `1, 1 − 1/grid, …`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FakeQuant {
    pub bits: u8,
    /// Columns per group; `0`: the whole row.
    pub group: usize,
    pub steps: usize,
    pub grid: usize,
}

impl FakeQuant {
    /// The paper's: 80 shrink steps on a grid of 100.
    pub fn new(bits: u8, group: usize) -> Self {
        Self {
            bits,
            group,
            steps: 80,
            grid: 100,
        }
    }

    fn code_range(&self) -> (f32, f32) {
        let half = 1i32 << (self.bits - 1);
        (-(half as f32), (half - 1) as f32)
    }

    /// The step of one group: the shrink of `max |w|` with the least squared error
    /// (`None` for an all-zero group).
    pub fn best_scale(&self, w: &[f32]) -> Option<f32> {
        let (lo, hi) = self.code_range();
        let maxq = ((1u32 << self.bits) - 1) as f32;
        let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max == 0.0 {
            return None;
        }
        let err = |scale: f32| -> f32 {
            let inv = 1.0 / scale;
            // 8 partial sums: a loop the compiler vectorises
            let mut acc = [0f32; 8];
            let mut chunks = w.chunks_exact(8);
            for c in &mut chunks {
                for (a, &v) in acc.iter_mut().zip(c) {
                    let d = round_even(v * inv, lo, hi) * scale - v;
                    *a += d * d;
                }
            }
            let tail: f32 = chunks
                .remainder()
                .iter()
                .map(|&v| {
                    let d = round_even(v * inv, lo, hi) * scale - v;
                    d * d
                })
                .sum();
            acc.iter().sum::<f32>() + tail
        };
        let mut best = (f32::INFINITY, 2.0 * max / maxq);
        for i in 0..self.steps.max(1) {
            let scale = 2.0 * max * (1.0 - i as f32 / self.grid as f32) / maxq;
            let e = err(scale);
            if e < best.0 {
                best = (e, scale);
            }
        }
        Some(best.1)
    }

    /// The quantized values of `w` (`[rows, cols]`) and the mask of unclipped entries.
    pub fn apply(&self, w: &[f32], cols: usize) -> (Vec<f32>, Vec<u8>) {
        let group = if self.group == 0 {
            cols
        } else {
            self.group.min(cols)
        };
        let mut q = vec![0f32; w.len()];
        let mut mask = vec![0u8; w.len()];
        let (lo, hi) = self.code_range();
        q.par_chunks_mut(cols)
            .zip(mask.par_chunks_mut(cols))
            .zip(w.par_chunks(cols))
            .for_each(|((q, mask), w)| {
                for ((q, mask), w) in q
                    .chunks_mut(group)
                    .zip(mask.chunks_mut(group))
                    .zip(w.chunks(group))
                {
                    let Some(scale) = self.best_scale(w) else {
                        q.fill(0.0);
                        mask.fill(1);
                        continue;
                    };
                    let inv = 1.0 / scale;
                    for ((q, m), &v) in q.iter_mut().zip(mask.iter_mut()).zip(w) {
                        let c = (v * inv).round_ties_even();
                        *m = u8::from((lo..=hi).contains(&c));
                        *q = c.clamp(lo, hi) * scale;
                    }
                }
            });
        (q, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_beats_min_max_and_masks_the_clipped() {
        // one outlier per row: shrinking the range below it lowers the error
        let cols = 64;
        let w: Vec<f32> = (0..2 * cols)
            .map(|i| {
                if i % cols == 3 {
                    1.2
                } else {
                    ((i * 37 % 17) as f32 - 8.0) / 16.0
                }
            })
            .collect();
        let fq = FakeQuant::new(3, 0);
        let (q, mask) = fq.apply(&w, cols);
        let (q0, _) = FakeQuant { steps: 1, ..fq }.apply(&w, cols);
        let sse = |q: &[f32]| -> f32 { q.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum() };
        assert!(sse(&q) < sse(&q0), "{} vs {}", sse(&q), sse(&q0));
        // every value is on the grid of its row; the clipped are exactly the masked-out
        for r in 0..2 {
            let row = &q[r * cols..(r + 1) * cols];
            let scale = fq.best_scale(&w[r * cols..(r + 1) * cols]).unwrap();
            assert!(scale * 3.0 < 1.2, "the outlier is clipped: {scale}");
            for (j, (&v, &m)) in row.iter().zip(&mask[r * cols..]).enumerate() {
                assert!(
                    ((v / scale).round() - v / scale).abs() < 1e-4,
                    "{v} {scale}"
                );
                let c = (w[r * cols + j] / scale).round_ties_even();
                assert_eq!(m == 0, !(-4.0..=3.0).contains(&c), "row {r} col {j}");
            }
        }
    }
}
