//! A quantized linear seen as FlexRound trains it: every weight belongs to one scale
//! group (a row's group of columns, of one width) with a scale, a zero point and the
//! range of integers `q = code − zero` its codes may take. Uniform (GPTQ layout) and
//! mixed-width (BAQ) layers both reduce to this, so one quantizer serves every plan; a
//! codebook layer (NUPES' power grid) does too, its "integers" being the table's unit
//! levels and its rounding the nearest level ([`CodebookLevels`]).

use crate::quant::{CodebookQuantizedLinear, LayerCodes, QuantizedLinear};
use anyhow::{ensure, Result};
use half::f16;

/// The unit levels a codebook layer rounds to, ascending, and the midpoints between
/// neighbours: a value rounds to the level whose interval holds it, as the power grid's
/// own round-to-nearest does. The level's index is its code (the used codes are the
/// table's ascending prefix; a spare code after them is never chosen).
#[derive(Debug, Clone)]
pub struct CodebookLevels {
    pub values: Vec<f32>,
    pub thresholds: Vec<f32>,
    /// The whole table (`2^bits` entries, spare codes included) and the exponent it was
    /// built with: what a frozen layer stores.
    pub table: Vec<f32>,
    pub exponent: f32,
}

impl CodebookLevels {
    pub fn of(table: &[f32], exponent: f32) -> Result<Self> {
        let used = 1 + table.windows(2).take_while(|p| p[0] < p[1]).count();
        ensure!(
            used >= 2 && table.iter().all(|v| v.is_finite()),
            "a codebook needs at least two ascending finite levels, got {table:?}"
        );
        Ok(Self::with_used(table.to_vec(), used, exponent))
    }

    /// The first `used` entries of `table` as the levels, with their midpoints.
    fn with_used(table: Vec<f32>, used: usize, exponent: f32) -> Self {
        let values = table[..used].to_vec();
        let thresholds = values
            .windows(2)
            .map(|p| ((p[0] as f64 + p[1] as f64) / 2.0) as f32)
            .collect();
        Self {
            values,
            thresholds,
            table,
            exponent,
        }
    }

    /// The same used codes on another table (the power grid at another exponent: the
    /// order of the levels, hence the used prefix, does not change).
    pub fn rebuilt(&self, table: Vec<f32>, exponent: f32) -> Self {
        Self::with_used(table, self.values.len(), exponent)
    }

    /// Index (= code) of the level nearest `x`.
    #[inline]
    pub fn nearest(&self, x: f32) -> usize {
        self.thresholds.partition_point(|&t| t < x)
    }

    /// A value with the sign of `sign` that rounds to the level of that sign nearest
    /// zero (or to zero where zero is a level): half the smallest threshold on that side.
    fn near_zero(&self, sign: f32) -> f32 {
        let side = |t: &&f32| if sign > 0.0 { **t > 0.0 } else { **t < 0.0 };
        match self
            .thresholds
            .iter()
            .filter(side)
            .min_by(|a, b| a.abs().total_cmp(&b.abs()))
        {
            Some(t) => t / 2.0,
            // every level lies on the other side: the one nearest zero
            None if sign > 0.0 => self.values[self.values.len() - 1],
            None => self.values[0],
        }
    }
}

/// The scale groups of one `[n, k]` linear.
#[derive(Debug, Clone)]
pub struct ScaleLayout {
    pub out_features: usize,
    pub in_features: usize,
    /// Scale group of every weight, row-major `[n · k]`.
    pub group_of: Vec<u32>,
    /// Per scale group.
    pub scales: Vec<f32>,
    pub zeros: Vec<u8>,
    /// Lowest and highest integer `q = code − zero` of every scale group; both 0 for the
    /// pruned columns of a mixed layer (their weight stays 0).
    pub q_min: Vec<f32>,
    pub q_max: Vec<f32>,
    /// Integer `q = code − zero` of every weight as the layer holds it now (a codebook
    /// layer: the code's unit level).
    pub q: Vec<f32>,
    /// A codebook layer's levels (`q_min`/`q_max` are then its lowest and highest level,
    /// the zeros 0); `None` for integer grids.
    pub levels: Option<CodebookLevels>,
    /// Per scale group, a fixed value added after scaling, `ŵ = s · q + m` (GGML Q4_1 and
    /// Q5_1 blocks' `m`, which is no integer multiple of the scale); `None` where the zero
    /// is an integer.
    pub offsets: Option<Vec<f32>>,
    /// The scales cannot be stored as learned (a GGML K-quant's sub-block scales, small
    /// integers under the super-block's `d`): FlexRound keeps `s1` at the start's scales
    /// and learns only the rounding ([`super::ggml_blocks`]).
    pub scales_frozen: bool,
    /// Per scale group, whether it rounds to the negated levels (`None`: no group does).
    /// A GGML IQ4_NL block with a negative `d` decodes `d · T[c] = |d| · (−T[c])`: trained
    /// with `|d|` (scales are learned in log space), its levels are `−T`, which ggml's
    /// asymmetric table `T` does not hold ([`super::ggml_blocks`]).
    pub mirrored: Option<Vec<bool>>,
}

