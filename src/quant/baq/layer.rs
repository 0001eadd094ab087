//! One BAQ layer: allocate integer widths from the first pass's column losses so the layer
//! hits its bit budget exactly, then run the mixed-width GPTQ pass.

use super::allocation::allocate_widths;
use crate::quant::gptq::{gptq_mixed, MixedOutput};
use anyhow::{ensure, Result};

/// How one layer's bits are allocated.
#[derive(Debug, Clone)]
pub struct LayerBudget {
    /// Average code bits per weight to hit (e.g. 2.5); the widths sum to
    /// `round(bits · in_features)` exactly.
    pub bits: f64,
    /// Allowed widths, ascending (default 2..=8; include 0 to allow pruning).
    pub allowed: Vec<u8>,
    /// Loss-model exponent `θ` (1.95).
    pub theta: f64,
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
    let total = (budget.bits * k as f64).round() as u64;
    let widths = allocate_widths(pass1_losses, &budget.allowed, total, budget.theta)?;
    gptq_mixed(weight, n, k, hessian, &widths, sym, damp, block_size)
}

#[cfg(test)]
mod tests {
    use super::*;
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
                allowed: (1..=8).collect(),
                theta: DEFAULT_THETA,
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
