//! Grids: the sets of values a rounding method may put a weight on. A grid fits its
//! parameters to a group of values (one output row's columns of a group), encodes a value
//! to a code and decodes a code; which code each weight gets is the rounding method's
//! business (RTN, GPTQ, …), and every rounding method is generic over [`Grid`] (one
//! monomorphised copy per grid, no virtual call per weight).
//!
//! Implementations: [`UniformGrid`] (methods.md §2.1) and [`PowerGrid`] (NUPES, §5.1: a
//! per-layer codebook whose exponent is fitted in [`Grid::for_layer_weighted`]). The seam is
//! shaped for two-level scales too (a GGML K-quant's group is its 256-column
//! super-block, its parameters hold the sub-block scales, and `col` in
//! [`Grid::encode`]/[`Grid::decode`] says which sub-block a column is in).

pub mod ggml;
mod power;
mod power_scale;
mod range;
mod uniform;

pub use ggml::{GgmlGrid, GgmlType, GgufFileType, LinearRole, LlamaMix, MixShape};
pub use power::{PowerGrid, PowerLevels, PowerParams, EXPONENT_RANGE};
pub use range::RangeFit;
pub use uniform::{GroupParams, UniformGrid, SUPPORTED_BITS};

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// How many input columns share one set of grid parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSize {
    /// One group spanning the whole input dimension (`-1` on the command line).
    PerChannel,
    Columns(usize),
}

impl GroupSize {
    /// Parse the conventional integer form: `-1` = per channel, otherwise a positive size.
    pub fn from_i64(g: i64) -> Result<Self> {
        match g {
            -1 => Ok(Self::PerChannel),
            g if g > 0 => Ok(Self::Columns(g as usize)),
            g => bail!(
                "group size {g} is invalid; use a positive number of columns or -1 for per-channel"
            ),
        }
    }

    pub fn as_i64(self) -> i64 {
        match self {
            Self::PerChannel => -1,
            Self::Columns(g) => g as i64,
        }
    }

    /// `None` for per-channel, the size otherwise (the mixed layout's range groups).
    pub fn as_columns(self) -> Option<usize> {
        match self {
            Self::PerChannel => None,
            Self::Columns(g) => Some(g),
        }
    }

    /// Columns per group for a layer `in_features` wide.
    pub fn columns(self, in_features: usize) -> usize {
        match self {
            Self::PerChannel => in_features.max(1),
            Self::Columns(g) => g,
        }
    }

    /// Number of groups, the last one partial when `in_features` is not a multiple.
    pub fn n_groups(self, in_features: usize) -> usize {
        in_features.div_ceil(self.columns(in_features))
    }
}

impl Serialize for GroupSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_i64(self.as_i64())
    }
}

impl<'de> Deserialize<'de> for GroupSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Self::from_i64(i64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A grid as data: what a recipe names and a format reads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GridSpec {
    /// Integer codes `0..2^bits` with a scale and zero point per group (methods.md §2.1).
    Uniform {
        bits: u8,
        /// Columns per group, `-1` per channel.
        group_size: GroupSize,
        /// Zero point fixed at `2^(bits−1)`.
        #[serde(default)]
        sym: bool,
        /// How each group's range is fitted.
        #[serde(default, skip_serializing_if = "RangeFit::is_min_max")]
        range: RangeFit,
    },
    /// NUPES' power codebook `±(k/Q)^{1/a}` scaled per group by its largest magnitude
    /// (methods.md §5.1), one exponent per layer.
    Power {
        bits: u8,
        /// Columns per group, `-1` per channel.
        group_size: GroupSize,
        /// Which codes carry a level.
        #[serde(default)]
        levels: PowerLevels,
        /// A fixed exponent `a`; absent: searched per layer on `[0.2, 1]`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exponent: Option<f32>,
        /// How each group's scale is fitted (min–max: the largest magnitude).
        #[serde(default, skip_serializing_if = "RangeFit::is_min_max")]
        range: RangeFit,
    },
    /// A GGML block type (`Q4_K`, `Q5_0`, …) or one of llama.cpp's mixes (`Q4_K_M`), each
    /// layer on its type or on llama.cpp's fallback type for its width; fitted as ggml's
    /// reference quantizer fits it.
    Ggml {
        #[serde(rename = "type")]
        ty: GgufFileType,
    },
}

impl GridSpec {
    /// The uniform grid this spec describes, checked.
    pub fn uniform(&self) -> Result<UniformGrid> {
        match *self {
            Self::Uniform {
                bits,
                group_size,
                sym,
                range,
            } => Ok(UniformGrid::new(bits, group_size, sym)?.with_range(range)),
            Self::Power { .. } => bail!("a power grid is not a uniform grid"),
            Self::Ggml { ty } => bail!("the GGML type {ty} is not bitsmith's uniform grid"),
        }
    }

    /// The power grid this spec describes, checked.
    pub fn power(&self) -> Result<PowerGrid> {
        match *self {
            Self::Power {
                bits,
                group_size,
                levels,
                exponent,
                range,
            } => {
                ensure!(
                    range != RangeFit::FullRange,
                    "the full-range fit is for symmetric uniform grids; a power grid's scale \
                     is its group's largest magnitude (minmax) or searched (search)"
                );
                Ok(PowerGrid::new(bits, group_size, levels, exponent)?.with_range(range))
            }
            Self::Uniform { .. } => bail!("a uniform grid is not a power grid"),
            Self::Ggml { ty } => bail!("the GGML type {ty} is not a power grid"),
        }
    }

    /// Check every value.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Uniform { .. } => self.uniform().map(drop),
            Self::Power { .. } => self.power().map(drop),
            Self::Ggml { ty } => {
                ensure!(!ty.is_float(), "{ty} is a float type, not a grid");
                Ok(())
            }
        }
    }

    /// Code bits per weight (a GGML type's codes: 2 for Q2_K, 8 for Q8_0).
    pub fn bits(&self) -> u8 {
        match *self {
            Self::Uniform { bits, .. } | Self::Power { bits, .. } => bits,
            Self::Ggml { ty } => ty.base().code_bits(),
        }
    }

    pub fn group_size(&self) -> GroupSize {
        match *self {
            Self::Uniform { group_size, .. } | Self::Power { group_size, .. } => group_size,
            Self::Ggml { ty } => GroupSize::Columns(ty.base().block_size()),
        }
    }
}