impl ScaleLayout {
    /// The layout of `codes` (a layer `[n, k]`); of the GGML types the 32-weight uniform
    /// ones ([`super::ggml_blocks`]).
    pub fn of(codes: &LayerCodes) -> Result<Self> {
        Ok(match codes {
            LayerCodes::Codebook(c) => Self::of_codebook(c)?,
            LayerCodes::Ggml(q) => super::ggml_blocks::layout(q)?,
            LayerCodes::Uniform(q) => Self::of_uniform(q),
            LayerCodes::MixedCodebook(_) => anyhow::bail!(
                "FlexRound does not run on BAQ's power codebooks (a table per width) yet"
            ),
            LayerCodes::Mixed(m) => {
                let (n, k) = (m.out_features, m.in_features);
                let groups = m.groups();
                let n_groups = groups.n_groups();
                // one extra group holds the pruned columns: scale 1, range [0, 0]
                let pruned = (n_groups * n) as u32;
                let mut group_of = vec![0u32; n * k];
                for r in 0..n {
                    for j in 0..k {
                        let g = groups.group_of_column[j];
                        group_of[r * k + j] = if g == u32::MAX {
                            pruned
                        } else {
                            g * n as u32 + r as u32
                        };
                    }
                }
                let mut q_max: Vec<f32> = (0..n_groups * n)
                    .map(|i| {
                        let g = i / n.max(1);
                        ((1u32 << groups.group_width[g]) - 1) as f32 - m.zeros[i] as f32
                    })
                    .collect();
                let mut q_min: Vec<f32> = m.zeros.iter().map(|&z| -(z as f32)).collect();
                let mut scales: Vec<f32> = m.scales.iter().map(|s| s.to_f32()).collect();
                let mut zeros = m.zeros.clone();
                q_max.push(0.0);
                q_min.push(0.0);
                scales.push(1.0);
                zeros.push(0);
                let q = codes_to_q(&m.codes, &group_of, &zeros);
                Self {
                    out_features: n,
                    in_features: k,
                    group_of,
                    scales,
                    zeros,
                    q_min,
                    q_max,
                    q,
                    levels: None,
                    offsets: None,
                    scales_frozen: false,
                    mirrored: None,
                }
            }
        })
    }

    fn of_codebook(c: &CodebookQuantizedLinear) -> Result<Self> {
        let (n, k) = (c.out_features, c.in_features);
        let levels = CodebookLevels::of(&c.table, c.exponent)?;
        let mut group_of = vec![0u32; n * k];
        for r in 0..n {
            for j in 0..k {
                group_of[r * k + j] = c.g_idx[j] * n as u32 + r as u32;
            }
        }
        let groups = c.scales.len();
        let mut layout = Self {
            out_features: n,
            in_features: k,
            group_of,
            scales: c.scales.iter().map(|s| s.to_f32()).collect(),
            zeros: vec![0; groups],
            q_min: vec![],
            q_max: vec![],
            q: c.codes.iter().map(|&code| c.table[code as usize]).collect(),
            levels: None,
            offsets: None,
            scales_frozen: false,
            mirrored: None,
        };
        layout.set_levels(levels);
        Ok(layout)
    }

    /// Put a codebook layer on `levels` (a learned exponent's new table): every group's
    /// range becomes its lowest and highest level.
    pub fn set_levels(&mut self, levels: CodebookLevels) {
        let groups = self.scales.len();
        let (lo, hi) = (levels.values[0], levels.values[levels.values.len() - 1]);
        self.q_min = vec![lo; groups];
        self.q_max = vec![hi; groups];
        self.levels = Some(levels);
    }

    fn of_uniform(ql: &QuantizedLinear) -> Self {
        let (n, k) = (ql.out_features, ql.in_features);
        let mut group_of = vec![0u32; n * k];
        for r in 0..n {
            for j in 0..k {
                group_of[r * k + j] = ql.g_idx[j] * n as u32 + r as u32;
            }
        }
        let top = ql.grid.max_code() as f32;
        let q = codes_to_q(&ql.codes, &group_of, &ql.zeros);
        Self {
            out_features: n,
            in_features: k,
            group_of,
            scales: ql.scales.iter().map(|s| s.to_f32()).collect(),
            zeros: ql.zeros.clone(),
            q_min: ql.zeros.iter().map(|&z| -(z as f32)).collect(),
            q_max: ql.zeros.iter().map(|&z| top - z as f32).collect(),
            q,
            levels: None,
            offsets: None,
            scales_frozen: false,
            mirrored: None,
        }
    }

    /// What `x` (a weight divided by its learned scale) rounds to in scale group `g`: the
    /// integer (or the codebook level), and whether `x` lay inside the group's range, where
    /// the straight-through estimator passes the gradient.
    #[inline]
    pub fn round(&self, x: f32, g: usize) -> (f32, bool) {
        let (lo, hi) = (self.q_min[g], self.q_max[g]);
        match &self.levels {
            None => {
                let r = x.round();
                (r.clamp(lo, hi), r >= lo && r <= hi)
            }
            // a fixed group (a zero scale): its one value, as the integer grid's clamp gives
            Some(_) if lo == hi => (lo, false),
            Some(l) if self.is_mirrored(g) => (-l.values[l.nearest(-x)], x >= lo && x <= hi),
            Some(l) => (l.values[l.nearest(x)], x >= lo && x <= hi),
        }
    }

