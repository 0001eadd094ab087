//! BAQ as a layer-wise method: pass 1 measures per-column GPTQ losses at a uniform width,
//! pass 2 ([`Baq`]) allocates widths from them and runs the mixed-width GPTQ pass, both
//! through the same layer-by-layer runner.

use super::layer::{allocate_for_layer, LayerBudget};
use crate::calibration::{CalibrationSet, RunnerOptions};
use crate::loader::{ModelConfig, WeightStore};
use crate::quant::allocation::LayerPlan;
use crate::quant::gptq::GptqRounding;
use crate::quant::recipe::GptqSpec;
use crate::quant::rounding::LayerRounding;
use crate::quant::{
    quantize_model_calibrated, CalibratedOptions, Gptq, GptqOptions, GroupSize, LayerQuantizer,
    LayerResult, LayerToQuantize, UniformGrid, SUPPORTED_BITS,
};
use anyhow::{anyhow, Result};
use std::collections::HashMap;

/// Where each layer's widths come from.
pub enum Allocation {
    /// Each layer meets the budget on its own, from its pass-1 losses (the paper).
    PerLayer(LayerBudget),
    /// Widths decided up front for every layer by name (model-wide allocation,
    /// [`super::model_wide::allocate_model`]).
    Fixed(HashMap<String, Vec<u8>>),
}

/// Pass 2: widths from `pass1` losses, then mixed-width GPTQ.
pub struct Baq {
    /// Pass-1 column losses by module name.
    pub pass1: HashMap<String, Vec<f64>>,
    pub allocation: Allocation,
    /// Range groups inside each width run (`None`: one range per row and width).
    pub group_size: Option<usize>,
    pub sym: bool,
    pub damp: f64,
    pub block_size: usize,
}

impl LayerQuantizer for Baq {
    fn name(&self) -> &'static str {
        "baq"
    }

    fn needs_hessian(&self) -> bool {
        true
    }

    fn quantize(&self, layer: &LayerToQuantize) -> Result<LayerResult> {
        let losses = self
            .pass1
            .get(layer.name)
            .ok_or_else(|| anyhow!("no pass-1 measurement for `{}`", layer.name))?;
        let widths = match &self.allocation {
            Allocation::PerLayer(budget) => allocate_for_layer(losses, layer.out_features, budget)?,
            Allocation::Fixed(by_name) => by_name
                .get(layer.name)
                .cloned()
                .ok_or_else(|| anyhow!("no allocated widths for `{}`", layer.name))?,
        };
        anyhow::ensure!(
            widths.len() == layer.in_features,
            "`{}`: {} widths for {} columns",
            layer.name,
            widths.len(),
            layer.in_features
        );
        // the same mixed-width GPTQ the pipeline's rounding stage runs
        let plan = LayerPlan::Mixed {
            widths,
            group_size: self.group_size,
            sym: self.sym,
            range: crate::quant::grid::RangeFit::MinMax,
        };
        GptqRounding {
            spec: GptqSpec {
                damp: self.damp,
                block_size: self.block_size,
                ..GptqSpec::default()
            },
        }
        .round(layer, &plan)
    }
}

/// The uniform width pass 1 runs at: the supported width nearest the target average.
pub fn measurement_bits(target: f64) -> u8 {
    *SUPPORTED_BITS
        .iter()
        .min_by(|a, b| {
            ((**a as f64) - target)
                .abs()
                .total_cmp(&((**b as f64) - target).abs())
        })
        .expect("non-empty")
}

/// Pass 1: per-channel asymmetric GPTQ at `bits` in natural column order (methods.md §3.2
/// step 1), returning each linear's column losses.
pub fn measure(
    config: &ModelConfig,
    store: &WeightStore,
    calib: &CalibrationSet,
    bits: u8,
    runner: RunnerOptions,
    progress: bool,
) -> Result<HashMap<String, Vec<f64>>> {
    let grid = UniformGrid::new(bits, GroupSize::PerChannel, false)?;
    let q = quantize_model_calibrated(
        config,
        store,
        calib,
        &Gptq {
            options: GptqOptions::new(grid),
        },
        &CalibratedOptions {
            runner,
            grid,
            progress,
            checkpoint: None,
        },
    )?;
    q.layers
        .into_iter()
        .map(|(s, r)| {
            Ok((
                s.name.clone(),
                r.column_loss
                    .ok_or_else(|| anyhow!("GPTQ reported no losses for `{}`", s.name))?,
            ))
        })
        .collect()
}

/// BAQ as an allocation stage: widths from pass-1 column losses (measured by the looper at
/// [`measurement_bits`] of the budget, or reused from an earlier run), for every layer on
/// its own or over the whole model.
pub struct BaqAllocation {
    pub budget: LayerBudget,
    /// One budget over all layers instead of one per layer.
    pub model_wide: bool,
    pub sym: bool,
    pub range: crate::quant::grid::RangeFit,
    /// Each width on a power codebook with these levels instead of the uniform grid.
    pub codebook: Option<crate::quant::grid::PowerLevels>,
}

impl crate::quant::allocation::Allocation for BaqAllocation {
    fn name(&self) -> &'static str {
        "baq"
    }

    fn measure_at(&self) -> Option<u8> {
        Some(measurement_bits(self.budget.bits))
    }

    fn plan(
        &self,
        linears: &[crate::model::LinearSpec],
        measurement: Option<&crate::quant::allocation::Measurement>,
    ) -> Result<HashMap<String, crate::quant::allocation::LayerPlan>> {
        use super::model_wide::{allocate_model, LayerColumns};
        use crate::quant::allocation::LayerPlan;
        let m = measurement.ok_or_else(|| anyhow!("BAQ needs pass-1 column losses"))?;
        let losses = |name: &str| {
            m.get(name)
                .ok_or_else(|| anyhow!("no pass-1 measurement for `{name}`"))
        };
        let widths: Vec<Vec<u8>> = if self.model_wide {
            let columns = linears
                .iter()
                .map(|s| {
                    Ok(LayerColumns {
                        rows: s.out_features,
                        losses: losses(&s.name)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            allocate_model(&columns, &self.budget)?
        } else {
            linears
                .iter()
                .map(|s| {
                    allocate_for_layer(losses(&s.name)?, s.out_features, &self.budget)
                        .map_err(|e| e.context(format!("allocating `{}`", s.name)))
                })
                .collect::<Result<_>>()?
        };
        Ok(linears
            .iter()
            .zip(widths)
            .map(|(s, widths)| {
                let plan = match self.codebook {
                    None => LayerPlan::Mixed {
                        widths,
                        group_size: self.budget.group_size,
                        sym: self.sym,
                        range: self.range,
                    },
                    Some(levels) => LayerPlan::MixedPower {
                        widths,
                        group_size: self.budget.group_size,
                        levels,
                        range: self.range,
                    },
                };
                (s.name.clone(), plan)
            })
            .collect())
    }
}
