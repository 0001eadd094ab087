//! GGML's uniform block types as FlexRound's scale groups: each scale of a block (a
//! 32-weight block's `d`, a K-quant super-block's sub-block `d·sc`) heads one group whose
//! integers are `code − zero`, so FlexRound trains on exactly the blocks llama.cpp reads
//! and writes them back as blocks.
//!
//! * Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: the block's f16 `d` is the group's learned `s1`.
//!   Q4_1 and Q5_1 blocks also hold an offset `m` (`w = d · q + m`), no integer multiple
//!   of `d`: it becomes the group's fixed offset, kept as the block stores it, and
//!   FlexRound trains the scaled part.
//! * The K-quants Q2_K … Q6_K: a sub-block's scale is a 4/6/8-bit integer times the
//!   super-block's f16 `d` (and its offset `dmin` times another), so a learned `s1` could
//!   not be stored without re-rounding it to that grid after training. Their scales stay
//!   as the start fitted them (frozen, [`ScaleLayout::scales_frozen`]) and FlexRound learns
//!   the rounding: the division's `S2`, `s3` (and `s4`) pick every code, and the block is
//!   written back with its scale bytes unchanged.
//!
//! ggml's Q4_0 and Q5_0 put a block's signed extreme on the lowest code, so `d` is negative
//! whenever that extreme is positive (Q3_K's and Q6_K's signed sub-block scales likewise).
//! FlexRound learns scales in log space, so such a group is trained with `|d|` and its
//! integers negated (range `[−(half−1), half]` instead of `[−half, half−1]`; `|d| · q` is
//! still the weight), and written back with the sign restored.
//! * IQ4_NL: a 32-weight block's f16 `d` times one of ggml's 16 non-uniform levels `T`
//!   (−127 … 113), learned like Q4_0's `d`, its codes the nearest level as on NUPES'
//!   codebooks. `T` is not symmetric, so a negative-`d` block, trained with `|d|`, rounds
//!   to the negated levels `−T` ([`ScaleLayout::mirrored`]).

use super::layout::{CodebookLevels, ScaleLayout};
use crate::quant::grid::ggml::blocks::{block_codes, block_params, pack_block};
use crate::quant::grid::ggml::kquants::IQ4_NL_VALUES;
use crate::quant::grid::ggml::{BlockParams, GgmlType};
use crate::quant::GgmlQuantizedLinear;
use anyhow::{bail, ensure, Result};
use half::f16;

/// The block types FlexRound trains on.
pub const FLEXROUND_GGML_TYPES: [GgmlType; 11] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Iq4Nl,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// [`FLEXROUND_GGML_TYPES`] in words, for the refusals that name what FlexRound runs on.
pub const FLEXROUND_TYPES_TEXT: &str =
    "GGML Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL and Q2_K…Q6_K blocks";

/// How one type's blocks split into scale groups.
#[derive(Clone, Copy)]
struct Groups {
    /// Weights per scale (the block, or the K-quant's sub-block).
    width: usize,
    /// `code − integer`.
    zero: f32,
    /// The largest integer magnitudes of a positive scale's range `[−low, high]`.
    low: f32,
    high: f32,
    /// Whether each scale has an offset after it (Q4_1/Q5_1's `m`, the K-quants' `dmin·m`).
    offset: bool,
    /// Whether the scale is a 32-weight block's f16 `d`, learned and stored as learned.
    learned_scale: bool,
    /// The levels a code selects (IQ4_NL); `None`: the integer `code − zero`.
    table: Option<&'static [i8; 16]>,
}

fn groups(ty: GgmlType) -> Result<Groups> {
    let g = |width, zero, low, high, offset, learned_scale| Groups {
        width,
        zero,
        low,
        high,
        offset,
        learned_scale,
        table: None,
    };
    Ok(match ty {
        GgmlType::Q4_0 => g(32, 8.0, 8.0, 7.0, false, true),
        GgmlType::Q5_0 => g(32, 16.0, 16.0, 15.0, false, true),
        // stored as signed bytes, offset by 128 in bitsmith's codes; ±127 as ggml rounds
        GgmlType::Q8_0 => g(32, 128.0, 127.0, 127.0, false, true),
        // the offset is `m`, the codes are the integers
        GgmlType::Q4_1 => g(32, 0.0, 0.0, 15.0, true, true),
        GgmlType::Q5_1 => g(32, 0.0, 0.0, 31.0, true, true),
        // the range is the table's: a positive d's levels run from −127 to 113
        GgmlType::Iq4Nl => Groups {
            table: Some(&IQ4_NL_VALUES),
            ..g(32, 0.0, 127.0, 113.0, false, true)
        },
        GgmlType::Q2K => g(16, 0.0, 0.0, 3.0, true, false),
        GgmlType::Q3K => g(16, 4.0, 4.0, 3.0, false, false),
        GgmlType::Q4K => g(32, 0.0, 0.0, 15.0, true, false),
        GgmlType::Q5K => g(32, 0.0, 0.0, 31.0, true, false),
        GgmlType::Q6K => g(16, 32.0, 32.0, 31.0, false, false),
        other => bail!(
            "FlexRound runs on {FLEXROUND_TYPES_TEXT}, not on {other}: a float type has no \
             rounding to learn"
        ),
    })
}

