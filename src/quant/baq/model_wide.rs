//! Model-wide bit allocation (beyond the paper): one budget for all quantized layers at
//! once, spent where the same loss model `ℓ_j(b) = c_j · 2^(−θ b)` says a bit buys the most
//! loss reduction, so sensitive layers get more bits than insensitive ones — what
//! llama.cpp's `--target-bpw` and exllamav2's optimizer do heuristically, here from the
//! GPTQ column losses already measured in pass 1.
//!
//! Every column starts at the smallest allowed width; a greedy loop then takes the step
//! (one column, next allowed width) with the largest modeled loss drop per code bit, as
//! long as the model's exact stored size (the mixed-width layout of every layer, metadata
//! included: see [`super::layer::stored_bits`]) stays within the budget. A step that does
//! not fit any more is dropped, cheaper ones are still taken, so what is left over is less
//! than the cheapest remaining step.

use super::allocation::{modeled_loss, Step};
use super::layer::{run_stored_bits, BudgetKind, LayerBudget};
use anyhow::{bail, ensure, Result};
use std::collections::BinaryHeap;

/// One layer as the allocator sees it.
#[derive(Debug, Clone, Copy)]
pub struct LayerColumns<'a> {
    /// Output rows: every bit of a column's width costs this many code bits.
    pub rows: usize,
    /// Pass-1 loss of each input column.
    pub losses: &'a [f64],
}

/// Stored bits of one layer, kept up to date as columns change width: the mixed-width
/// layout's size is a function of how many columns each width has.
struct LayerSize {
    rows: u64,
    columns: u64,
    per_width: [u64; 9],
    group_size: Option<usize>,
    codebook: bool,
}

impl LayerSize {
    fn bits(&self, kind: BudgetKind) -> u64 {
        let n = self.rows;
        match kind {
            BudgetKind::Codes => (1..=8u64).map(|b| self.per_width[b as usize] * b * n).sum(),
            // what `stored_bits` counts, from the per-width column counts
            BudgetKind::Stored => {
                40 * self.columns
                    + (1..=8u64)
                        .map(|b| {
                            run_stored_bits(
                                self.per_width[b as usize],
                                b,
                                n,
                                self.group_size,
                                self.codebook,
                            )
                        })
                        .sum::<u64>()
            }
        }
    }

    /// Size change when one column moves from width `from` to width `to`.
    fn delta(&mut self, from: u8, to: u8, kind: BudgetKind) -> i64 {
        let before = self.bits(kind) as i64;
        self.per_width[from as usize] -= 1;
        self.per_width[to as usize] += 1;
        let after = self.bits(kind) as i64;
        self.per_width[to as usize] -= 1;
        self.per_width[from as usize] += 1;
        after - before
    }
}

