//! GGML's 32-weight uniform blocks as FlexRound's scale groups: each block of a row is a
//! group whose scale is the block's `d` and whose integers are `code − zero`, so FlexRound
//! trains on exactly the blocks llama.cpp reads and writes them back as blocks (the learned
//! `s1` becomes the block's f16 `d`). Q4_1 and Q5_1 blocks also hold an offset `m`
//! (`w = d · q + m`), no integer multiple of `d`: it becomes the group's fixed offset,
//! kept as the block stores it, and FlexRound trains the scaled part.
//!
//! ggml's Q4_0 and Q5_0 put a block's signed extreme on the lowest code, so `d` is negative
//! whenever that extreme is positive. FlexRound learns scales in log space, so such a block
//! is trained with `|d|` and its integers negated (range `[−(half−1), half]` instead of
//! `[−half, half−1]`; `|d| · q` is still the weight), and written back with the sign
//! restored. The K-quants (two-level scales) and IQ4_NL (a table) are not modelled.

use super::layout::ScaleLayout;
use crate::quant::grid::ggml::blocks::pack_block;
use crate::quant::grid::ggml::{BlockParams, GgmlType, QK};
use crate::quant::GgmlQuantizedLinear;
use anyhow::{bail, ensure, Result};
use half::f16;

/// The block types FlexRound trains on.
pub const FLEXROUND_GGML_TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

/// `code − integer` of `ty`'s blocks, and the largest integer magnitudes of a positive
/// `d`'s range `[−low, high]`.
fn zero_and_range(ty: GgmlType) -> Result<(f32, f32, f32)> {
    Ok(match ty {
        GgmlType::Q4_0 => (8.0, 8.0, 7.0),
        GgmlType::Q5_0 => (16.0, 16.0, 15.0),
        // stored as signed bytes, offset by 128 in bitsmith's codes; ±127 as ggml rounds
        GgmlType::Q8_0 => (128.0, 127.0, 127.0),
        // the offset is `m`, the codes are the integers
        GgmlType::Q4_1 => (0.0, 0.0, 15.0),
        GgmlType::Q5_1 => (0.0, 0.0, 31.0),
        other => bail!(
            "FlexRound runs on GGML Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks, not on {other}: \
             its two-level scales or table are not modelled (use --method gptq)"
        ),
    })
}

/// Whether `ty`'s blocks hold an offset `m` after `d`.
fn has_offset(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1)
}

/// The `m` of every block of an offset type, row-major `[n · k/32]`.
fn block_offsets(q: &GgmlQuantizedLinear) -> Vec<f32> {
    q.data
        .chunks_exact(q.ty.type_size())
        .map(|b| f16::from_le_bytes([b[2], b[3]]).to_f32())
        .collect()
}

