//! Layer rounding stages: pick grid points for one linear from its weight (and, for
//! calibrated methods, the Hessian of its inputs) on the grid its [`LayerPlan`] names.
//! [`PlannedRounding`] binds a rounding to an allocation's plans and is what the looper
//! runs for every linear.

use super::allocation::LayerPlan;
use super::{LayerQuantizer, LayerResult, LayerToQuantize};
use anyhow::{anyhow, Context, Result};
use std::collections::HashMap;

/// Rounds one linear on its planned grid.
pub trait LayerRounding: Send + Sync {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Whether [`LayerToQuantize::hessian`] must be given (calibration needed).
    fn needs_hessian(&self) -> bool;
    fn round(&self, layer: &LayerToQuantize, plan: &LayerPlan) -> Result<LayerResult>;
}

/// A rounding applied on every linear's planned grid.
pub struct PlannedRounding<'a> {
    /// Name for logs and the progress bar (the recipe's method).
    pub name: &'static str,
    pub rounding: &'a dyn LayerRounding,
    pub plans: HashMap<String, LayerPlan>,
}

impl LayerQuantizer for PlannedRounding<'_> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn needs_hessian(&self) -> bool {
        self.rounding.needs_hessian()
    }

    fn quantize(&self, layer: &LayerToQuantize) -> Result<LayerResult> {
        let plan = self
            .plans
            .get(layer.name)
            .ok_or_else(|| anyhow!("the allocation planned no grid for `{}`", layer.name))?;
        self.rounding
            .round(layer, plan)
            .with_context(|| format!("{} on `{}`", self.rounding.name(), layer.name))
    }
}