/// Widths for every layer under one budget: `budget.bits` per quantized weight over all
/// layers together, counted as `budget.kind` says, never exceeded.
pub fn allocate_model(layers: &[LayerColumns], budget: &LayerBudget) -> Result<Vec<Vec<u8>>> {
    let allowed = &budget.allowed;
    ensure!(
        !allowed.is_empty()
            && allowed.windows(2).all(|w| w[0] < w[1])
            && allowed[allowed.len() - 1] <= 8,
        "allowed bit widths must be distinct, ascending and at most 8, got {allowed:?}"
    );
    let weights: u64 = layers
        .iter()
        .map(|l| (l.rows * l.losses.len()) as u64)
        .sum();
    let target = (budget.bits * weights as f64).floor() as u64;
    let mut level: Vec<Vec<usize>> = layers.iter().map(|l| vec![0; l.losses.len()]).collect();
    let mut sizes: Vec<LayerSize> = layers
        .iter()
        .map(|l| {
            let mut per_width = [0u64; 9];
            per_width[allowed[0] as usize] = l.losses.len() as u64;
            LayerSize {
                rows: l.rows as u64,
                columns: l.losses.len() as u64,
                per_width,
                group_size: budget.group_size,
                codebook: budget.codebook,
            }
        })
        .collect();
    let mut spent: u64 = sizes.iter().map(|s| s.bits(budget.kind)).sum();
    if spent > target {
        bail!(
            "{} bits per weight cannot hold every column at {} bits plus the layout's metadata ({:.4} bits per weight)",
            budget.bits,
            allowed[0],
            spent as f64 / weights as f64
        );
    }
    // steps name columns by their index over all layers: ties go to the earlier layer
    let offsets: Vec<usize> = layers
        .iter()
        .scan(0, |o, l| {
            let start = *o;
            *o += l.losses.len();
            Some(start)
        })
        .collect();
    let locate = |global: usize| {
        let layer = offsets.partition_point(|&o| o <= global) - 1;
        (layer, global - offsets[layer])
    };
    let step = |layer: usize, column: usize, at: usize| -> Option<Step> {
        let (b0, b1) = (allowed[at], *allowed.get(at + 1)?);
        let c = layers[layer].losses[column];
        let drop = modeled_loss(c, b0, budget.theta) - modeled_loss(c, b1, budget.theta);
        Some(Step {
            gain: drop / ((b1 - b0) as f64 * layers[layer].rows as f64),
            column: offsets[layer] + column,
        })
    };
    let mut heap: BinaryHeap<Step> = layers
        .iter()
        .enumerate()
        .flat_map(|(l, layer)| (0..layer.losses.len()).map(move |j| (l, j)))
        .filter_map(|(l, j)| step(l, j, 0))
        .collect();
    while let Some(Step { column: global, .. }) = heap.pop() {
        let (layer, column) = locate(global);
        let at = level[layer][column];
        let (b0, b1) = (allowed[at], allowed[at + 1]);
        let delta = sizes[layer].delta(b0, b1, budget.kind);
        if delta > 0 && spent + delta as u64 > target {
            continue; // does not fit any more; cheaper steps may
        }
        sizes[layer].per_width[b0 as usize] -= 1;
        sizes[layer].per_width[b1 as usize] += 1;
        spent = (spent as i64 + delta) as u64;
        level[layer][column] = at + 1;
        if let Some(next) = step(layer, column, at + 1) {
            heap.push(next);
        }
    }
    Ok(level
        .into_iter()
        .map(|l| l.into_iter().map(|i| allowed[i]).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::baq::allocation::DEFAULT_THETA;
    use crate::quant::baq::layer::stored_bits;

    fn losses(seed: u64, n: usize, scale: f64) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                scale * 10f64.powf(((x >> 11) as f64 / (1u64 << 53) as f64) * 3.0 - 2.0)
            })
            .collect()
    }

    fn budget(bits: f64, kind: BudgetKind) -> LayerBudget {
        LayerBudget {
            bits,
            kind,
            allowed: (2..=8).collect(),
            theta: DEFAULT_THETA,
            group_size: None,
            codebook: false,
        }
    }

    #[test]
    fn stored_budget_is_met_from_below_and_nearly_used() {
        let a = losses(1, 96, 1.0);
        let b = losses(2, 160, 50.0);
        let c = losses(3, 64, 0.01);
        let layers = [
            LayerColumns {
                rows: 48,
                losses: &a,
            },
            LayerColumns {
                rows: 200,
                losses: &b,
            },
            LayerColumns {
                rows: 96,
                losses: &c,
            },
        ];
        let weights: u64 = layers
            .iter()
            .map(|l| (l.rows * l.losses.len()) as u64)
            .sum();
        for t in 0..40 {
            let bits = 2.5 + t as f64 * 0.13;
            let w = allocate_model(&layers, &budget(bits, BudgetKind::Stored)).unwrap();
            let stored: u64 = w
                .iter()
                .zip(&layers)
                .map(|(w, l)| stored_bits(w, l.rows, None, false))
                .sum();
            let target = (bits * weights as f64).floor() as u64;
            assert!(stored <= target, "{bits}: {stored} > {target}");
            if w.iter().flatten().any(|&x| x < 8) {
                // what is left is less than the cheapest step that could still be taken:
                // one more bit of a column in the largest layer plus a new width's metadata
                assert!(
                    target - stored < 200 * (1 + 16 + 32) + 64,
                    "{bits}: {stored} leaves too much of {target}"
                );
            }
        }
    }

    #[test]
    fn sensitive_layers_get_more_bits() {
        // identical shapes, losses 100x apart: the budget should flow to the lossy layer
        let a = losses(5, 128, 1.0);
        let b: Vec<f64> = a.iter().map(|x| x * 100.0).collect();
        let layers = [
            LayerColumns {
                rows: 64,
                losses: &a,
            },
            LayerColumns {
                rows: 64,
                losses: &b,
            },
        ];
        let w = allocate_model(&layers, &budget(3.0, BudgetKind::Codes)).unwrap();
        let mean = |w: &[u8]| w.iter().map(|&x| x as f64).sum::<f64>() / w.len() as f64;
        assert!(
            mean(&w[1]) > mean(&w[0]) + 1.0,
            "{} vs {}",
            mean(&w[1]),
            mean(&w[0])
        );
        // log2(100)/θ ≈ 3.4 bits apart in the continuous optimum
        let code_bits: u64 = w.iter().flatten().map(|&x| x as u64 * 64).sum();
        assert!(code_bits <= 3 * 64 * 256 && code_bits > 3 * 64 * 256 - 64);
    }

    #[test]
    fn one_layer_matches_the_layer_allocator_for_code_budgets() {
        // one layer, code bits, consecutive widths: the same greedy optimum as the
        // per-layer exact allocator
        let a = losses(9, 200, 1.0);
        for total in [450u64, 600, 777, 1000] {
            let bits = total as f64 / 200.0;
            let want = super::super::allocation::allocate_widths(
                &a,
                &(2..=8).collect::<Vec<_>>(),
                total,
                DEFAULT_THETA,
            )
            .unwrap();
            let got = allocate_model(
                &[LayerColumns {
                    rows: 1,
                    losses: &a,
                }],
                &budget(bits + 1e-9, BudgetKind::Codes),
            )
            .unwrap();
            let loss = |w: &[u8]| -> f64 {
                w.iter()
                    .zip(&a)
                    .map(|(&b, &c)| modeled_loss(c, b, DEFAULT_THETA))
                    .sum()
            };
            assert_eq!(got[0].iter().map(|&b| b as u64).sum::<u64>(), total);
            assert!((loss(&got[0]) - loss(&want)).abs() <= 1e-12 * loss(&want));
        }
    }

    #[test]
    fn too_small_a_budget_is_refused() {
        let a = losses(1, 32, 1.0);
        let err = allocate_model(
            &[LayerColumns {
                rows: 8,
                losses: &a,
            }],
            &budget(2.0, BudgetKind::Stored),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot hold"), "{err}");
    }
}
