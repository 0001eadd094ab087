//! FlexRound's quantizer (methods.md §4.1) on one linear:
//! `Ŵ = s1 ⊙ clamp(round(W ⊘ (s1 ⊙ S2 ⊙ s3 [⊙ s4])), q_min, q_max)`, every factor learned in
//! log space, `round` passed through by the straight-through estimator. On a codebook
//! (NUPES' power grid) `round` is the nearest unit level and the estimator passes the
//! gradient as if that rounding were the identity between the lowest and highest level:
//! the same rule, on a grid whose steps are not equal. A layout with fixed offsets (GGML
//! Q4_1/Q5_1's `m`) trains `W − M` and adds `M` back: `Ŵ = M + s1 ⊙ clamp(…)`, the
//! gradients unchanged since `M` is a constant.
//!
//! Forward, backward and the Adam update are fused loops over the weights (rayon over
//! rows) rather than a chain of tensor ops: a step of block training then spends its time
//! in the block's matmuls, not in a dozen `[n, k]` temporaries per linear. The block's
//! own backward (candle autograd) supplies `∂L/∂Ŵ`; [`FlexQuantizer::backward`] turns it
//! into the factors' gradients.

use super::exponent::{clamp_exponent, ExponentTable};
use super::layout::ScaleLayout;
use super::FlexRoundOptions;
use crate::quant::LayerCodes;
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

/// The learned factors of one linear, and the constants they act on.
pub struct FlexQuantizer {
    pub layout: ScaleLayout,
    /// `[n · k]`, the float weights (frozen), less their group's offset where the layout
    /// has one.
    weight: Vec<f32>,
    /// `ln s1`, one per scale group: the grid's scale, written as learned (held at the
    /// start's scale where the layout's scales are frozen: a GGML K-quant's).
    pub log_s1: Param,
    /// `ln S2`, one per weight: only steers the rounding, never stored.
    pub log_s2: Param,
    /// `ln s3`, one per output row.
    pub log_s3: Param,
    /// `ln s4`, one per input column (the convolution variant; optional for linears).
    pub log_s4: Option<Param>,
    /// Scale groups that hold no trainable weight (a mixed layer's pruned columns).
    fixed: Vec<bool>,
    /// A codebook layer's exponent, when it is learned too (learned NUPES).
    pub exponent: Option<LearnedExponent>,
}

/// The power grid's exponent as a learned value ([`super::exponent`]).
#[derive(Clone)]
pub struct LearnedExponent {
    table: ExponentTable,
    /// `a`, one value.
    pub a: Param,
    /// `∂v/∂a` of every table entry at the current `a`.
    dv_da: Vec<f32>,
}

