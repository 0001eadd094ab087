//! BAQ's bit allocation (methods.md §3): model each input column's GPTQ loss as
//! `ℓ_j(R) = c_j · 2^(−θ R)` and spread a bit budget over the columns to minimize `Σ ℓ_j`.
//!
//! * [`equal_loss_rates`]: the paper's continuous closed form (every column ends with the
//!   same loss), `R_j = R̄ + log2(c_j / G) / θ`, `G` the geometric mean of the `c_j`.
//! * [`paper_levels`]: the reference recipe's integer level counts `L_j = round(2^{R_j})`
//!   (any integer ≥ 1; the realized rate drifts from `R̄`).
//! * [`allocate_widths`]: integer bit widths from an allowed set that hit a bit budget
//!   exactly, with the minimum modeled loss: greedy marginal gains when the allowed widths
//!   are consecutive (optimal for this separable convex model), an exact dynamic program
//!   when they have gaps (e.g. `{0, 2, 3, 4, 8}`), where greedy is not optimal.

use anyhow::{bail, Result};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// `θ` of the loss model (the paper's default).
pub const DEFAULT_THETA: f64 = 1.95;
/// Guards `log` of zero losses (dead columns), as the reference does.
const LOSS_EPS: f64 = 1e-8;

/// Geometric mean of `losses + ε`.
fn geometric_mean(losses: &[f64]) -> f64 {
    (losses.iter().map(|l| (l + LOSS_EPS).ln()).sum::<f64>() / losses.len() as f64).exp()
}

/// Continuous equal-loss rates with mean exactly `rbar`.
pub fn equal_loss_rates(losses: &[f64], rbar: f64, theta: f64) -> Vec<f64> {
    let g = geometric_mean(losses);
    losses
        .iter()
        .map(|l| rbar + ((l + LOSS_EPS) / g).log2() / theta)
        .collect()
}

/// The reference recipe's level counts: `L_j = round(max(1, 2^{R_j}))`.
pub fn paper_levels(losses: &[f64], rbar: f64, theta: f64) -> Vec<u32> {
    equal_loss_rates(losses, rbar, theta)
        .into_iter()
        .map(|r| 2f64.powf(r).max(1.0).round() as u32)
        .collect()
}

/// Loss-model value of column `j` at `bits` (0 bits = pruned: the whole loss `c_j`).
pub fn modeled_loss(c: f64, bits: u8, theta: f64) -> f64 {
    c * 2f64.powf(-theta * bits as f64)
}

/// One candidate bit step of a greedy allocation, ordered by gain (max-heap).
#[derive(PartialEq)]
pub(super) struct Step {
    pub gain: f64,
    /// The column (for model-wide allocation: its index over all layers' columns; for the
    /// allocation over GGML types: the layer).
    pub column: usize,
}

impl Eq for Step {}