/// The signed `d` of every block, row-major `[n · k/32]`.
fn block_scales(q: &GgmlQuantizedLinear) -> Vec<f32> {
    q.data
        .chunks_exact(q.ty.type_size())
        .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

/// The scale groups of a layer of one of [`FLEXROUND_GGML_TYPES`].
pub fn layout(q: &GgmlQuantizedLinear) -> Result<ScaleLayout> {
    let (_, low, high) = zero_and_range(q.ty)?;
    let (n, k) = (q.out_features, q.in_features);
    ensure!(
        k % QK == 0,
        "a {} layer of {k} columns is not whole blocks",
        q.ty
    );
    let blocks_per_row = k / QK;
    let d = block_scales(q);
    ensure!(
        d.len() == n * blocks_per_row,
        "a [{n}, {k}] {} layer holds {} blocks, not {}",
        q.ty,
        d.len(),
        n * blocks_per_row
    );
    let values = q.dequantize();
    let offsets = has_offset(q.ty).then(|| block_offsets(q));
    let group_of: Vec<u32> = (0..n * k).map(|i| (i / QK) as u32).collect();
    let (mut scales, mut q_min, mut q_max) = (vec![], vec![], vec![]);
    for &d in &d {
        if d == 0.0 {
            // an all-zero block stays one: range [0, 0] (FlexRound leaves it fixed)
            scales.push(1.0);
            q_min.push(0.0);
            q_max.push(0.0);
        } else if d > 0.0 {
            scales.push(d);
            q_min.push(-low);
            q_max.push(high);
        } else {
            scales.push(-d);
            q_min.push(-high);
            q_max.push(low);
        }
    }
    let q_int: Vec<f32> = values
        .iter()
        .zip(&group_of)
        .map(|(&v, &g)| {
            let m = offsets.as_ref().map_or(0.0, |m| m[g as usize]);
            let d = d[g as usize];
            if d == 0.0 {
                0.0
            } else {
                ((v - m) / d.abs()).round()
            }
        })
        .collect();
    Ok(ScaleLayout {
        out_features: n,
        in_features: k,
        group_of,
        zeros: vec![0; scales.len()],
        scales,
        q_min,
        q_max,
        q: q_int,
        levels: None,
        offsets,
    })
}

/// `init`'s blocks with new integers `ints` (inside each group's range) and new positive
/// scales, each block's `d` taking its start's sign and f16 rounding (and its `m`, for
/// the offset types, the start's).
pub fn write(
    layout: &ScaleLayout,
    init: &GgmlQuantizedLinear,
    ints: &[f32],
    scales: &[f32],
) -> Result<GgmlQuantizedLinear> {
    let (zero, _, _) = zero_and_range(init.ty)?;
    let signs = block_scales(init);
    let mut data = Vec::with_capacity(init.data.len());
    for (b, (&sign, &s)) in signs.iter().zip(scales).enumerate() {
        let (lo, hi) = (layout.q_min[b], layout.q_max[b]);
        let d = if sign == 0.0 { 0.0 } else { s.copysign(sign) };
        let mut p = BlockParams::default();
        p.header[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        if has_offset(init.ty) {
            // `m` as the start's block stores it
            let at = b * init.ty.type_size();
            p.header[2..4].copy_from_slice(&init.data[at + 2..at + 4]);
        }
        let flip = if sign < 0.0 { -1.0 } else { 1.0 };
        let codes: Vec<u8> = ints[b * QK..(b + 1) * QK]
            .iter()
            .map(|&v| (zero + flip * v.clamp(lo, hi)) as u8)
            .collect();
        pack_block(init.ty, &p, &codes, &mut data);
    }
    Ok(GgmlQuantizedLinear {
        data,
        ..init.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::grid::ggml::quantize_row;

    fn layer(ty: GgmlType, n: usize, k: usize, seed: u64) -> (Vec<f32>, GgmlQuantizedLinear) {
        let mut state = seed;
        let w: Vec<f32> = (0..n * k)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * u * u * 8.0
            })
            .collect();
        let mut data = vec![];
        quantize_row(ty, &w, &mut data).unwrap();
        let q = GgmlQuantizedLinear {
            ty,
            out_features: n,
            in_features: k,
            data,
        };
        (w, q)
    }

    #[test]
    fn blocks_read_as_scale_groups_and_write_back_byte_for_byte() {
        for ty in FLEXROUND_GGML_TYPES {
            let (_, q) = layer(ty, 6, 96, 7 + ty.id() as u64);
            let l = layout(&q).unwrap();
            // the layout's s · q is what llama.cpp decodes, every weight
            let want = q.dequantize();
            for (i, &v) in want.iter().enumerate() {
                let g = l.group_of[i] as usize;
                let m = l.offsets.as_ref().map_or(0.0, |m| m[g]);
                assert_eq!(l.scales[g] * l.q[i] + m, v, "{ty} weight {i}");
                assert!(l.q[i] >= l.q_min[g] && l.q[i] <= l.q_max[g], "{ty} weight {i}");
            }
            // Q4_0/Q5_0 blocks with a positive extreme have a negative d: both signs occur
            if matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0) {
                let d = block_scales(&q);
                assert!(d.iter().any(|&d| d < 0.0) && d.iter().any(|&d| d > 0.0));
            }
            let back = write(&l, &q, &l.q, &l.scales).unwrap();
            assert_eq!(back.data, q.data, "{ty}");
        }
    }

    /// New integers and scales land in the blocks; Q4_1/Q5_1 blocks keep their `m`.
    #[test]
    fn new_integers_and_scales_land_in_the_blocks() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_1] {
            let (_, q) = layer(ty, 3, 64, 5);
            let l = layout(&q).unwrap();
            let m = l.offsets.clone().unwrap_or_else(|| vec![0.0; l.scales.len()]);
            assert_eq!(l.offsets.is_some(), has_offset(ty), "{ty}");
            if has_offset(ty) {
                assert!(m.iter().any(|&m| m != 0.0), "{ty}");
            }
            // every weight on its range's top, every scale halved
            let ints: Vec<f32> = (0..l.q.len())
                .map(|i| l.q_max[l.group_of[i] as usize])
                .collect();
            let scales: Vec<f32> = l.scales.iter().map(|s| s / 2.0).collect();
            let out = write(&l, &q, &ints, &scales).unwrap().dequantize();
            for (i, v) in out.iter().enumerate() {
                let g = l.group_of[i] as usize;
                // a negative block's top integer is its lowest code: the same value s · q
                let want = f16::from_f32(scales[g]).to_f32() * l.q_max[g] + m[g];
                assert_eq!(*v, want, "{ty} weight {i}");
            }
        }
    }

    #[test]
    fn other_block_types_are_named() {
        let (_, q) = layer(GgmlType::Q4K, 1, 256, 1);
        let e = layout(&q).unwrap_err().to_string();
        assert!(e.contains("Q4_K") && e.contains("Q4_1"), "{e}");
    }
}
