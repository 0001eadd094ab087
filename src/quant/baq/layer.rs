//! One BAQ layer: allocate integer widths from the first pass's column losses so the layer
//! hits its bit budget exactly, then run the mixed-width GPTQ pass.

use super::allocation::allocate_widths;
use crate::quant::gptq::{gptq_mixed, MixedOutput};
use anyhow::{ensure, Result};

/// What `LayerBudget::bits` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetKind {
    /// Everything the mixed-width layout stores for the layer: codes, word padding, scales,
    /// zero points, permutation and widths (the number on disk).
    Stored,
    /// Code bits only (the paper's `R̄`): the widths sum to `round(bits · in_features)`.
    Codes,
}

/// How one layer's bits are allocated.
#[derive(Debug, Clone)]
pub struct LayerBudget {
    /// Average bits per weight to hit (e.g. 2.5), counted as `kind` says.
    pub bits: f64,
    pub kind: BudgetKind,
    /// Allowed widths, ascending (default 2..=8; include 0 to allow pruning).
    pub allowed: Vec<u8>,
    /// Loss-model exponent `θ` (1.95).
    pub theta: f64,
    /// Range groups inside each width run (`None`: one range per row and width); their
    /// scales and zeros count against a stored budget.
    pub group_size: Option<usize>,
    /// Each width on a power codebook (no zero points; a table and an exponent per width
    /// count against a stored budget).
    pub codebook: bool,
}

/// Quantize `weight` (`[n, k]`) with widths allocated from `pass1_losses` (GPTQ's column
/// losses at any uniform width: only their ratios matter to the allocation).
#[allow(clippy::too_many_arguments)]
pub fn baq_layer(
    weight: &[f32],
    n: usize,
    k: usize,
    hessian: &[f32],
    pass1_losses: &[f64],
    budget: &LayerBudget,
    sym: bool,
    damp: f64,
    block_size: usize,
) -> Result<MixedOutput> {
    ensure!(
        pass1_losses.len() == k,
        "{} column losses for {k} columns",
        pass1_losses.len()
    );
    let widths = allocate_for_layer(pass1_losses, n, budget)?;
    gptq_mixed(
        weight,
        n,
        k,
        hessian,
        &widths,
        budget.group_size,
        sym,
        damp,
        block_size,
    )
}

/// Bits the mixed-width layout (or, with `codebook`, the mixed-codebook layout) stores for
/// a layer with these column widths and `n` rows: `col_perm` (i32) and `col_widths` (u8)
/// per column, and per width present its run.
pub fn stored_bits(widths: &[u8], n: usize, group_size: Option<usize>, codebook: bool) -> u64 {
    let mut per_width = [0u64; 9];
    widths.iter().for_each(|&b| per_width[b as usize] += 1);
    40 * widths.len() as u64
        + (1..=8u64)
            .map(|b| run_stored_bits(per_width[b as usize], b, n as u64, group_size, codebook))
            .sum::<u64>()
}

/// Bits of one run of `kb` columns of width `b` over `n` rows: whole 32-bit words of codes
/// per row, and per range group f16 scales and packed zero points — or, for a codebook
/// run, f16 scales per range group and the width's f32 table and exponent.
pub fn run_stored_bits(
    kb: u64,
    b: u64,
    n: u64,
    group_size: Option<usize>,
    codebook: bool,
) -> u64 {
    if kb == 0 {
        return 0;
    }
    let groups = group_size.map_or(1, |g| kb.div_ceil(g as u64));
    let codes = 32 * (kb * b).div_ceil(32) * n;
    if codebook {
        codes + groups * 16 * n + 32 * ((1u64 << b) + 1)
    } else {
        codes + groups * (16 * n + 32 * (n * b).div_ceil(32))
    }
}

