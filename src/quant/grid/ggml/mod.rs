//! GGML's block types as grids: a [`GgmlGrid`]'s group is one block of its type (32
//! weights, or a K-quant's 256-weight super-block whose parameters hold every sub-block's
//! quantized scale and min), fitted exactly as ggml's reference quantizer fits it, so a
//! rounding method (RTN, GPTQ) picks codes on the very values a GGUF file stores, and the
//! codes and parameters pack into that type's blocks byte for byte ([`blocks::pack_block`]).
//! RTN on this grid writes the bytes `llama-quantize` writes without an importance matrix.

pub mod blocks;
mod file_type;
pub mod kquants;
mod layout;
mod search;
mod weighted;

pub use blocks::{dequantize_row, quantize_row, GgmlType, QK};
pub use file_type::{GgufFileType, LinearRole, LlamaMix, MixShape};
pub use kquants::BlockParams;

use super::{Grid, GridSpec, GroupSize};

/// The values a GGML block type can hold, one block per parameter group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlGrid {
    pub ty: GgmlType,
}

impl GgmlGrid {
    /// The grid of `ty` for a layer `in_features` wide: `ty` itself, or the type
    /// llama.cpp's quantizer falls back to when the rows are not whole blocks of it.
    pub fn for_width(ty: GgmlType, in_features: usize) -> Self {
        Self {
            ty: ty.fallback_for(in_features),
        }
    }

    /// The blocks of one layer (`[n, k]` codes with `[k / block, n]` parameters, group
    /// major as [`crate::quant::GridCodes`] holds them), row by row as a GGUF tensor stores
    /// them.
    pub fn pack_rows(&self, codes: &[u8], params: &[BlockParams], n: usize, k: usize) -> Vec<u8> {
        let b = self.ty.block_size();
        let mut out = Vec::with_capacity(n * k / b * self.ty.type_size());
        for r in 0..n {
            for g in 0..k / b {
                let c = &codes[r * k + g * b..r * k + (g + 1) * b];
                blocks::pack_block(self.ty, &params[g * n + r], c, &mut out);
            }
        }
        out
    }
}

impl Grid for GgmlGrid {
    type Params = BlockParams;

    fn group_size(&self) -> GroupSize {
        GroupSize::Columns(self.ty.block_size())
    }

    fn fit(&self, values: &[f32]) -> BlockParams {
        // whole blocks only: the allocation picks a type whose blocks tile the row
        assert_eq!(values.len(), self.ty.block_size(), "a {} block", self.ty);
        blocks::fit_block(self.ty, values).0
    }

    /// With calibration (GPTQ passes the Hessian's diagonal), the fits ggml runs with an
    /// importance matrix; without, its reference fits.
    fn fit_weighted(&self, values: &[f32], importance: Option<&[f32]>) -> BlockParams {
        match importance {
            Some(imp) => {
                assert_eq!(values.len(), self.ty.block_size(), "a {} block", self.ty);
                blocks::fit_block_weighted(self.ty, values, imp)
            }
            None => self.fit(values),
        }
    }

    #[inline]
    fn encode(&self, w: f32, p: &BlockParams, col: usize) -> u8 {
        blocks::encode_block(self.ty, w, p, col)
    }

    #[inline]
    fn decode(&self, code: u8, p: &BlockParams, col: usize) -> f32 {
        blocks::decode_block(self.ty, code, p, col)
    }

    fn spec(&self) -> GridSpec {
        GridSpec::Ggml { ty: self.ty.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{GgmlQuantizedLinear, LayerToQuantize, Rtn};

    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // a few outliers, and blocks whose scale differs
                let boost = if i % 97 == 0 { 6.0 } else { 1.0 };
                u * boost * (1.0 + (i / 256 % 5) as f32)
            })
            .collect()
    }

    /// RTN on the grid is ggml's reference quantizer: the blocks it packs are the bytes
    /// `quantize_row` writes, and the grid decodes every code to the value the consumer's
    /// decoder (`dequantize_row`) computes, bit for bit.
    #[test]
    fn rtn_on_the_grid_writes_the_reference_blocks() {
        let (n, k) = (3, 512);
        let w = weights(n * k, 5);
        for ty in GgmlType::ALL.into_iter().filter(|t| !t.is_float()) {
            let grid = GgmlGrid::for_width(ty, k);
            assert_eq!(grid.ty, ty);
            let codes = Rtn { grid }
                .round(&LayerToQuantize {
                    name: "t",
                    weight: &w,
                    out_features: n,
                    in_features: k,
                    hessian: None,
                })
                .unwrap();
            let values = codes.dequantize();
            let q = GgmlQuantizedLinear::from(codes);
            let mut want = vec![];
            quantize_row(ty, &w, &mut want).unwrap();
            assert_eq!(q.data.len(), want.len(), "{ty}");
            let differing = q
                .data
                .chunks(ty.type_size())
                .zip(want.chunks(ty.type_size()))
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differing, 0, "{ty}: {differing} blocks differ");
            let decoded = dequantize_row(ty, &want).unwrap();
            assert!(
                values
                    .iter()
                    .zip(&decoded)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ty}: the grid decodes differently"
            );
        }
    }

    /// With importance (a few columns weigh 50× the rest, as a Hessian's diagonal does), the
    /// weighted fits round those columns better: the importance-weighted squared error of
    /// nearest-level codes, summed over many blocks (float64), is below the reference fit's
    /// for every type with a weighted fit.
    #[test]
    fn weighted_fits_lower_the_weighted_error() {
        let k = 256 * 8;
        let x = weights(k, 9);
        let importance: Vec<f32> = (0..k)
            .map(|j| if j % 7 == 0 { 50.0 } else { 1.0 })
            .collect();
        for ty in GgmlType::ALL
            .into_iter()
            .filter(|t| !t.is_float() && *t != GgmlType::Q8_0)
        {
            let grid = GgmlGrid { ty };
            let b = ty.block_size();
            let error = |weighted: bool| {
                let mut e = 0f64;
                for (xs, imp) in x.chunks(b).zip(importance.chunks(b)) {
                    let p = if weighted {
                        grid.fit_weighted(xs, Some(imp))
                    } else {
                        grid.fit_weighted(xs, None)
                    };
                    for (c, (&w, &h)) in xs.iter().zip(imp).enumerate() {
                        let q = grid.decode(grid.encode(w, &p, c), &p, c);
                        e += h as f64 * (w as f64 - q as f64).powi(2);
                    }
                }
                e
            };
            let (reference, weighted) = (error(false), error(true));
            assert!(
                weighted < reference,
                "{ty}: weighted fit {weighted} not below the reference fit {reference}"
            );
        }
    }

    #[test]
    fn narrow_layers_take_the_fallback_type() {
        assert_eq!(GgmlGrid::for_width(GgmlType::Q4K, 576).ty, GgmlType::Q5_0);
        assert_eq!(
            GgmlGrid::for_width(GgmlType::Q4K, 1536).group_size(),
            GroupSize::Columns(256)
        );
        let spec = GgmlGrid::for_width(GgmlType::Q6K, 512).spec();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(json, r#"{"kind":"ggml","type":"Q6_K"}"#);
        assert_eq!(serde_json::from_str::<GridSpec>(&json).unwrap(), spec);
        assert!(serde_json::from_str::<GridSpec>(r#"{"kind":"ggml","type":"Q9_K"}"#).is_err());
    }
}
