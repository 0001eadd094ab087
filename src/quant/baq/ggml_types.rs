//! BAQ's model-wide allocation over GGML block types (beyond the paper, and beyond
//! llama.cpp's fixed mixes): one size budget for all linears of a GGUF file, each linear
//! given the block type where a byte buys the most modeled loss reduction.
//!
//! The loss model: a linear's GPTQ loss on type `t` is its measured pass-1 loss (BAQ's
//! per-channel GPTQ at 4 bits, summed over columns) scaled by how much smaller `t`'s
//! round-to-nearest error on the layer's own weights is than that of the 4-bit per-channel
//! grid: `ℓ_j(t) = L_j · e_j(t) / e_j(w4)`. `L_j` carries what the Hessian says about the
//! layer's sensitivity, `e_j` what each type's block structure does to its weights (Q4_K's
//! sub-block scales beat Q4_0 at the same size; an outlier-heavy layer gains more from
//! Q8_0). The choice is a multiple-choice knapsack solved greedily on each layer's lower
//! convex hull of (bytes, loss), steps taken by loss drop per byte while the budget holds.

use super::allocation::Step;
use crate::loader::WeightStore;
use crate::model::LinearSpec;
use crate::quant::allocation::{Allocation, LayerPlan, Measurement};
use crate::quant::grid::ggml::{dequantize_row, quantize_row};
use crate::quant::grid::{GgmlGrid, GgmlType, GroupSize, UniformGrid};
use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// The width pass 1 measures at, and the grid the loss ratios are taken against.
pub const MEASURE_BITS: u8 = 4;

/// One block type a linear can take: its stored size and modeled loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TypeChoice {
    pub ty: GgmlType,
    pub bytes: u64,
    pub loss: f64,
}

/// The choices worth taking, cheapest first: those on the lower convex hull of
/// (bytes, loss), each strictly cheaper in loss than the one before.
fn hull(choices: &[TypeChoice]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..choices.len()).collect();
    order.sort_by(|&a, &b| {
        (choices[a].bytes, choices[a].loss)
            .partial_cmp(&(choices[b].bytes, choices[b].loss))
            .unwrap_or(Ordering::Equal)
    });
    let mut h: Vec<usize> = vec![];
    for i in order {
        let c = choices[i];
        // same size or no better than the last kept: never worth its bytes
        if let Some(&last) = h.last() {
            if c.loss >= choices[last].loss {
                continue;
            }
            if c.bytes == choices[last].bytes {
                h.pop();
            }
        }
        // drop kept points above the segment from the one before them to this one
        while h.len() >= 2 {
            let (a, b) = (choices[h[h.len() - 2]], choices[h[h.len() - 1]]);
            let slope_ab = (b.loss - a.loss) / (b.bytes - a.bytes) as f64;
            let slope_ac = (c.loss - a.loss) / (c.bytes - a.bytes) as f64;
            if slope_ac <= slope_ab {
                h.pop();
            } else {
                break;
            }
        }
        h.push(i);
    }
    h
}

/// For every layer, the index of its chosen type in `layers[l]`, with the total stored
/// size at most `budget_bytes`.
pub fn allocate_types(layers: &[Vec<TypeChoice>], budget_bytes: u64) -> Result<Vec<usize>> {
    let hulls: Vec<Vec<usize>> = layers.iter().map(|c| hull(c)).collect();
    ensure!(
        hulls.iter().all(|h| !h.is_empty()),
        "every layer needs at least one type"
    );
    let mut at = vec![0usize; layers.len()];
    let mut spent: u64 = hulls.iter().zip(layers).map(|(h, c)| c[h[0]].bytes).sum();
    ensure!(
        spent <= budget_bytes,
        "the budget ({budget_bytes} bytes) cannot hold every linear in its smallest type \
         ({spent} bytes)"
    );
    let step = |l: usize, i: usize| -> Option<Step> {
        let (a, b) = (layers[l][hulls[l][i]], layers[l][*hulls[l].get(i + 1)?]);
        // a step up layer `l`'s hull (`column` names the layer; ties to the earlier one)
        Some(Step {
            gain: (a.loss - b.loss) / (b.bytes - a.bytes) as f64,
            column: l,
        })
    };
    let mut heap: BinaryHeap<Step> = (0..layers.len()).filter_map(|l| step(l, 0)).collect();
    while let Some(Step { column: l, .. }) = heap.pop() {
        let i = at[l];
        let (a, b) = (layers[l][hulls[l][i]], layers[l][hulls[l][i + 1]]);
        let delta = b.bytes - a.bytes;
        if spent + delta > budget_bytes {
            // this layer's next steps cost more per byte of loss: it stays here
            continue;
        }
        spent += delta;
        at[l] = i + 1;
        if let Some(s) = step(l, i + 1) {
            heap.push(s);
        }
    }
    Ok(at.iter().zip(&hulls).map(|(&i, h)| h[i]).collect())
}

