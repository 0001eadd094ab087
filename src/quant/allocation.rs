//! Allocation stages: choose the grid each linear is rounded on. [`UniformAllocation`]
//! puts every linear on one grid; BAQ ([`crate::quant::baq::BaqAllocation`]) gives every
//! input column its own width from a measurement of column losses that the looper runs
//! first.

use super::grid::{
    GgmlGrid, GgufFileType, MixShape, PowerGrid, PowerLevels, RangeFit, UniformGrid,
};
use crate::loader::WeightStore;
use crate::model::LinearSpec;
use anyhow::{ensure, Result};
use safetensors::Dtype;
use std::collections::HashMap;

/// Per-column losses of every linear, by module name (GPTQ's `ℓ_j`), BAQ's pass 1.
pub type Measurement = HashMap<String, Vec<f64>>;

/// The grid one linear is rounded on, as an allocation decided.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerPlan {
    /// One uniform grid for the whole layer.
    Uniform(UniformGrid),
    /// NUPES' power grid, its exponent fitted per layer by the rounding.
    Power(PowerGrid),
    /// A GGML block type (the one the GGUF file stores for this layer).
    Ggml(GgmlGrid),
    /// A uniform width per input column (`0` = pruned), with one range per row and width
    /// (`group_size` `None`) or per range group of `group_size` equal-width columns.
    Mixed {
        widths: Vec<u8>,
        group_size: Option<usize>,
        sym: bool,
        range: RangeFit,
    },
    /// BAQ's widths as in `Mixed`, each width on NUPES' power codebook with `levels` (its
    /// exponent fitted on the columns of that width when rounded), one scale per row and
    /// range group.
    MixedPower {
        widths: Vec<u8>,
        group_size: Option<usize>,
        levels: PowerLevels,
        range: RangeFit,
    },
}

/// Chooses each linear's grid.
pub trait Allocation: Send + Sync {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// The uniform width a measurement must be taken at before [`Self::plan`] can run
    /// (per-channel asymmetric GPTQ's column losses), or `None` when no measurement is
    /// needed.
    fn measure_at(&self) -> Option<u8>;

    /// The plan of every linear in `linears`.
    fn plan(
        &self,
        linears: &[LinearSpec],
        measurement: Option<&Measurement>,
    ) -> Result<HashMap<String, LayerPlan>>;
}

/// Every linear on the same grid.
pub struct UniformAllocation {
    pub grid: UniformGrid,
}

/// The same plan for every linear of `linears`.
fn every_linear_on(linears: &[LinearSpec], plan: &LayerPlan) -> HashMap<String, LayerPlan> {
    linears
        .iter()
        .map(|s| (s.name.clone(), plan.clone()))
        .collect()
}

/// Every linear on the same power grid (each fits its own exponent when rounded).
pub struct PowerAllocation {
    pub grid: PowerGrid,
}

impl Allocation for PowerAllocation {
    fn name(&self) -> &'static str {
        "power"
    }

    fn measure_at(&self) -> Option<u8> {
        None
    }

    fn plan(
        &self,
        linears: &[LinearSpec],
        _: Option<&Measurement>,
    ) -> Result<HashMap<String, LayerPlan>> {
        Ok(every_linear_on(
            linears,
            &LayerPlan::Power(self.grid.clone()),
        ))
    }
}

impl Allocation for UniformAllocation {
    fn name(&self) -> &'static str {
        "uniform"
    }

    fn measure_at(&self) -> Option<u8> {
        None
    }

    fn plan(
        &self,
        linears: &[LinearSpec],
        _: Option<&Measurement>,
    ) -> Result<HashMap<String, LayerPlan>> {
        Ok(every_linear_on(linears, &LayerPlan::Uniform(self.grid)))
    }
}

/// Every linear on one GGML block type, or on the type a llama.cpp mix gives its role and
/// depth (`Q4_K_M`: Q6_K for some `attn_v` and `ffn_down`); then on the type llama.cpp's
/// quantizer falls back to where a layer's rows are not whole blocks of it (a K-quant on
/// a 576-wide layer: Q5_0 for Q4_K).
pub struct GgmlAllocation {
    pub ty: GgufFileType,
    pub shape: MixShape,
}

impl Allocation for GgmlAllocation {
    fn name(&self) -> &'static str {
        "ggml"
    }

    fn measure_at(&self) -> Option<u8> {
        None
    }

    fn plan(
        &self,
        linears: &[LinearSpec],
        _: Option<&Measurement>,
    ) -> Result<HashMap<String, LayerPlan>> {
        Ok(linears
            .iter()
            .map(|s| {
                let ty = self.ty.module_type(&s.name, &self.shape);
                let grid = GgmlGrid::for_width(ty, s.in_features);
                (s.name.clone(), LayerPlan::Ggml(grid))
            })
            .collect())
    }
}

/// Read per-column losses written by [`crate::pack::write_column_losses`] (a file or the
/// folder holding it).
pub fn read_measurement(path: &std::path::Path) -> Result<Measurement> {
    let file = if path.is_dir() {
        path.join("column_losses.safetensors")
    } else {
        path.to_path_buf()
    };
    let store = WeightStore::open(std::slice::from_ref(&file))?;
    store
        .names()
        .map(|name| {
            let (info, bytes) = store.raw(name)?;
            ensure!(
                info.dtype.st() == Dtype::F64 && info.shape.len() == 1,
                "{}: `{name}` must be a 1-D F64 tensor",
                file.display()
            );
            Ok((
                name.to_string(),
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ))
        })
        .collect()
}
