//! One uniform layer as compressed-tensors' `pack-quantized` tensors, and back.
//!
//! The rules, from compressed-tensors 0.20 (`compressors/pack_quantized/base.py` and
//! `helpers.py`, `quantization/lifecycle/forward_helpers.py`):
//! - a code is a *signed* integer `q ∈ [−2^(b−1), 2^(b−1))`; `pack_to_int32` stores
//!   `q + 2^(b−1)` as a dense LSB-first bitstream, value `i` of a row at bits
//!   `[i·b, (i+1)·b)`, 32 values in `b` words: `weight_packed` `[out, ceil(in·b/32)]` int32;
//! - the zero point is signed the same way and packed the same way *along the output
//!   dimension* (`packed_dim=0`): `weight_zero_point` `[ceil(out·b/32), n_groups]` int32,
//!   present only for asymmetric group/channel schemes;
//! - `weight = (q − zp) · scale` (`_dequantize`), computed in the scale's dtype;
//!   `weight_scale` is `[out, n_groups]` (`n_groups = 1` for the channel strategy), and
//!   the group strategy needs `in % group_size == 0`.
//!
//! bitsmith's uniform codes are unsigned, `c ∈ [0, 2^b)` with `w = s · (c − z)`. With
//! `q = c − 2^(b−1)` and `zp = z − 2^(b−1)`, `q − zp = c − z`: the stored fields are
//! bitsmith's codes and zero points unchanged, the scales are the same f16 values, and the
//! weights are the same. A symmetric bitsmith grid has `z = 2^(b−1)`, i.e. `zp = 0`, which
//! is compressed-tensors' symmetric scheme (no zero point stored).

use crate::pack::bits;
use crate::quant::{GroupSize, QuantizedLinear};
use anyhow::{bail, ensure, Result};
use half::f16;

/// How the scales of a compressed-tensors weight scheme are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One scale per `group_size` consecutive input columns.
    Group(usize),
    /// One scale per output row.
    Channel,
}

impl Strategy {
    /// The strategy of a bitsmith group size.
    pub fn of(group_size: GroupSize) -> Self {
        match group_size.as_columns() {
            Some(g) => Self::Group(g),
            None => Self::Channel,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Group(_) => "group",
            Self::Channel => "channel",
        }
    }

    pub fn group_size(self) -> Option<usize> {
        match self {
            Self::Group(g) => Some(g),
            Self::Channel => None,
        }
    }

    fn n_groups(self, in_features: usize) -> usize {
        match self {
            Self::Group(g) => in_features / g,
            Self::Channel => 1,
        }
    }
}

/// The weight scheme shared by the layers of one config group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    pub bits: u8,
    pub symmetric: bool,
    pub strategy: Strategy,
}

/// The `pack-quantized` tensors of one linear (`weight_shape` is `[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct PackQuantized {
    pub out_features: usize,
    pub in_features: usize,
    /// `[out, ceil(in·b/32)]`, row-major.
    pub weight_packed: Vec<u32>,
    /// `[out, n_groups]`, row-major.
    pub weight_scale: Vec<f16>,
    /// `[ceil(out·b/32), n_groups]`, row-major; asymmetric schemes only.
    pub weight_zero_point: Option<Vec<u32>>,
}

impl PackQuantized {
    pub fn packed_shape(&self, bits: u8) -> [usize; 2] {
        [
            self.out_features,
            bits::packed_words(self.in_features, bits),
        ]
    }

    pub fn n_groups(&self) -> usize {
        self.weight_scale.len() / self.out_features.max(1)
    }

    pub fn zero_point_shape(&self, bits: u8) -> [usize; 2] {
        [bits::packed_words(self.out_features, bits), self.n_groups()]
    }