    #[inline]
    fn is_mirrored(&self, g: usize) -> bool {
        self.mirrored.as_ref().is_some_and(|m| m[g])
    }

    /// Where a weight of sign `sign` in scale group `g` is aimed when its start's integer
    /// cannot be reached by a positive division (0, or the other sign): inside the
    /// rounding interval of the value nearest zero on its side (`±¼` on an integer grid:
    /// inside zero's interval).
    pub fn near_zero(&self, sign: f32, g: usize) -> f32 {
        match &self.levels {
            None => 0.25f32.copysign(sign),
            Some(l) if self.is_mirrored(g) => -l.near_zero(-sign),
            Some(l) => l.near_zero(sign),
        }
    }

    pub fn n_scale_groups(&self) -> usize {
        self.scales.len()
    }

    /// `codes` with new integers `q` (`[n · k]`, inside each group's range) and new scales
    /// (`[n_scale_groups]`), stored as the layer stores them (f16 scales).
    pub fn write(&self, codes: &LayerCodes, q: &[f32], scales: &[f32]) -> Result<LayerCodes> {
        ensure!(
            q.len() == self.group_of.len() && scales.len() == self.scales.len(),
            "FlexRound produced {} integers and {} scales for a layout of {} and {}",
            q.len(),
            scales.len(),
            self.group_of.len(),
            self.scales.len()
        );
        // built only for the layouts that store one code per weight (GGML blocks pack
        // their own, with each block's sign folded in)
        let new_codes = || -> Vec<u8> {
            q.iter()
            .zip(&self.group_of)
            .map(|(&v, &g)| {
                let g = g as usize;
                let v = v.clamp(self.q_min[g], self.q_max[g]);
                match &self.levels {
                    // a level rounds to its own index: the thresholds lie between levels
                    Some(l) => l.nearest(v) as u8,
                    None => (v + self.zeros[g] as f32) as u8,
                }
            })
            .collect()
        };
        let f16s =
            |n: usize| -> Vec<f16> { scales[..n].iter().map(|&s| f16::from_f32(s)).collect() };
        Ok(match codes {
            LayerCodes::Codebook(c) => {
                let mut out = c.clone();
                out.codes = new_codes();
                out.scales = f16s(c.scales.len());
                if let Some(l) = &self.levels {
                    // the table the codes were chosen on (a learned exponent's)
                    out.table = l.table.clone();
                    out.exponent = l.exponent;
                }
                LayerCodes::Codebook(out)
            }
            LayerCodes::Ggml(g) => {
                LayerCodes::Ggml(super::ggml_blocks::write(self, g, q, scales)?)
            }
            LayerCodes::Uniform(ql) => {
                let mut out = ql.clone();
                out.codes = new_codes();
                out.scales = f16s(ql.scales.len());
                LayerCodes::Uniform(out)
            }
            LayerCodes::MixedCodebook(_) => {
                anyhow::bail!("FlexRound does not run on BAQ's power codebooks yet")
            }
            LayerCodes::Mixed(m) => {
                let mut out = m.clone();
                // pruned columns hold code 0 in the mixed layout, whatever their group says
                let groups = m.groups();
                let k = m.in_features;
                out.codes = new_codes()
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        if groups.group_of_column[i % k] == u32::MAX {
                            m.codes[i]
                        } else {
                            c
                        }
                    })
                    .collect();
                out.scales = f16s(m.scales.len());
                LayerCodes::Mixed(out)
            }
        })
    }
}

fn codes_to_q(codes: &[u8], group_of: &[u32], zeros: &[u8]) -> Vec<f32> {
    codes
        .iter()
        .zip(group_of)
        .map(|(&c, &g)| c as f32 - zeros[g as usize] as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{GroupSize, LayerToQuantize, Rtn, UniformGrid};

    #[test]
    fn rewriting_the_same_integers_gives_the_same_layer() {
        let (n, k) = (5, 40);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0)
            .collect();
        let grid = UniformGrid::new(3, GroupSize::Columns(16), false).unwrap();
        let layer = LayerToQuantize {
            name: "x",
            weight: &w,
            out_features: n,
            in_features: k,
            hessian: None,
        };
        let codes: LayerCodes = Rtn { grid }.round(&layer).unwrap().into();
        let l = ScaleLayout::of(&codes).unwrap();
        assert_eq!(l.n_scale_groups(), 3 * n);
        let again = l.write(&codes, &l.q, &l.scales).unwrap();
        assert_eq!(again, codes);
        let deq = codes.dequantize();
        for (i, &v) in deq.iter().enumerate() {
            let g = l.group_of[i] as usize;
            assert_eq!(v, l.scales[g] * l.q[i]);
            assert!(l.q[i] >= l.q_min[g] && l.q[i] <= l.q_max[g]);
        }
    }
}