/// Widths meeting `budget` for a layer of `n` rows: exactly for code bits; for stored bits,
/// the largest code budget whose whole layout fits in `bits · n · k` (what is left is less
/// than one more column plus the metadata of one more width).
pub fn allocate_for_layer(losses: &[f64], n: usize, budget: &LayerBudget) -> Result<Vec<u8>> {
    let k = losses.len();
    let alloc = |total: u64| allocate_widths(losses, &budget.allowed, total, budget.theta);
    if budget.kind == BudgetKind::Codes {
        return alloc((budget.bits * k as f64).round() as u64);
    }
    let target = (budget.bits * (n * k) as f64).floor() as u64;
    let lo = *budget.allowed.first().unwrap_or(&0) as u64 * k as u64;
    let hi = *budget.allowed.last().unwrap_or(&0) as u64 * k as u64;
    // the largest code budget whose whole layout fits: binary search (the layout grows with
    // the code budget, up to which widths happen to be present), then a short scan above
    let fits = |total: u64| -> Result<Option<Vec<u8>>> {
        let w = alloc(total)?;
        Ok((stored_bits(&w, n, budget.group_size, budget.codebook) <= target).then_some(w))
    };
    let mut best: Option<Vec<u8>> = None;
    let (mut lo_t, mut hi_t) = (lo, hi);
    while lo_t <= hi_t {
        let mid = lo_t + (hi_t - lo_t) / 2;
        match fits(mid)? {
            Some(w) => {
                best = Some(w);
                lo_t = mid + 1;
            }
            None if mid == 0 => break,
            None => hi_t = mid - 1,
        }
    }
    if let Some(found) = best
        .as_ref()
        .map(|w| w.iter().map(|&b| b as u64).sum::<u64>())
    {
        for total in found + 1..=(found + 8).min(hi) {
            if let Some(w) = fits(total)? {
                best = Some(w);
            }
        }
    }
    best.ok_or_else(|| {
        anyhow::anyhow!(
            "{} bits per weight cannot hold the smallest widths plus the layout's metadata for a {n}x{k} layer",
            budget.bits
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::MixedTensors;

    #[test]
    fn stored_budget_matches_the_written_layout() {
        let (n, k) = (512, 160);
        let losses: Vec<f64> = (0..k)
            .map(|j| 10f64.powf((j * 37 % 100) as f64 / 25.0 - 2.0))
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.1)
            .collect();
        let h: Vec<f32> = (0..k * k)
            .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
            .collect();
        for bits in [2.25, 2.5, 3.0, 3.25, 4.0] {
            // groups of 32 carry ~0.6 bits of ranges per weight on top of the codes
            for group_size in [None, Some(32)]
                .into_iter()
                .filter(|g| g.is_none() || bits >= 3.0)
            {
                let budget = LayerBudget {
                    bits,
                    kind: BudgetKind::Stored,
                    allowed: (2..=8).collect(),
                    theta: DEFAULT_THETA,
                    group_size,
                    codebook: false,
                };
                let widths = allocate_for_layer(&losses, n, &budget).unwrap();
                let q = gptq_mixed(&w, n, k, &h, &widths, group_size, false, 0.01, 64)
                    .unwrap()
                    .quantized;
                let on_disk = 8 * MixedTensors::from_quantized(&q).byte_len() as u64;
                assert_eq!(
                    on_disk,
                    stored_bits(&widths, n, group_size, false),
                    "the estimate is the layout's exact size"
                );
                let target = (bits * (n * k) as f64).floor() as u64;
                assert!(on_disk <= target, "{bits}: {on_disk} > {target}");
                // within one column's codes at the widest width of the target
                // within one more column at the widest width plus the metadata a new width brings
                // (its scales, zeros and a padding word per row)
                assert!(
                    target - on_disk < (8 + 16 + 8 + 32) * n as u64,
                    "{bits}: {on_disk} leaves too much of {target}"
                );
            }
        }
    }
    use crate::quant::baq::allocation::DEFAULT_THETA;
    use crate::quant::gptq::{gptq, output_error, GptqOptions};
    use crate::quant::{GroupSize, UniformGrid};

    #[test]
    fn beats_uniform_gptq_at_equal_bits_when_columns_differ() {
        // inputs whose columns differ by orders of magnitude in activation energy: the case
        // bit allocation exists for
        let (n, k, m) = (32, 64, 256);
        let mut x = 7u64;
        let mut rnd = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        };
        let scale: Vec<f64> = (0..k)
            .map(|j| 10f64.powf(-1.5 + 3.0 * (j as f64 / k as f64)))
            .collect();
        let xs: Vec<f64> = (0..m * k).map(|i| rnd() * scale[i % k]).collect();
        let h: Vec<f32> = (0..k * k)
            .map(|i| {
                ((0..m)
                    .map(|t| xs[t * k + i / k] * xs[t * k + i % k])
                    .sum::<f64>()
                    * 2.0
                    / m as f64) as f32
            })
            .collect();
        let w: Vec<f32> = (0..n * k).map(|_| (rnd() * 0.05) as f32).collect();
        for bits in [2u8, 3, 4] {
            let grid = UniformGrid::new(bits, GroupSize::PerChannel, false).unwrap();
            let pass1 = gptq(&w, n, k, &h, &GptqOptions::new(grid)).unwrap();
            let budget = LayerBudget {
                bits: bits as f64,
                kind: BudgetKind::Codes,
                allowed: (1..=8).collect(),
                theta: DEFAULT_THETA,
                group_size: None,
                codebook: false,
            };
            let baq =
                baq_layer(&w, n, k, &h, &pass1.column_loss, &budget, false, 0.01, 128).unwrap();
            assert_eq!(
                baq.quantized.widths.iter().map(|&b| b as u64).sum::<u64>(),
                bits as u64 * k as u64
            );
            let e_gptq = output_error(&w, &pass1.quantized.dequantize(), n, k, &h);
            let e_baq = output_error(&w, &baq.quantized.dequantize(), n, k, &h);
            assert!(e_baq < e_gptq, "{bits} bits: BAQ {e_baq} vs GPTQ {e_gptq}");
        }
    }
}