    /// Convert `q` (named `name` in errors) to `scheme`. Fails, naming the layer, where the
    /// scheme cannot hold the layer exactly: another width, a symmetric scheme over a
    /// layer with other zero points, a group size that does not divide the input width
    /// (compressed-tensors refuses partial groups), or act-order groups (`g_idx` other
    /// than `j / group_size`: compressed-tensors removed its `actorder: group` and
    /// `weight_g_idx`).
    pub fn from_quantized(name: &str, q: &QuantizedLinear, scheme: Scheme) -> Result<Self> {
        let (n, k, b) = (q.out_features, q.in_features, q.grid.bits);
        ensure!(
            b == scheme.bits,
            "`{name}` has {b}-bit codes, the scheme {} bits",
            scheme.bits
        );
        let half = 1u8 << (b - 1);
        if scheme.symmetric {
            if let Some(i) = q.zeros.iter().position(|&z| z != half) {
                bail!(
                    "`{name}` has zero point {} (group {}, row {}) where a symmetric {b}-bit \
                     scheme has {half}",
                    q.zeros[i],
                    i / n,
                    i % n
                );
            }
        }
        let n_groups = scheme.strategy.n_groups(k);
        if let Strategy::Group(g) = scheme.strategy {
            ensure!(
                k.is_multiple_of(g),
                "`{name}` has {k} input columns, not a whole number of groups of {g}: \
                 compressed-tensors' group strategy needs the group size to divide every \
                 layer's input width (quantize with a group size that does)"
            );
        }
        let group_of = |j: usize| scheme.strategy.group_size().map_or(0, |g| j / g);
        ensure!(
            q.n_groups() == n_groups,
            "`{name}` has {} scale groups, the {} strategy {n_groups}",
            q.n_groups(),
            scheme.strategy.name()
        );
        if let Some(j) = (0..k).find(|&j| q.g_idx[j] as usize != group_of(j)) {
            bail!(
                "`{name}` is act-order quantized (input column {j} is in group {}, not {}): \
                 compressed-tensors' pack-quantized format has no group index \
                 (`actorder: group` and `weight_g_idx` were removed); quantize without \
                 --act-order to export it",
                q.g_idx[j],
                group_of(j)
            );
        }

        let words = bits::packed_words(k, b);
        let mut weight_packed = vec![0u32; n * words];
        for (row, out) in weight_packed.chunks_exact_mut(words.max(1)).enumerate() {
            bits::pack_into(q.codes[row * k..(row + 1) * k].iter().copied(), b, out);
        }
        // bitsmith keeps scales and zeros `[n_groups, out]`; compressed-tensors `[out, …]`
        let transpose = |v: &[f16]| -> Vec<f16> {
            (0..n)
                .flat_map(|r| (0..n_groups).map(move |g| v[g * n + r]))
                .collect()
        };
        let weight_zero_point = (!scheme.symmetric).then(|| {
            // packed along the output dimension: column `g` is the stream of group g's
            // zero points over the rows
            let zwords = bits::packed_words(n, b);
            let mut column = vec![0u32; zwords];
            let mut packed = vec![0u32; zwords * n_groups];
            for g in 0..n_groups {
                column.iter_mut().for_each(|w| *w = 0);
                bits::pack_into(q.zeros[g * n..(g + 1) * n].iter().copied(), b, &mut column);
                for (r, &w) in column.iter().enumerate() {
                    packed[r * n_groups + g] = w;
                }
            }
            packed
        });
        Ok(Self {
            out_features: n,
            in_features: k,
            weight_packed,
            weight_scale: transpose(&q.scales),
            weight_zero_point,
        })
    }