/// One learned tensor with its gradient and Adam's moments.
#[derive(Debug, Clone)]
pub struct Param {
    pub value: Vec<f32>,
    pub grad: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Param {
    fn new(value: Vec<f32>) -> Self {
        let n = value.len();
        Self {
            value,
            grad: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Adam (β = 0.9, 0.999, ε = 1e-8, no weight decay) at step `t` (from 1).
    fn adam(&mut self, lr: f32, t: i32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        self.value
            .par_chunks_mut(4096)
            .zip(self.grad.par_chunks(4096))
            .zip(self.m.par_chunks_mut(4096))
            .zip(self.v.par_chunks_mut(4096))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    p[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                }
            });
    }
}

impl FlexQuantizer {
    /// Start from `init`, the layer's codes by another rounding (RTN: the paper's start;
    /// GPTQ: beyond the paper). `S2` is set so that rounding `W ⊘ S` gives back `init`'s
    /// integers wherever a positive division can (a division keeps the sign of `w`, so an
    /// integer of the opposite sign, which GPTQ's error feedback sometimes picks for a
    /// small weight, starts at 0 instead).
    pub fn new(weight: &[f32], init: &LayerCodes, with_s4: bool) -> Result<Self> {
        let layout = ScaleLayout::of(init)?;
        let (n, k) = (layout.out_features, layout.in_features);
        ensure!(
            weight.len() == n * k,
            "weight has {} values for a [{n}, {k}] layer",
            weight.len()
        );
        // a fixed per-group offset (Q4_1/Q5_1's `m`) is taken off before the division and
        // added back after it: FlexRound learns the scaled part, `ŵ − m = s1 · q`
        let weight: Vec<f32> = match &layout.offsets {
            Some(m) => weight
                .iter()
                .zip(&layout.group_of)
                .map(|(&w, &g)| w - m[g as usize])
                .collect(),
            None => weight.to_vec(),
        };
        let log_s2: Vec<f32> = weight
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let g = layout.group_of[i] as usize;
                let (s, q) = (layout.scales[g], layout.q[i]);
                let x = w / s;
                let (reached, _) = layout.round(x, g);
                if reached == q || w == 0.0 || !x.is_finite() {
                    return 0.0;
                }
                // aim at the integer (or level) itself, inside its rounding interval, or
                // near zero on w's side for 0 and for values of the other sign
                let target = if q != 0.0 && (q > 0.0) == (w > 0.0) {
                    q
                } else {
                    layout.near_zero(w, g)
                };
                (x / target).ln()
            })
            .collect();
        let log_s1: Vec<f32> = layout
            .scales
            .iter()
            .map(|s| s.max(f32::MIN_POSITIVE).ln())
            .collect();
        let fixed = layout
            .q_min
            .iter()
            .zip(&layout.q_max)
            .map(|(a, b)| a == b)
            .collect();
        Ok(Self {
            weight,
            log_s1: Param::new(log_s1),
            log_s2: Param::new(log_s2),
            log_s3: Param::new(vec![0.0; n]),
            log_s4: with_s4.then(|| Param::new(vec![0.0; k])),
            fixed,
            layout,
            exponent: None,
        })
    }

    /// The quantizer `options` ask for: `s4` and a learned exponent as they say.
    pub fn with_options(weight: &[f32], init: &LayerCodes, options: &FlexRoundOptions) -> Result<Self> {
        let q = Self::new(weight, init, options.s4)?;
        if options.learn_exponent {
            q.learning_exponent()
        } else {
            Ok(q)
        }
    }

    /// Learn the codebook's exponent too (a layer on NUPES' power grid; an error on an
    /// integer grid, which has none).
    pub fn learning_exponent(mut self) -> Result<Self> {
        let Some(levels) = &self.layout.levels else {
            bail!("only a power-grid (codebook) layer has an exponent to learn")
        };
        // levels that mirror per group are GGML IQ4_NL's fixed table, not a power grid
        ensure!(
            self.layout.mirrored.is_none(),
            "only a power-grid (codebook) layer has an exponent to learn, not a GGML IQ4_NL \
             layer"
        );
        let table = ExponentTable::new(&levels.table, levels.exponent)?;
        let a = levels.exponent;
        self.exponent = Some(LearnedExponent {
            dv_da: table.derivative(a),
            table,
            a: Param::new(vec![a]),
        });
        Ok(self)
    }

    /// Number of learned values.
    pub fn n_parameters(&self) -> usize {
        (if self.layout.scales_frozen {
            0
        } else {
            self.log_s1.value.len()
        }) + self.log_s2.value.len()
            + self.log_s3.value.len()
            + self.log_s4.as_ref().map_or(0, |p| p.value.len())
            + self.exponent.as_ref().map_or(0, |e| e.a.value.len())
    }

    /// `x = w / S` of weight `i` in row `r`, column `j`, scale group `g`.
    #[inline]
    fn scaled(&self, i: usize, r: usize, j: usize, g: usize) -> f32 {
        let mut ls = self.log_s1.value[g] + self.log_s2.value[i] + self.log_s3.value[r];
        if let Some(s4) = &self.log_s4 {
            ls += s4.value[j];
        }
        self.weight[i] * (-ls).exp()
    }

    /// The integer (or codebook level) weight `i` rounds to, and whether it lay inside
    /// its range (where the straight-through gradient passes).
    #[inline]
    fn integer(&self, x: f32, g: usize) -> (f32, bool) {
        let (q, inside) = self.layout.round(x, g);
        (q, inside && !self.fixed[g])
    }

    /// The quantized weights `[n · k]` at the current factors.
    pub fn forward(&self) -> Vec<f32> {
        let k = self.layout.in_features;
        let mut out = vec![0f32; self.weight.len()];
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                for (j, o) in row.iter_mut().enumerate() {
                    let i = r * k + j;
                    let g = self.layout.group_of[i] as usize;
                    let (q, _) = self.integer(self.scaled(i, r, j, g), g);
                    let offset = self.layout.offsets.as_ref().map_or(0.0, |m| m[g]);
                    *o = self.log_s1.value[g].exp() * q + offset;
                }
            });
        out
    }

    /// Set every factor's gradient from `grad_w = ∂L/∂Ŵ` (`[n · k]`) by the
    /// straight-through estimator: with `x = w/S`, `∂Ŵ/∂ln S = −s1·x` inside the range
    /// (0 where the clamp holds), and `ln s1` also scales the output (`∂Ŵ/∂ln s1` adds
    /// `s1·q`).
    ///
    /// One pass over the weights, in parallel over fixed chunks of rows: each chunk writes
    /// its rows of `ln S2`'s gradient in place and sums its share of the `ln s1` (and
    /// `ln s4`) gradients; the chunks' sums are then added in chunk order, so the result
    /// does not depend on the number of threads (a resumed run must repeat the bytes).
    pub fn backward(&mut self, grad_w: &[f32]) {
        const ROWS_PER_CHUNK: usize = 32;
        let (n, k) = (self.layout.out_features, self.layout.in_features);
        let n_groups = self.layout.n_scale_groups();
        let with_s4 = self.log_s4.is_some();
        let mut t = std::mem::take(&mut self.log_s2.grad);
        let mut s3 = std::mem::take(&mut self.log_s3.grad);
        t.resize(n * k, 0.0);
        s3.resize(n, 0.0);
        let this = &*self;
        // the exponent's gradient reaches it through the level each weight rounds to
        let dv_da = this
            .exponent
            .as_ref()
            .zip(this.layout.levels.as_ref())
            .map(|(e, l)| (&e.dv_da, l));
        let partials: Vec<(Vec<f32>, Vec<f32>, f64)> = t
            .par_chunks_mut((k * ROWS_PER_CHUNK).max(1))
            .zip(s3.par_chunks_mut(ROWS_PER_CHUNK))
            .enumerate()
            .map(|(c, (tc, s3c))| {
                let mut g1 = vec![0f32; n_groups];
                let mut g4 = vec![0f32; if with_s4 { k } else { 0 }];
                let mut ga = 0f64;
                for (rr, (tr, s3r)) in tc.chunks_mut(k.max(1)).zip(s3c.iter_mut()).enumerate() {
                    let r = c * ROWS_PER_CHUNK + rr;
                    for (j, tj) in tr.iter_mut().enumerate() {
                        let i = r * k + j;
                        let g = this.layout.group_of[i] as usize;
                        let x = this.scaled(i, r, j, g);
                        let (q, inside) = this.integer(x, g);
                        let s1 = this.log_s1.value[g].exp();
                        *tj = if inside { -grad_w[i] * s1 * x } else { 0.0 };
                        let u = if this.fixed[g] {
                            0.0
                        } else {
                            grad_w[i] * s1 * q
                        };
                        g1[g] += *tj + u;
                        if let Some((dv, l)) = dv_da {
                            ga += (grad_w[i] * s1 * dv[l.nearest(x)]) as f64;
                        }
                    }
                    *s3r = tr.iter().sum();
                    if with_s4 {
                        for (a, v) in g4.iter_mut().zip(tr.iter()) {
                            *a += v;
                        }
                    }
                }
                (g1, g4, ga)
            })
            .collect();
        let mut s1 = std::mem::take(&mut self.log_s1.grad);
        s1.clear();
        s1.resize(n_groups, 0.0);
        for (g1, _, _) in &partials {
            for (a, b) in s1.iter_mut().zip(g1) {
                *a += b;
            }
        }
        self.log_s1.grad = s1;
        if let Some(s4) = &mut self.log_s4 {
            s4.grad.iter_mut().for_each(|g| *g = 0.0);
            for (_, g4, _) in &partials {
                for (a, b) in s4.grad.iter_mut().zip(g4) {
                    *a += b;
                }
            }
        }
        self.log_s2.grad = t;
        self.log_s3.grad = s3;
        if let Some(e) = &mut self.exponent {
            e.a.grad[0] = partials.iter().map(|p| p.2).sum::<f64>() as f32;
        }
    }

    /// One Adam step of every factor with learning rate `lr` (step `t`, from 1).
    pub fn adam_step(&mut self, lr: f32, t: i32) {
        if !self.layout.scales_frozen {
            self.log_s1.adam(lr, t);
        }
        self.log_s2.adam(lr, t);
        self.log_s3.adam(lr, t);
        if let Some(s4) = &mut self.log_s4 {
            s4.adam(lr, t);
        }
        if let Some(e) = &mut self.exponent {
            e.a.adam(lr, t);
            let a = clamp_exponent(e.a.value[0]);
            e.a.value[0] = a;
            e.dv_da = e.table.derivative(a);
            if let Some(levels) = &self.layout.levels {
                let moved = e.table.levels(levels, a);
                self.layout.set_levels(moved);
            }
        }
    }

    /// The integers `q` the current factors round to, `[n · k]`.
    pub fn integers(&self) -> Vec<f32> {
        let k = self.layout.in_features;
        let mut out = vec![0f32; self.weight.len()];
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                for (j, o) in row.iter_mut().enumerate() {
                    let i = r * k + j;
                    let g = self.layout.group_of[i] as usize;
                    *o = self.integer(self.scaled(i, r, j, g), g).0;
                }
            });
        out
    }

    /// Freeze: the integer codes and the learned `s1` as the layer's scales (`S2`, `s3`
    /// and `s4` are dropped, methods.md §4.3 step 4), in `init`'s format.
    pub fn freeze(&self, init: &LayerCodes) -> Result<LayerCodes> {
        let scales: Vec<f32> = self.log_s1.value.iter().map(|l| l.exp()).collect();
        self.layout.write(init, &self.integers(), &scales)
    }
}