/// Squared round-to-nearest error of `w` (`[n, k]`) on `ty`'s blocks.
fn type_error(ty: GgmlType, w: &[f32], k: usize) -> Result<f64> {
    let mut bytes = vec![];
    let mut err = 0.0f64;
    for row in w.chunks_exact(k) {
        bytes.clear();
        quantize_row(ty, row, &mut bytes)?;
        let back = dequantize_row(ty, &bytes)?;
        err += row
            .iter()
            .zip(&back)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
    }
    Ok(err)
}

/// Squared round-to-nearest error of `w` on the per-channel asymmetric grid pass 1 ran.
fn reference_error(w: &[f32], k: usize) -> Result<f64> {
    let grid = UniformGrid::new(MEASURE_BITS, GroupSize::PerChannel, false)?;
    Ok(w.chunks_exact(k)
        .map(|row| {
            let p = grid.fit(row);
            row.iter()
                .map(|&v| ((v - grid.fake_quant(v, p)) as f64).powi(2))
                .sum::<f64>()
        })
        .sum())
}

/// BAQ over GGML block types: every linear on the type the model-wide budget gives it.
pub struct GgmlTypeAllocation {
    /// Stored bits per quantized weight over all linears (blocks with their scales).
    pub bits: f64,
    /// The types a linear may take (those whose blocks tile its rows).
    pub types: Vec<GgmlType>,
    /// The weights the linears are rounded from (after any transform).
    pub store: WeightStore,
}

impl GgmlTypeAllocation {
    /// Every candidate type of `s` with its size and modeled loss.
    fn choices(&self, s: &LinearSpec, measured: &[f64]) -> Result<Vec<TypeChoice>> {
        let (n, k) = (s.out_features, s.in_features);
        let w = self.store.f32_vec(&format!("{}.weight", s.name), &[n, k])?;
        let loss: f64 = measured.iter().sum();
        let reference = reference_error(&w, k)?;
        let fitting: Vec<GgmlType> = self
            .types
            .iter()
            .copied()
            .filter(|t| k.is_multiple_of(t.block_size()))
            .collect();
        ensure!(
            !fitting.is_empty(),
            "no allowed type tiles the {k} columns of `{}` (allowed: {:?})",
            s.name,
            self.types.iter().map(|t| t.name()).collect::<Vec<_>>()
        );
        fitting
            .into_iter()
            .map(|ty| {
                let e = type_error(ty, &w, k)?;
                Ok(TypeChoice {
                    ty,
                    bytes: (n * k / ty.block_size() * ty.type_size()) as u64,
                    // a layer that rounds exactly on the reference grid loses nothing
                    loss: if reference > 0.0 {
                        loss * e / reference
                    } else {
                        0.0
                    },
                })
            })
            .collect()
    }
}