impl PartialOrd for Step {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Step {
    fn cmp(&self, other: &Self) -> Ordering {
        // larger gain first; ties to the lower column index for determinism
        self.gain
            .total_cmp(&other.gain)
            .then(other.column.cmp(&self.column))
    }
}

/// Integer widths from `allowed` (sorted ascending, distinct) for `losses.len()` columns
/// whose widths sum to exactly `total_bits` (`Σ b_j = total_bits`), minimizing the modeled
/// loss `Σ c_j 2^(−θ b_j)`. Fails when no assignment has exactly that sum.
pub fn allocate_widths(
    losses: &[f64],
    allowed: &[u8],
    total_bits: u64,
    theta: f64,
) -> Result<Vec<u8>> {
    if allowed.windows(2).all(|w| w[1] == w[0] + 1) {
        greedy_widths(losses, allowed, total_bits, theta)
    } else {
        exact_widths(losses, allowed, total_bits, theta)
    }
}

fn check_budget(k: usize, allowed: &[u8], total_bits: u64) -> Result<()> {
    if allowed.is_empty() || allowed.windows(2).any(|w| w[0] >= w[1]) {
        bail!("allowed bit widths must be distinct and ascending, got {allowed:?}");
    }
    let (lo, hi) = (
        allowed[0] as u64 * k as u64,
        *allowed.last().expect("non-empty") as u64 * k as u64,
    );
    if total_bits < lo || total_bits > hi {
        bail!("a budget of {total_bits} bits over {k} columns is outside {lo}..={hi} (widths {allowed:?})");
    }
    Ok(())
}

/// Exact minimum by dynamic programming over (columns, bits spent): `O(k · budget · |allowed|)`.
fn exact_widths(losses: &[f64], allowed: &[u8], total_bits: u64, theta: f64) -> Result<Vec<u8>> {
    check_budget(losses.len(), allowed, total_bits)?;
    let t = total_bits as usize;
    let mut best = vec![f64::INFINITY; t + 1];
    best[0] = 0.0;
    // choice[j][spent] = index of the width column j takes to end at `spent`
    let mut choice = vec![u8::MAX; losses.len() * (t + 1)];
    for (j, &c) in losses.iter().enumerate() {
        let mut next = vec![f64::INFINITY; t + 1];
        for (spent, &so_far) in best.iter().enumerate() {
            if so_far.is_infinite() {
                continue;
            }
            for (a, &b) in allowed.iter().enumerate() {
                let to = spent + b as usize;
                if to > t {
                    break;
                }
                let v = so_far + modeled_loss(c, b, theta);
                if v < next[to] {
                    next[to] = v;
                    choice[j * (t + 1) + to] = a as u8;
                }
            }
        }
        best = next;
    }
    if best[t].is_infinite() {
        bail!(
            "widths {allowed:?} cannot express exactly {total_bits} bits over {} columns",
            losses.len()
        );
    }
    let mut widths = vec![0u8; losses.len()];
    let mut spent = t;
    for j in (0..losses.len()).rev() {
        let b = allowed[choice[j * (t + 1) + spent] as usize];
        widths[j] = b;
        spent -= b as usize;
    }
    Ok(widths)
}

/// Greedy for consecutive widths: every column starts at the smallest width and each step
/// gives one more bit to the column whose modeled loss drops the most.
fn greedy_widths(losses: &[f64], allowed: &[u8], total_bits: u64, theta: f64) -> Result<Vec<u8>> {
    check_budget(losses.len(), allowed, total_bits)?;
    let k = losses.len();
    let lo = allowed[0] as u64 * k as u64;
    let mut level = vec![0usize; losses.len()]; // index into `allowed`
    let mut spent = lo;
    let gain_of = |j: usize, at: usize| -> Option<Step> {
        let (b0, b1) = (allowed[at], *allowed.get(at + 1)?);
        let gain = (modeled_loss(losses[j], b0, theta) - modeled_loss(losses[j], b1, theta))
            / (b1 - b0) as f64;
        Some(Step { gain, column: j })
    };
    let mut heap: BinaryHeap<Step> = (0..losses.len()).filter_map(|j| gain_of(j, 0)).collect();
    // consecutive widths: every step costs exactly one bit
    while spent < total_bits {
        let Some(Step { column: j, .. }) = heap.pop() else {
            break;
        };
        level[j] += 1;
        spent += 1;
        if let Some(next) = gain_of(j, level[j]) {
            heap.push(next);
        }
    }
    debug_assert_eq!(
        spent, total_bits,
        "the budget check guarantees reachability"
    );
    Ok(level.iter().map(|&l| allowed[l]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn losses(seed: u64, n: usize) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // log-uniform over 4 decades, like real column losses
                10f64.powf(((x >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 3.0)
            })
            .collect()
    }

    #[test]
    fn closed_form_is_the_constrained_minimum() {
        // The closed form must equalize the losses, keep the mean rate, and beat every
        // feasible perturbation (float64 brute-force check of the Lagrangian optimum).
        for seed in 0..20 {
            let c = losses(seed, 7);
            let (rbar, theta) = (3.0, DEFAULT_THETA);
            let r = equal_loss_rates(&c, rbar, theta);
            let mean = r.iter().sum::<f64>() / r.len() as f64;
            assert!((mean - rbar).abs() < 1e-12);
            let loss = |r: &[f64]| {
                c.iter()
                    .zip(r)
                    .map(|(c, r)| (c + LOSS_EPS) * 2f64.powf(-theta * r))
                    .sum::<f64>()
            };
            let each: Vec<f64> = c
                .iter()
                .zip(&r)
                .map(|(c, r)| (c + LOSS_EPS) * 2f64.powf(-theta * r))
                .collect();
            assert!(
                each.iter().all(|e| (e / each[0] - 1.0).abs() < 1e-9),
                "equal losses"
            );
            let best = loss(&r);
            // predicted gain over uniform rates = arithmetic / geometric mean
            let uniform = loss(&vec![rbar; c.len()]);
            let am = c.iter().map(|x| x + LOSS_EPS).sum::<f64>() / c.len() as f64;
            assert!((uniform / best - am / geometric_mean(&c)).abs() < 1e-9 * uniform / best);
            for i in 0..c.len() {
                for j in 0..c.len() {
                    if i == j {
                        continue;
                    }
                    for d in [1e-3, 0.1, 0.5] {
                        let mut p = r.clone();
                        p[i] += d;
                        p[j] -= d;
                        assert!(loss(&p) >= best * (1.0 - 1e-12));
                    }
                }
            }
        }
    }

    /// Exhaustive minimum over all width assignments with the exact budget.
    fn brute_force(c: &[f64], allowed: &[u8], total: u64, theta: f64) -> f64 {
        let mut best = f64::INFINITY;
        let n = c.len();
        let mut idx = vec![0usize; n];
        loop {
            let bits: u64 = idx.iter().map(|&i| allowed[i] as u64).sum();
            if bits == total {
                let l: f64 = idx
                    .iter()
                    .zip(c)
                    .map(|(&i, &c)| modeled_loss(c, allowed[i], theta))
                    .sum();
                best = best.min(l);
            }
            let mut p = 0;
            loop {
                if p == n {
                    return best;
                }
                idx[p] += 1;
                if idx[p] < allowed.len() {
                    break;
                }
                idx[p] = 0;
                p += 1;
            }
        }
    }

    #[test]
    fn widths_hit_the_budget_and_match_brute_force() {
        for seed in 0..40 {
            let c = losses(100 + seed, 6);
            let allowed: &[u8] = if seed % 2 == 0 {
                &[2, 3, 4, 5, 6, 7, 8]
            } else {
                &[0, 2, 3, 4, 8]
            };
            for total in [12u64, 15, 17, 20, 23, 30] {
                let Ok(w) = allocate_widths(&c, allowed, total, DEFAULT_THETA) else {
                    assert!(
                        brute_force(&c, allowed, total, DEFAULT_THETA).is_infinite(),
                        "seed {seed} total {total}: feasible but refused"
                    );
                    continue;
                };
                assert_eq!(w.iter().map(|&b| b as u64).sum::<u64>(), total);
                let got: f64 = w
                    .iter()
                    .zip(&c)
                    .map(|(&b, &c)| modeled_loss(c, b, DEFAULT_THETA))
                    .sum();
                let best = brute_force(&c, allowed, total, DEFAULT_THETA);
                assert!(
                    got <= best * (1.0 + 1e-12),
                    "seed {seed} total {total}: {got} vs optimum {best} ({w:?})"
                );
            }
        }
    }

    #[test]
    fn budget_exact_for_many_random_budgets() {
        let c = losses(7, 576);
        let allowed: Vec<u8> = (2..=8).collect();
        for t in 0..200u64 {
            let total = 2 * 576 + (t * 7919) % (6 * 576 + 1);
            let w = allocate_widths(&c, &allowed, total, DEFAULT_THETA).unwrap();
            assert_eq!(w.iter().map(|&b| b as u64).sum::<u64>(), total);
            // more loss, more bits
            let (hi, lo) = (
                c.iter().cloned().fold(0.0, f64::max),
                c.iter().cloned().fold(f64::MAX, f64::min),
            );
            let wi = |x: f64| w[c.iter().position(|&v| v == x).unwrap()];
            assert!(wi(hi) >= wi(lo));
        }
    }

    #[test]
    fn paper_levels_follow_losses() {
        let c = vec![1e-6, 1e-3, 1.0, 0.0];
        let l = paper_levels(&c, 3.0, DEFAULT_THETA);
        assert!(l[0] <= l[1] && l[1] <= l[2] && l.iter().all(|&x| x >= 1));
    }
}