/// Cosine decay of the learning rate from `lr` at step 0 to 0 at step `steps`.
pub fn cosine_lr(lr: f64, step: usize, steps: usize) -> f32 {
    let t = step as f64 / steps.max(1) as f64;
    (lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{
        GroupSize, LayerQuantizer, LayerToQuantize, PowerGrid, PowerLevels, Rtn, UniformGrid,
    };
    use crate::quant::grid::GgmlType;
    use crate::util::SplitMix64;

    fn layer(n: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n * k)
            .map(|_| (rng.next_u64() % 20001) as f32 / 10000.0 - 1.0)
            .collect()
    }

    /// Round to nearest with `quantizer` (RTN on some grid).
    fn round_with(quantizer: impl LayerQuantizer, w: &[f32], n: usize, k: usize) -> LayerCodes {
        let layer = LayerToQuantize {
            name: "t",
            weight: w,
            out_features: n,
            in_features: k,
            hessian: None,
        };
        quantizer.quantize(&layer).unwrap().codes
    }

    fn rtn(w: &[f32], n: usize, k: usize, bits: u8, g: GroupSize) -> LayerCodes {
        let grid = UniformGrid::new(bits, g, false).unwrap();
        round_with(Rtn { grid }, w, n, k)
    }

    /// RTN on NUPES' power grid (a codebook layer) at a fixed exponent.
    fn power_rtn(w: &[f32], n: usize, k: usize, levels: PowerLevels) -> LayerCodes {
        let grid = PowerGrid::new(3, GroupSize::Columns(16), levels, Some(0.6)).unwrap();
        round_with(Rtn { grid }, w, n, k)
    }

    /// A K-quant layer's scales are frozen: Adam moves the division, never `s1`, and the
    /// frozen layer keeps every block's scale bytes while its codes move.
    #[test]
    fn k_quant_scales_stay_frozen_while_the_rounding_trains() {
        use crate::quant::grid::ggml::blocks::block_params;
        use crate::quant::grid::ggml::quantize_row;
        use crate::quant::GgmlQuantizedLinear;
        let (n, k) = (4, 512);
        let w = layer(n, k, 3);
        let mut data = vec![];
        quantize_row(GgmlType::Q4K, &w, &mut data).unwrap();
        let init = LayerCodes::Ggml(GgmlQuantizedLinear {
            ty: GgmlType::Q4K,
            out_features: n,
            in_features: k,
            data,
        });
        let mut q = FlexQuantizer::new(&w, &init, false).unwrap();
        assert!(q.layout.scales_frozen);
        let (s1, s2) = (q.log_s1.value.clone(), q.log_s2.value.clone());
        // pull every weight towards its float value plus a tilt, so codes must move
        for t in 1..=30 {
            let out = q.forward();
            let grad: Vec<f32> = out
                .iter()
                .zip(&w)
                .enumerate()
                .map(|(i, (o, x))| o - x + if i % 3 == 0 { 0.05 } else { -0.05 })
                .collect();
            q.backward(&grad);
            q.adam_step(0.05, t);
        }
        assert_eq!(q.log_s1.value, s1);
        assert_ne!(q.log_s2.value, s2);
        let (LayerCodes::Ggml(a), LayerCodes::Ggml(b)) = (&init, &q.freeze(&init).unwrap()) else {
            panic!("a GGML layer freezes to a GGML layer")
        };
        assert_ne!(a.data, b.data, "no code moved");
        for (x, y) in a.data.chunks_exact(144).zip(b.data.chunks_exact(144)) {
            let (px, py) = (
                block_params(GgmlType::Q4K, x).unwrap(),
                block_params(GgmlType::Q4K, y).unwrap(),
            );
            assert_eq!(px.header, py.header);
        }
    }

    /// IQ4_NL, ggml's rounding to nearest of its non-uniform table, as the start.
    fn iq4_nl_rtn(w: &[f32], n: usize, k: usize) -> LayerCodes {
        use crate::quant::grid::ggml::quantize_row;
        use crate::quant::GgmlQuantizedLinear;
        let mut data = vec![];
        quantize_row(GgmlType::Iq4Nl, w, &mut data).unwrap();
        LayerCodes::Ggml(GgmlQuantizedLinear {
            ty: GgmlType::Iq4Nl,
            out_features: n,
            in_features: k,
            data,
        })
    }

    /// IQ4_NL blocks of both signs of `d`: the quantizer starts on their values and
    /// bytes, the straight-through gradients hold on the mirrored levels, training moves
    /// codes and scales towards the float weights and writes blocks that decode to what it
    /// trained, and the table has no exponent to learn.
    #[test]
    fn trains_on_iq4_nl_blocks_of_either_sign() {
        let (n, k) = (4, 64);
        let w = layer(n, k, 8);
        let init = iq4_nl_rtn(&w, n, k);
        let q = FlexQuantizer::new(&w, &init, false).unwrap();
        let mirrored = q.layout.mirrored.clone().unwrap();
        assert!(mirrored.iter().any(|&m| m) && mirrored.iter().any(|&m| !m));
        // the scale comes back through exp(ln s): equal to f32 rounding
        for (a, b) in q.forward().iter().zip(&init.dequantize()) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{a} vs {b}");
        }
        assert_eq!(q.freeze(&init).unwrap(), init);
        let learned = FlexQuantizer::new(&w, &init, false).unwrap().learning_exponent();
        let e = learned.err().expect("IQ4_NL learned an exponent").to_string();
        assert!(e.contains("IQ4_NL"), "{e}");
        check_gradients(&w, &init, false);

        // from a start off the nearest levels (every third code of every other block moved
        // one level, as GPTQ's error feedback moves codes), training on the weights' error
        // comes back towards them (from the nearest levels it cannot: rounding to nearest
        // is that loss's optimum)
        let LayerCodes::Ggml(mut moved) = init.clone() else {
            unreachable!()
        };
        let size = GgmlType::Iq4Nl.type_size();
        for block in moved.data.chunks_exact_mut(size).step_by(2) {
            block[2..].iter_mut().step_by(3).for_each(|b| *b ^= 0x11);
        }
        let init = LayerCodes::Ggml(moved);
        let mut q = FlexQuantizer::new(&w, &init, false).unwrap();
        let sq = |v: &[f32]| -> f64 {
            v.iter()
                .zip(&w)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        let start = sq(&q.forward());
        for t in 1..=60 {
            let grad: Vec<f32> = q.forward().iter().zip(&w).map(|(o, x)| o - x).collect();
            q.backward(&grad);
            q.adam_step(0.01, t);
        }
        let trained = q.forward();
        let frozen = q.freeze(&init).unwrap();
        assert_ne!(frozen, init, "nothing moved");
        // f16 scales: the blocks hold the trained values to f16's precision
        for (a, b) in frozen.dequantize().iter().zip(&trained) {
            assert!((a - b).abs() <= 2e-3 * b.abs().max(1e-3), "{a} vs {b}");
        }
        let end = sq(&frozen.dequantize());
        assert!(end < 0.8 * start, "{end} vs {start}");
    }

    #[test]
    fn starts_exactly_at_its_codebook_codes() {
        let (n, k) = (6, 40);
        let w = layer(n, k, 5);
        for levels in [PowerLevels::Extended, PowerLevels::All, PowerLevels::Symmetric] {
            let init = power_rtn(&w, n, k, levels);
            let q = FlexQuantizer::new(&w, &init, false).unwrap();
            for (a, b) in q.forward().iter().zip(&init.dequantize()) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                    "{levels:?}: {a} vs {b}"
                );
            }
            assert_eq!(q.freeze(&init).unwrap(), init, "{levels:?}");
        }
    }

    /// Codebook codes moved one level (some across zero): the division reaches every
    /// level of `w`'s sign; the others go to the level nearest zero on `w`'s side.
    #[test]
    fn reaches_moved_codebook_levels_of_the_same_sign() {
        let (n, k) = (4, 32);
        let w = layer(n, k, 6);
        for levels in [PowerLevels::Extended, PowerLevels::All] {
            let mut init = power_rtn(&w, n, k, levels);
            let LayerCodes::Codebook(c) = &mut init else {
                unreachable!()
            };
            for (i, code) in c.codes.iter_mut().enumerate() {
                if i % 3 == 0 {
                    *code = (*code as i32 + if i % 2 == 0 { 1 } else { -1 }).clamp(0, 7) as u8;
                }
            }
            let table = c.table.clone();
            let want = ScaleLayout::of(&init).unwrap().q;
            let q = FlexQuantizer::new(&w, &init, false).unwrap();
            let got = q.integers();
            // the level of w's sign nearest zero (zero itself where it is a level)
            let nearest_zero = |sign: f32| {
                table
                    .iter()
                    .copied()
                    .filter(|&v| v == 0.0 || (v > 0.0) == (sign > 0.0))
                    .min_by(|a, b| a.abs().total_cmp(&b.abs()))
                    .unwrap()
            };
            for i in 0..w.len() {
                if want[i] != 0.0 && (want[i] > 0.0) == (w[i] > 0.0) {
                    assert_eq!(got[i], want[i], "{levels:?}: weight {i} = {}", w[i]);
                } else {
                    assert_eq!(got[i], nearest_zero(w[i]), "{levels:?}: weight {i} = {}", w[i]);
                }
            }
        }
    }

    #[test]
    fn starts_exactly_at_its_initial_codes() {
        let (n, k) = (6, 40);
        let w = layer(n, k, 1);
        let init = rtn(&w, n, k, 3, GroupSize::Columns(16));
        let q = FlexQuantizer::new(&w, &init, true).unwrap();
        let start = q.forward();
        for (a, b) in start.iter().zip(&init.dequantize()) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{a} vs {b}");
        }
        assert_eq!(q.freeze(&init).unwrap(), init);
    }

    /// Codes moved off the nearest point (as GPTQ moves them, some across zero): the
    /// division reaches every integer of `w`'s sign and puts the others on 0.
    #[test]
    fn reaches_moved_codes_of_the_same_sign() {
        let (n, k) = (4, 32);
        let w = layer(n, k, 2);
        let mut init = rtn(&w, n, k, 4, GroupSize::PerChannel);
        let LayerCodes::Uniform(ql) = &mut init else {
            unreachable!()
        };
        for (i, c) in ql.codes.iter_mut().enumerate() {
            if i % 3 == 0 {
                *c = (*c as i32 + if i % 2 == 0 { 1 } else { -1 }).clamp(0, 15) as u8;
            }
        }
        let q = FlexQuantizer::new(&w, &init, false).unwrap();
        let got = q.integers();
        let want = ScaleLayout::of(&init).unwrap().q;
        for i in 0..w.len() {
            if want[i] == 0.0 || (want[i] > 0.0) == (w[i] > 0.0) {
                assert_eq!(got[i], want[i], "weight {i} = {}", w[i]);
            } else {
                assert_eq!(got[i], 0.0, "weight {i} = {}", w[i]);
            }
        }
    }

    /// The smooth part of the quantizer in float64 with the rounding held where it is at
    /// `base`: `s1·(x + (round(x₀) − x₀))` inside the range, `s1·clamp(round(x₀))` outside
    /// (written independently of the fused loops).
    fn held_rounding(q: &FlexQuantizer, base: &FlexQuantizer) -> Vec<f64> {
        let (n, k) = (q.layout.out_features, q.layout.in_features);
        let mut out = Vec::with_capacity(n * k);
        for r in 0..n {
            for j in 0..k {
                let i = r * k + j;
                let g = q.layout.group_of[i] as usize;
                let ls = |p: &FlexQuantizer| {
                    p.log_s1.value[g] as f64
                        + p.log_s2.value[i] as f64
                        + p.log_s3.value[r] as f64
                        + p.log_s4.as_ref().map_or(0.0, |s| s.value[j] as f64)
                };
                let x = q.weight[i] as f64 * (-ls(q)).exp();
                let x0 = base.weight[i] as f64 * (-ls(base)).exp();
                let (lo, hi) = (q.layout.q_min[g] as f64, q.layout.q_max[g] as f64);
                let v = match &q.layout.levels {
                    None => {
                        let r0 = x0.round();
                        if r0 >= lo && r0 <= hi {
                            x + (r0 - x0)
                        } else {
                            r0.clamp(lo, hi)
                        }
                    }
                    // the nearest level at the base by search over all of them; its value
                    // at q's exponent when that is learned
                    // (a mirrored group's levels negated)
                    Some(l) => {
                        let sign = match &q.layout.mirrored {
                            Some(m) if m[g] => -1.0,
                            _ => 1.0,
                        };
                        let c0 = (0..l.values.len())
                            .min_by(|&a, &b| {
                                (sign * l.values[a] as f64 - x0)
                                    .abs()
                                    .total_cmp(&(sign * l.values[b] as f64 - x0).abs())
                            })
                            .unwrap();
                        let level = sign
                            * match &q.exponent {
                                Some(e) => e.table.table(e.a.value[0])[c0] as f64,
                                None => l.values[c0] as f64,
                            };
                        if x0 >= lo && x0 <= hi {
                            x + (level - x0)
                        } else {
                            level
                        }
                    }
                };
                out.push((q.log_s1.value[g] as f64).exp() * v);
            }
        }
        out
    }

    /// The straight-through gradient of every factor equals the gradient of the smooth
    /// part (rounding offsets and clamp held), by central differences in float64.
    #[test]
    fn straight_through_gradients_match_finite_differences_of_the_smooth_part() {
        let (n, k) = (3, 20);
        let w = layer(n, k, 3);
        check_gradients(&w, &rtn(&w, n, k, 4, GroupSize::Columns(8)), false);
    }

    #[test]
    fn straight_through_gradients_on_a_codebook_match_finite_differences() {
        let (n, k) = (3, 32);
        let w = layer(n, k, 7);
        check_gradients(&w, &power_rtn(&w, n, k, PowerLevels::Extended), false);
    }

    /// Learned NUPES: the exponent's gradient too (through the levels the codes hold).
    #[test]
    fn the_exponents_gradient_matches_finite_differences() {
        let (n, k) = (3, 32);
        let w = layer(n, k, 8);
        for levels in [PowerLevels::Extended, PowerLevels::All] {
            check_gradients(&w, &power_rtn(&w, n, k, levels), true);
        }
    }

    #[test]
    fn a_learned_exponent_moves_the_table_and_is_written() {
        let (n, k) = (4, 32);
        let w = layer(n, k, 9);
        let init = power_rtn(&w, n, k, PowerLevels::Extended);
        let mut q = FlexQuantizer::new(&w, &init, false)
            .unwrap()
            .learning_exponent()
            .unwrap();
        // a gradient that asks every weight to grow: levels `±f^{1/a}` with `f < 1` grow
        // as `a` rises
        let grow: Vec<f32> = w.iter().map(|&v| -v.signum()).collect();
        for t in 1..=20 {
            q.backward(&grow);
            q.adam_step(1e-2, t);
        }
        let a = q.exponent.as_ref().unwrap().a.value[0];
        assert!(a > 0.6 + 0.05, "exponent {a} did not rise from 0.6");
        let LayerCodes::Codebook(out) = q.freeze(&init).unwrap() else {
            unreachable!()
        };
        assert_eq!(out.exponent, a);
        let want =
            PowerGrid::new(3, GroupSize::Columns(16), PowerLevels::Extended, Some(a)).unwrap();
        for (x, y) in out.table.iter().zip(want.table()) {
            assert!((x - y).abs() <= 1e-5, "{:?} vs {:?}", out.table, want.table());
        }
        // an integer grid has no exponent
        let uniform = rtn(&w, n, k, 3, GroupSize::Columns(16));
        assert!(FlexQuantizer::new(&w, &uniform, false)
            .unwrap()
            .learning_exponent()
            .is_err());
    }

    fn check_gradients(w: &[f32], init: &LayerCodes, exponent: bool) {
        let (n, k) = match init {
            LayerCodes::Uniform(c) => (c.out_features, c.in_features),
            LayerCodes::Codebook(c) => (c.out_features, c.in_features),
            LayerCodes::Ggml(c) => (c.out_features, c.in_features),
            _ => unreachable!(),
        };
        let mut q = FlexQuantizer::new(w, init, true).unwrap();
        if exponent {
            q = q.learning_exponent().unwrap();
        }
        // move off the start so no factor sits at a special value
        for (i, v) in q.log_s2.value.iter_mut().enumerate() {
            *v += 0.01 * ((i % 7) as f32 - 3.0);
        }
        let proj: Vec<f32> = layer(n, k, 4);
        q.backward(&proj);
        let loss = |q: &FlexQuantizer, base: &FlexQuantizer| -> f64 {
            held_rounding(q, base)
                .iter()
                .zip(&proj)
                .map(|(a, &b)| a * b as f64)
                .sum()
        };
        let base = FlexQuantizer {
            layout: q.layout.clone(),
            weight: q.weight.clone(),
            log_s1: q.log_s1.clone(),
            log_s2: q.log_s2.clone(),
            log_s3: q.log_s3.clone(),
            log_s4: q.log_s4.clone(),
            fixed: q.fixed.clone(),
            exponent: q.exponent.clone(),
        };
        let mut nonzero = 0;
        let mut which: Vec<fn(&mut FlexQuantizer) -> &mut Param> = vec![
            |q| &mut q.log_s1,
            |q| &mut q.log_s2,
            |q| &mut q.log_s3,
            |q| q.log_s4.as_mut().unwrap(),
        ];
        if exponent {
            which.push(|q| &mut q.exponent.as_mut().unwrap().a);
        }
        let mut exponent_checked = !exponent;
        for (f, pick) in which.iter().enumerate() {
            let len = pick(&mut q).value.len();
            for e in (0..len).step_by(len.div_ceil(7).max(1)) {
                let g = pick(&mut q).grad[e] as f64;
                let h = 1e-3f32;
                let mut at = |d: f32| {
                    let p = pick(&mut q);
                    let old = p.value[e];
                    p.value[e] = old + d;
                    let l = loss(&q, &base);
                    pick(&mut q).value[e] = old;
                    l
                };
                let fd = (at(h) - at(-h)) / (2.0 * h as f64);
                assert!(
                    (fd - g).abs() <= 1e-3 * fd.abs().max(g.abs()).max(1e-3),
                    "factor {f}, element {e}: straight-through {g} vs finite differences {fd}"
                );
                nonzero += (g != 0.0) as usize;
                exponent_checked |= f == 4 && g != 0.0;
            }
        }
        assert!(nonzero >= 10, "only {nonzero} nonzero gradients checked");
        assert!(exponent_checked, "the exponent's gradient was 0");
    }
}