impl Allocation for GgmlTypeAllocation {
    fn name(&self) -> &'static str {
        "baq-ggml"
    }

    fn measure_at(&self) -> Option<u8> {
        Some(MEASURE_BITS)
    }

    fn plan(
        &self,
        linears: &[LinearSpec],
        measurement: Option<&Measurement>,
    ) -> Result<HashMap<String, LayerPlan>> {
        let m = measurement.ok_or_else(|| anyhow!("BAQ needs pass-1 column losses"))?;
        if let Some(t) = self.types.iter().find(|t| t.is_float()) {
            bail!("{t} is a float type; the allocation chooses between block types");
        }
        let choices: Vec<Vec<TypeChoice>> = linears
            .par_iter()
            .map(|s| {
                let measured = m
                    .get(&s.name)
                    .ok_or_else(|| anyhow!("no pass-1 measurement for `{}`", s.name))?;
                self.choices(s, measured)
                    .with_context(|| format!("sizing the types of `{}`", s.name))
            })
            .collect::<Result<_>>()?;
        let weights: u64 = linears
            .iter()
            .map(|s| (s.out_features * s.in_features) as u64)
            .sum();
        let budget = (self.bits * weights as f64 / 8.0).floor() as u64;
        let picked = allocate_types(&choices, budget)
            .with_context(|| format!("{} bits per weight over the linears", self.bits))?;
        Ok(linears
            .iter()
            .zip(picked)
            .zip(&choices)
            .map(|((s, i), c)| (s.name.clone(), LayerPlan::Ggml(GgmlGrid { ty: c[i].ty })))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(ty: GgmlType, bytes: u64, loss: f64) -> TypeChoice {
        TypeChoice { ty, bytes, loss }
    }

    #[test]
    fn hull_drops_dominated_and_concave_choices() {
        use GgmlType::*;
        let choices = [
            c(Q8_0, 100, 1.0),
            c(Q4_0, 50, 10.0),
            c(Q4_1, 60, 9.9), // above the segment Q4_0 → Q5_0
            c(Q5_0, 60, 5.0),
            c(Q5_1, 70, 6.0),  // bigger and worse than Q5_0
            c(Iq4Nl, 50, 9.0), // same size as Q4_0, better
        ];
        let h: Vec<GgmlType> = hull(&choices).iter().map(|&i| choices[i].ty).collect();
        assert_eq!(h, [Iq4Nl, Q5_0, Q8_0]);
    }

    /// Against every combination: the greedy answer on convex hulls is within one step of
    /// the best, and here (steps of equal size) it is the best.
    #[test]
    fn greedy_matches_exhaustive_search_on_equal_steps() {
        use GgmlType::*;
        let layers = vec![
            vec![c(Q4_0, 10, 8.0), c(Q5_0, 12, 4.0), c(Q8_0, 14, 1.0)],
            vec![c(Q4_0, 10, 20.0), c(Q5_0, 12, 9.0), c(Q8_0, 14, 5.0)],
            vec![c(Q4_0, 10, 2.0), c(Q5_0, 12, 1.5), c(Q8_0, 14, 1.4)],
        ];
        for budget in 30..=42 {
            let got = allocate_types(&layers, budget).unwrap();
            let loss = |p: &[usize]| p.iter().zip(&layers).map(|(&i, l)| l[i].loss).sum::<f64>();
            let size = |p: &[usize]| p.iter().zip(&layers).map(|(&i, l)| l[i].bytes).sum::<u64>();
            assert!(size(&got) <= budget);
            let mut best = f64::INFINITY;
            for a in 0..3 {
                for b in 0..3 {
                    for d in 0..3 {
                        if size(&[a, b, d]) <= budget {
                            best = best.min(loss(&[a, b, d]));
                        }
                    }
                }
            }
            assert!(
                (loss(&got) - best).abs() < 1e-12,
                "budget {budget}: {got:?}"
            );
        }
        assert!(allocate_types(&layers, 29).is_err());
    }

    #[test]
    fn block_types_beat_the_reference_grid_where_they_should() {
        // Gaussian-ish rows: Q8_0 rounds far closer than the 4-bit per-channel grid,
        // Q4_K (sub-block scales) closer than it too
        let k = 256;
        let w: Vec<f32> = (0..4 * k)
            .map(|i| (i as f32 * 0.7316).sin() * (1.0 + (i % 17) as f32 * 0.1))
            .collect();
        let r = reference_error(&w, k).unwrap();
        let q8 = type_error(GgmlType::Q8_0, &w, k).unwrap();
        let q4k = type_error(GgmlType::Q4K, &w, k).unwrap();
        assert!(q8 < r / 100.0, "{q8} vs {r}");
        assert!(q4k < r, "{q4k} vs {r}");
    }
}