/// Every block's parameters as stored, row-major `[n · k / block]`.
fn stored_params(q: &GgmlQuantizedLinear) -> Result<Vec<BlockParams>> {
    q.data
        .chunks_exact(q.ty.type_size())
        .map(|b| block_params(q.ty, b))
        .collect()
}

/// Every weight's code as stored, row-major `[n · k]`.
fn stored_codes(q: &GgmlQuantizedLinear) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(q.out_features * q.in_features);
    for b in q.data.chunks_exact(q.ty.type_size()) {
        out.extend(block_codes(q.ty, b)?);
    }
    Ok(out)
}

/// The signed scale and the added offset of every scale group, row-major.
fn group_scales(q: &GgmlQuantizedLinear, params: &[BlockParams]) -> Result<(Vec<f32>, Vec<f32>)> {
    let per_block = q.ty.block_size() / groups(q.ty)?.width;
    let (mut steps, mut offsets) = (vec![], vec![]);
    for p in params {
        for s in 0..per_block {
            steps.push(p.step[s]);
            // the 32-weight types decode `d·q + m`, the K-quants `d·sc·q − dmin·m`
            offsets.push(if q.ty.block_size() == 32 {
                p.offset[s]
            } else {
                -p.offset[s]
            });
        }
    }
    Ok((steps, offsets))
}

/// The scale groups of a layer of one of [`FLEXROUND_GGML_TYPES`].
pub fn layout(q: &GgmlQuantizedLinear) -> Result<ScaleLayout> {
    let kind = groups(q.ty)?;
    let (n, k) = (q.out_features, q.in_features);
    ensure!(
        k % q.ty.block_size() == 0,
        "a {} layer of {k} columns is not whole blocks",
        q.ty
    );
    let params = stored_params(q)?;
    ensure!(
        params.len() * q.ty.block_size() == n * k,
        "a [{n}, {k}] {} layer holds {} blocks, not {}",
        q.ty,
        params.len(),
        n * k / q.ty.block_size()
    );
    let (steps, added) = group_scales(q, &params)?;
    let codes = stored_codes(q)?;
    let offsets = kind.offset.then_some(added);
    // rows are whole blocks, so the groups run through the weights in order
    let group_of: Vec<u32> = (0..n * k).map(|i| (i / kind.width) as u32).collect();
    let (mut scales, mut q_min, mut q_max) = (vec![], vec![], vec![]);
    for &d in &steps {
        if d == 0.0 {
            // an all-zero scale stays one: range [0, 0] (FlexRound leaves it fixed)
            scales.push(1.0);
            q_min.push(0.0);
            q_max.push(0.0);
        } else if d > 0.0 {
            scales.push(d);
            q_min.push(-kind.low);
            q_max.push(kind.high);
        } else {
            scales.push(-d);
            q_min.push(-kind.high);
            q_max.push(kind.low);
        }
    }
    // `d · (code − zero) = |d| · q` (IQ4_NL: `d · T[code]`): a negative scale's integers
    // (levels) are negated
    let q_int: Vec<f32> = codes
        .iter()
        .zip(&group_of)
        .map(|(&c, &g)| {
            let d = steps[g as usize];
            let unit = match kind.table {
                Some(t) => t[c as usize] as f32,
                None => c as f32 - kind.zero,
            };
            if d == 0.0 {
                0.0
            } else {
                unit * d.signum()
            }
        })
        .collect();
    let (levels, mirrored) = match kind.table {
        Some(t) => {
            let t: Vec<f32> = t.iter().map(|&v| v as f32).collect();
            // the exponent is the power grid's; ggml's table has none (1: the identity)
            let levels = CodebookLevels::of(&t, 1.0)?;
            (Some(levels), Some(steps.iter().map(|&d| d < 0.0).collect()))
        }
        None => (None, None),
    };
    Ok(ScaleLayout {
        out_features: n,
        in_features: k,
        group_of,
        zeros: vec![0; scales.len()],
        scales,
        q_min,
        q_max,
        q: q_int,
        levels,
        offsets,
        scales_frozen: !kind.learned_scale,
        mirrored,
    })
}