/// What a rounding method picks points on.
pub trait Grid: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// Parameters of one group of one output row (a scale and zero point, …).
    type Params: Copy + Default + Send + Sync + std::fmt::Debug;

    /// Columns per parameter group.
    fn group_size(&self) -> GroupSize;

    /// The grid one layer is solved on, from its weights `[n, k]`: where a per-layer
    /// parameter (a codebook, an exponent) is fitted. Most grids are layer-independent.
    fn for_layer(&self, _weight: &[f32], _n: usize, _k: usize) -> Result<Self> {
        Ok(self.clone())
    }

    /// [`Self::for_layer`] knowing how much each input column's error costs (`importance`,
    /// `[k]`: the Hessian's diagonal when calibration gave one).
    fn for_layer_weighted(
        &self,
        weight: &[f32],
        n: usize,
        k: usize,
        _importance: Option<&[f32]>,
    ) -> Result<Self> {
        self.for_layer(weight, n, k)
    }

    /// Fit one group's parameters to its values.
    fn fit(&self, values: &[f32]) -> Self::Params;

    /// [`Self::fit`] knowing how much each value's error costs (`importance[j]`: the
    /// Hessian's diagonal for the value's column, when calibration gave one). Grids whose
    /// fit does not weigh errors ignore it.
    fn fit_weighted(&self, values: &[f32], _importance: Option<&[f32]>) -> Self::Params {
        self.fit(values)
    }

    /// Whether [`Self::fit_weighted`] searches for the parameters with the least weighted
    /// error over the values it is given (rather than reading them off an extreme): such a
    /// fit must be given exactly the values the parameters will round.
    fn searches_fit(&self) -> bool {
        false
    }

    /// The code nearest `w`; `col` is the column's offset inside its group.
    fn encode(&self, w: f32, p: &Self::Params, col: usize) -> u8;

    /// The value `code` stands for.
    fn decode(&self, code: u8, p: &Self::Params, col: usize) -> f32;

    /// `decode(encode(w))`.
    #[inline]
    fn fake_quant(&self, w: f32, p: &Self::Params, col: usize) -> f32 {
        self.decode(self.encode(w, p, col), p, col)
    }

    /// The grid as data.
    fn spec(&self) -> GridSpec;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_counts() {
        assert_eq!(GroupSize::Columns(128).n_groups(576), 5);
        assert_eq!(GroupSize::PerChannel.n_groups(576), 1);
        assert!(GroupSize::from_i64(0).is_err());
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = GridSpec::Uniform {
            bits: 3,
            group_size: GroupSize::Columns(128),
            sym: true,
            range: RangeFit::MinMax,
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"uniform","bits":3,"group_size":128,"sym":true}"#
        );
        assert_eq!(serde_json::from_str::<GridSpec>(&json).unwrap(), spec);
        let bad = serde_json::from_str::<GridSpec>(r#"{"kind":"uniform","bits":3,"group_size":0}"#)
            .unwrap_err()
            .to_string();
        assert!(bad.contains("group size 0"), "{bad}");
        assert_eq!(spec.uniform().unwrap().spec(), spec);
        let power = GridSpec::Power {
            bits: 3,
            group_size: GroupSize::Columns(128),
            levels: PowerLevels::All,
            exponent: None,
            range: RangeFit::MinMax,
        };
        let json = serde_json::to_string(&power).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"power","bits":3,"group_size":128,"levels":"all"}"#
        );
        assert_eq!(serde_json::from_str::<GridSpec>(&json).unwrap(), power);
        assert_eq!(power.power().unwrap().spec(), power);
        // a searched scale is recorded; full range is refused on a power grid
        let searched = GridSpec::Power {
            bits: 3,
            group_size: GroupSize::Columns(128),
            levels: PowerLevels::All,
            exponent: None,
            range: RangeFit::search(),
        };
        assert_eq!(searched.power().unwrap().spec(), searched);
        let full = GridSpec::Power {
            bits: 3,
            group_size: GroupSize::Columns(128),
            levels: PowerLevels::All,
            exponent: None,
            range: RangeFit::FullRange,
        };
        assert!(full
            .validate()
            .unwrap_err()
            .to_string()
            .contains("full-range"));
        assert!(power.uniform().is_err());
    }
}
