//! Quantized layers whose grid is a GGML block type, converted code for code.
//!
//! A bitsmith layer on a 4-bit symmetric grid (zero point 8) with groups of 32·k
//! consecutive columns is a Q4_0 layer: every 32-weight block takes its group's f16 scale
//! as `d` and its codes as the nibbles, and `d · (q − 8)` is the value bitsmith's
//! `scale · (code − zero)` computes, bit for bit. An 8-bit symmetric layer (zero 128) is
//! Q8_0 the same way, with `q = code − 128`. Other grids (asymmetric, 3-bit, groups that
//! are not whole blocks, act-order) have no GGML type they convert to without re-rounding.

use super::blocks::{push_codes, GgmlType, QK};
use crate::quant::QuantizedLinear;
use anyhow::{bail, Result};
use half::f16;

/// The GGML type `q` converts to exactly, or why none.
pub fn exact_type(q: &QuantizedLinear) -> Result<GgmlType> {
    let (n, k) = (q.out_features, q.in_features);
    let g = q.grid.group_size.columns(k);
    let describe = || {
        format!(
            "w{} g{} {}{}",
            q.grid.bits,
            q.grid.group_size.as_i64(),
            if q.grid.sym { "sym" } else { "asym" },
            if contiguous(q) { "" } else { " act-order" }
        )
    };
    if !k.is_multiple_of(QK) {
        bail!("{n}x{k}: {k} input columns are not whole {QK}-weight GGML blocks");
    }
    let all_zeros = |z: u8| q.zeros.iter().all(|&v| v == z);
    let ty = match q.grid.bits {
        4 if all_zeros(8) => GgmlType::Q4_0,
        8 if all_zeros(128) => GgmlType::Q8_0,
        _ => bail!(
            "a {} layer is no GGML block type (exact conversions: w4 sym → Q4_0, w8 sym → \
             Q8_0, with groups of 32·k columns in order); export the float model with \
             --type, or export these weights dequantized as F32 (exact) / F16 / BF16",
            describe()
        ),
    };
    if !g.is_multiple_of(QK) || !contiguous(q) {
        bail!(
            "a {} layer is not {ty}: {ty} needs groups of 32·k columns in order",
            describe()
        );
    }
    Ok(ty)
}

fn contiguous(q: &QuantizedLinear) -> bool {
    let g = q.grid.group_size.columns(q.in_features);
    q.g_idx
        .iter()
        .enumerate()
        .all(|(j, &gi)| gi as usize == j / g.max(1))
}

/// `q`'s blocks as `ty` (which must be [`exact_type`]`(q)`), rows in order.
pub fn exact_blocks(q: &QuantizedLinear, ty: GgmlType) -> Result<Vec<u8>> {
    let found = exact_type(q)?;
    if found != ty {
        bail!("this layer converts exactly to {found}, not {ty}");
    }
    let (n, k) = (q.out_features, q.in_features);
    let mut raw = Vec::with_capacity(n * ty.row_bytes(k)?);
    for r in 0..n {
        for (b, c) in q.codes[r * k..(r + 1) * k].chunks_exact(QK).enumerate() {
            let i = q.g_idx[b * QK] as usize * n + r;
            let scale: f16 = q.scales[i];
            raw.extend_from_slice(&scale.to_le_bytes());
            let codes: &[u8; QK] = c.try_into().expect("chunks of QK");
            push_codes(ty, &mut raw, codes);
        }
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::super::blocks::dequantize_row;
    use super::*;
    use crate::quant::{GroupSize, UniformGrid};

    fn layer(bits: u8, g: i64, sym: bool, n: usize, k: usize) -> QuantizedLinear {
        let grid = UniformGrid::new(bits, GroupSize::from_i64(g).unwrap(), sym).unwrap();
        let groups = grid.group_size.n_groups(k);
        let max = (1u32 << bits) - 1;
        let mut s = 12345u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            (s >> 33) as u32
        };
        QuantizedLinear {
            out_features: n,
            in_features: k,
            grid,
            codes: (0..n * k).map(|_| (next() % (max + 1)) as u8).collect(),
            scales: (0..groups * n)
                .map(|_| f16::from_f32(1e-3 * (1 + next() % 997) as f32))
                .collect(),
            zeros: (0..groups * n)
                .map(|_| {
                    if sym {
                        1u8 << (bits - 1)
                    } else {
                        (next() % (max + 1)) as u8
                    }
                })
                .collect(),
            g_idx: (0..k)
                .map(|j| (j / grid.group_size.columns(k)) as u32)
                .collect(),
        }
    }

    /// The decoded blocks are bitsmith's dequantized weights, bit for bit.
    #[test]
    fn w4_and_w8_symmetric_convert_code_for_code() {
        for (bits, g, ty) in [
            (4, 32, GgmlType::Q4_0),
            (4, 128, GgmlType::Q4_0),
            (8, 64, GgmlType::Q8_0),
            (8, -1, GgmlType::Q8_0),
        ] {
            let q = layer(bits, g, true, 5, 128);
            assert_eq!(exact_type(&q).unwrap(), ty);
            let blocks = exact_blocks(&q, ty).unwrap();
            let back = dequantize_row(ty, &blocks).unwrap();
            let want = q.dequantize();
            assert!(
                back.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "w{bits} g{g}"
            );
            assert!(exact_blocks(&q, GgmlType::Q5_0).is_err());
        }
    }

    #[test]
    fn other_grids_say_why_not() {
        for (q, needle) in [
            (layer(4, 32, false, 2, 64), "asym"),
            (layer(3, 32, true, 2, 64), "w3"),
            (layer(4, 16, true, 2, 64), "groups of 32·k"),
            (layer(4, 32, true, 2, 48), "not whole"),
        ] {
            let e = exact_type(&q).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let mut act = layer(4, 32, true, 2, 64);
        act.g_idx.swap(0, 40);
        assert!(exact_type(&act)
            .unwrap_err()
            .to_string()
            .contains("act-order"));
    }
}