/// `init`'s blocks with new integers `ints` (inside each group's range) and, for the
/// 32-weight types, new positive scales, each block's `d` taking its start's sign and f16
/// rounding (and its `m`, for the offset types, the start's). The K-quants keep their
/// start's scale bytes (`scales` is ignored: frozen, see the module's note).
pub fn write(
    layout: &ScaleLayout,
    init: &GgmlQuantizedLinear,
    ints: &[f32],
    scales: &[f32],
) -> Result<GgmlQuantizedLinear> {
    let kind = groups(init.ty)?;
    let params = stored_params(init)?;
    let (signs, _) = group_scales(init, &params)?;
    let start_codes = stored_codes(init)?;
    let block = init.ty.block_size();
    let per_block = block / kind.width;
    let mut data = Vec::with_capacity(init.data.len());
    let mut codes = vec![0u8; block];
    for (b, mut p) in params.into_iter().enumerate() {
        for s in 0..per_block {
            let g = b * per_block + s;
            let sign = signs[g];
            let (lo, hi) = (layout.q_min[g], layout.q_max[g]);
            if kind.learned_scale {
                let d = if sign == 0.0 {
                    0.0
                } else {
                    scales[g].copysign(sign)
                };
                p.header[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            }
            let flip = if sign < 0.0 { -1.0 } else { 1.0 };
            let at = g * kind.width;
            let out = &mut codes[s * kind.width..(s + 1) * kind.width];
            if sign == 0.0 {
                // every code decodes alike under a zero scale: keep the stored ones (a
                // K-quant's reference fit leaves its own there)
                out.copy_from_slice(&start_codes[at..at + kind.width]);
                continue;
            }
            for (c, &v) in out.iter_mut().zip(&ints[at..at + kind.width]) {
                let unit = flip * v.clamp(lo, hi);
                *c = match &layout.levels {
                    // a level's index is its code
                    Some(l) if kind.table.is_some() => l.nearest(unit) as u8,
                    _ => (kind.zero + unit) as u8,
                };
            }
        }
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
            let (_, q) = layer(ty, 6, 512, 7 + ty.id() as u64);
            let l = layout(&q).unwrap();
            let width = groups(ty).unwrap().width;
            assert_eq!(l.n_scale_groups(), 6 * 512 / width, "{ty}");
            assert_eq!(l.scales_frozen, ty.block_size() != 32, "{ty}");
            // the layout's s · q + m is what llama.cpp decodes, every weight
            let want = q.dequantize();
            for (i, &v) in want.iter().enumerate() {
                let g = l.group_of[i] as usize;
                let m = l.offsets.as_ref().map_or(0.0, |m| m[g]);
                assert_eq!(l.scales[g] * l.q[i] + m, v, "{ty} weight {i}");
                assert!(l.q[i] >= l.q_min[g] && l.q[i] <= l.q_max[g], "{ty} weight {i}");
            }
            // Q4_0/Q5_0/IQ4_NL blocks with a positive extreme have a negative d, and Q3_K/Q6_K
            // sub-blocks negative scales: both signs occur
            if matches!(
                ty,
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Iq4Nl | GgmlType::Q3K | GgmlType::Q6K
            ) {
                let (d, _) = group_scales(&q, &stored_params(&q).unwrap()).unwrap();
                assert!(
                    d.iter().any(|&d| d < 0.0) && d.iter().any(|&d| d > 0.0),
                    "{ty}"
                );
            }
            let back = write(&l, &q, &l.q, &l.scales).unwrap();
            assert_eq!(back.data, q.data, "{ty}");
        }
    }

    /// New integers and scales land in the blocks; Q4_1/Q5_1 blocks keep their `m`.
    #[test]
    fn new_integers_and_scales_land_in_the_blocks() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_1, GgmlType::Iq4Nl] {
            let (_, q) = layer(ty, 3, 64, 5);
            let l = layout(&q).unwrap();
            let m = l.offsets.clone().unwrap_or_else(|| vec![0.0; l.scales.len()]);
            assert_eq!(l.offsets.is_some(), groups(ty).unwrap().offset, "{ty}");
            if l.offsets.is_some() {
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

    /// The K-quants take new integers in every sub-block and keep their scale bytes (and
    /// offsets), whatever scales are passed: theirs are frozen.
    #[test]
    fn k_quants_take_new_integers_under_their_stored_scales() {
        for ty in [GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            let (_, q) = layer(ty, 2, 512, 9);
            let l = layout(&q).unwrap();
            let m = l.offsets.clone().unwrap_or_else(|| vec![0.0; l.scales.len()]);
            assert_eq!(l.offsets.is_some(), groups(ty).unwrap().offset, "{ty}");
            // alternate each group's bottom and top integer
            let ints: Vec<f32> = (0..l.q.len())
                .map(|i| {
                    let g = l.group_of[i] as usize;
                    if i % 2 == 0 {
                        l.q_min[g]
                    } else {
                        l.q_max[g]
                    }
                })
                .collect();
            let halved: Vec<f32> = l.scales.iter().map(|s| s / 2.0).collect();
            let out = write(&l, &q, &ints, &halved).unwrap();
            let values = out.dequantize();
            for (i, v) in values.iter().enumerate() {
                let g = l.group_of[i] as usize;
                assert_eq!(*v, l.scales[g] * ints[i] + m[g], "{ty} weight {i}");
            }
            let before = stored_params(&q).unwrap();
            let after = stored_params(&out).unwrap();
            for (a, b) in before.iter().zip(&after) {
                assert_eq!(a.header, b.header, "{ty}");
            }
            assert_ne!(out.data, q.data, "{ty}");
        }
    }

    #[test]
    fn float_types_are_refused_by_name() {
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let Err(e) = groups(ty) else {
                panic!("{ty} taken as a block type")
            };
            let e = e.to_string();
            assert!(e.contains(&ty.to_string()) && e.contains("IQ4_NL"), "{e}");
        }
    }
}
