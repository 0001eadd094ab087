//! The measurement behind NUPES' one exponent per layer (README, NUPES): the relative
//! weight error `‖W − Ŵ‖² / ‖W‖²` of round-to-nearest on the power grid, summed over every
//! linear of the decoder blocks, with the exponent fixed at 1 (the uniform grid), searched
//! once per layer (what `--method nupes` does) and searched per output row.
//!
//!     cargo run --release --example nupes_exponent_scope -- MODEL
//!
//! Grids: w4 per-channel, w4 g128, w3 g128, w2 g64, the `extended` levels (the default).

use anyhow::{Context, Result};
use bitsmith::loader::WeightStore;
use bitsmith::model::spec::block_linears;
use bitsmith::quant::grid::{Grid, GroupSize, PowerGrid, PowerLevels};
use bitsmith::{resolve_model, ModelConfig};
use rayon::prelude::*;

/// Squared error of round-to-nearest of `row` on `grid`, each group fitted alone.
fn row_error(grid: &PowerGrid, row: &[f32]) -> f64 {
    let g = grid.group_size().as_columns().unwrap_or(row.len());
    row.chunks(g)
        .map(|group| {
            let p = grid.fit(group);
            group
                .iter()
                .map(|&w| {
                    let d = (w - grid.fake_quant(w, &p, 0)) as f64;
                    d * d
                })
                .sum::<f64>()
        })
        .sum()
}

/// The layer's error on one grid for all rows.
fn layer_error(grid: &PowerGrid, w: &[f32], k: usize) -> f64 {
    w.par_chunks(k).map(|row| row_error(grid, row)).sum()
}

/// The layer's error with each row's exponent searched on that row alone.
fn per_row_error(grid: &PowerGrid, w: &[f32], k: usize) -> Result<f64> {
    w.par_chunks(k)
        .map(|row| Ok(row_error(&grid.for_layer(row, 1, k)?, row)))
        .sum()
}

fn main() -> Result<()> {
    let model = std::env::args()
        .nth(1)
        .context("usage: nupes_exponent_scope MODEL")?;
    let files = resolve_model(&model, None)?;
    let config = ModelConfig::from_file(&files.config)?;
    let store = WeightStore::open(&files.weights)?;
    let grids = [
        ("w4 per-channel", 4, GroupSize::PerChannel),
        ("w4 g128", 4, GroupSize::Columns(128)),
        ("w3 g128", 3, GroupSize::Columns(128)),
        ("w2 g64", 2, GroupSize::Columns(64)),
    ];
    println!("grid\tuniform (a = 1)\tper layer\tper row\tper row / per layer");
    for (label, bits, group) in grids {
        let grid = PowerGrid::new(bits, group, PowerLevels::Extended, None)?;
        let uniform = grid.at_exponent(1.0);
        let (mut norm, mut e_uniform, mut e_layer, mut e_row) = (0f64, 0f64, 0f64, 0f64);
        for layer in 0..config.num_hidden_layers {
            for spec in block_linears(&config, layer) {
                let (n, k) = (spec.out_features, spec.in_features);
                let w = store.f32_vec(&format!("{}.weight", spec.name), &[n, k])?;
                norm += w.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
                e_uniform += layer_error(&uniform, &w, k);
                e_layer += layer_error(&grid.for_layer(&w, n, k)?, &w, k);
                e_row += per_row_error(&grid, &w, k)?;
            }
        }
        println!(
            "{label}\t{:.5}\t{:.5}\t{:.5}\t{:.3}",
            e_uniform / norm,
            e_layer / norm,
            e_row / norm,
            e_row / e_layer
        );
    }
    Ok(())
}