    /// The weights as compressed-tensors computes them, in f32: unpack the fields, subtract
    /// the offset `2^(b−1)` from codes and zero points, `(q − zp) · scale`. Written from
    /// the package's rules, independently of [`QuantizedLinear::dequantize`], so the two can
    /// be compared.
    pub fn dequantize(&self, scheme: Scheme) -> Vec<f32> {
        let (n, k, b) = (self.out_features, self.in_features, scheme.bits);
        let offset = 1i32 << (b - 1);
        let n_groups = self.n_groups();
        let words = bits::packed_words(k, b);
        let zero_point = |r: usize, g: usize| -> i32 {
            match &self.weight_zero_point {
                None => 0,
                Some(z) => {
                    let column: Vec<u32> = (0..bits::packed_words(n, b))
                        .map(|w| z[w * n_groups + g])
                        .collect();
                    bits::get(&column, b, r) as i32 - offset
                }
            }
        };
        let mut out = vec![0f32; n * k];
        for r in 0..n {
            let row = &self.weight_packed[r * words..(r + 1) * words];
            let zps: Vec<i32> = (0..n_groups).map(|g| zero_point(r, g)).collect();
            for j in 0..k {
                let g = scheme.strategy.group_size().map_or(0, |gs| j / gs);
                let q = bits::get(row, b, j) as i32 - offset;
                out[r * k + j] = (q - zps[g]) as f32 * self.weight_scale[r * n_groups + g].to_f32();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{LayerToQuantize, Rtn, UniformGrid};

    fn layer(n: usize, k: usize, bits: u8, g: GroupSize, sym: bool) -> QuantizedLinear {
        let w: Vec<f32> = (0..n * k)
            .map(|i| (((i * 7919) % 1013) as f32 / 1013.0 - 0.3) * 0.1)
            .collect();
        Rtn {
            grid: UniformGrid::new(bits, g, sym).unwrap(),
        }
        .quantize_layer(&LayerToQuantize {
            name: "t",
            weight: &w,
            out_features: n,
            in_features: k,
            hessian: None,
        })
        .unwrap()
    }

    /// compressed-tensors' `pack_to_int32` worked by hand: signed codes −8..7 are stored
    /// plus 8, value i of a row at bits 4i; zero points run down the rows.
    #[test]
    fn packing_matches_pack_to_int32_by_hand() {
        let mut q = layer(2, 8, 4, GroupSize::PerChannel, false);
        q.codes = vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
        q.zeros = vec![3, 12];
        let scheme = Scheme {
            bits: 4,
            symmetric: false,
            strategy: Strategy::Channel,
        };
        let p = PackQuantized::from_quantized("t", &q, scheme).unwrap();
        // signed q = c − 8; stored q + 8 = c
        assert_eq!(p.weight_packed, vec![0x7654_3210, 0xFEDC_BA98]);
        assert_eq!(p.weight_zero_point, Some(vec![0xC3]));
        assert_eq!(p.packed_shape(4), [2, 1]);
        assert_eq!(p.zero_point_shape(4), [1, 1]);
    }

    #[test]
    fn dequantized_weights_equal_bitsmith_s_bit_for_bit() {
        for bits in [2u8, 3, 4, 8] {
            for g in [GroupSize::Columns(32), GroupSize::PerChannel] {
                for sym in [false, true] {
                    let q = layer(24, 96, bits, g, sym);
                    let scheme = Scheme {
                        bits,
                        symmetric: sym,
                        strategy: Strategy::of(g),
                    };
                    let p = PackQuantized::from_quantized("t", &q, scheme).unwrap();
                    assert_eq!(p.weight_zero_point.is_some(), !sym);
                    let (a, b) = (q.dequantize(), p.dequantize(scheme));
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "w{bits} {g:?} sym {sym}"
                    );
                }
            }
        }
    }

    #[test]
    fn partial_groups_and_act_order_are_refused_by_name() {
        let scheme = Scheme {
            bits: 4,
            symmetric: false,
            strategy: Strategy::Group(64),
        };
        let q = layer(8, 96, 4, GroupSize::Columns(64), false);
        let e = PackQuantized::from_quantized("model.x", &q, scheme)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`model.x` has 96 input columns"), "{e}");
        let mut q = layer(8, 128, 4, GroupSize::Columns(64), false);
        q.g_idx.swap(0, 127);
        let e = PackQuantized::from_quantized("model.y", &q, scheme)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`model.y` is act-order"), "{e}");
        let q = layer(8, 128, 4, GroupSize::Columns(64), false);
        let sym = Scheme {
            symmetric: true,
            ..scheme
        };
        assert!(PackQuantized::from_quantized("z", &q, sym).is_err());
    }
}
