//! GGML tensor types and their block encodings: the float types (F32, F16, BF16), the
//! 32-weight block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL, and the 256-weight
//! K-quants Q2_K … Q6_K (`kquants.rs`).
//!
//! The encoders reproduce ggml's reference quantizers (`quantize_row_*_ref` in
//! `ggml-quants.c`, mirrored bit for bit by gguf-py's `quants.py`): the same f32 order of
//! operations, the same truncations and clamps, so a float model exported here holds the
//! blocks `llama-quantize` (without an importance matrix) would write. The decoders are
//! the consumer's arithmetic (`d · q`, `d · q + m` in f32, no fused multiply-add), so
//! [`dequantize_row`] gives the values llama.cpp, candle and gguf-py compute.

use anyhow::{bail, ensure, Result};
use half::{bf16, f16};

use super::kquants::{self, BlockParams, GgmlKind};

/// Weights per block of the 32-weight types (Q4_0 … Q8_0, IQ4_NL).
pub const QK: usize = 32;

/// A GGML tensor type this writer can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Iq4Nl,
}

impl GgmlType {
    pub const ALL: [GgmlType; 14] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
        Self::Iq4Nl,
    ];

    /// The `ggml_type` number stored in a tensor info.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Iq4Nl => 20,
            Self::BF16 => 30,
        }
    }

    /// The type whose `ggml_type` number is `id`.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`) for a file whose linears are this
    /// type (a K-quant's small mix, `_S`, where llama.cpp names several).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q5_1 => 9,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 14,
            Self::Q5K => 16,
            Self::Q6K => 18,
            Self::Iq4Nl => 25,
            Self::BF16 => 32,
        }
    }

    /// Weights per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            _ if self.is_float() => 1,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => kquants::QK_K,
            _ => QK,
        }
    }

    /// The type llama.cpp's quantizer writes instead when a row is not whole blocks of this
    /// one (`tensor_type_fallback`: a 256-weight type falls back to a 32-weight one; F16 if
    /// that does not fit either).
    pub fn fallback_for(self, cols: usize) -> GgmlType {
        if cols.is_multiple_of(self.block_size()) {
            return self;
        }
        let smaller = match self {
            Self::Q2K | Self::Q3K => Self::Q4_0,
            Self::Q4K => Self::Q5_0,
            Self::Q5K => Self::Q5_1,
            Self::Q6K => Self::Q8_0,
            other => other,
        };
        if cols.is_multiple_of(smaller.block_size()) {
            smaller
        } else {
            Self::F16
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 2 + QK / 2,
            Self::Q4_1 => 4 + QK / 2,
            Self::Q5_0 => 2 + 4 + QK / 2,
            Self::Q5_1 => 4 + 4 + QK / 2,
            Self::Q8_0 => 2 + QK,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Iq4Nl => 2 + QK / 2,
        }
    }

    /// Bits of one weight's code (16 or 32 for the float types).
    pub fn code_bits(self) -> u8 {
        match self {
            Self::F32 => 32,
            Self::F16 | Self::BF16 => 16,
            Self::Q2K => 2,
            Self::Q3K => 3,
            Self::Q4_0 | Self::Q4_1 | Self::Q4K | Self::Iq4Nl => 4,
            Self::Q5_0 | Self::Q5_1 | Self::Q5K => 5,
            Self::Q6K => 6,
            Self::Q8_0 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// Bytes of a row of `n` weights; an error unless `n` is a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Result<usize> {
        ensure!(
            n.is_multiple_of(self.block_size()),
            "a row of {n} weights is not a whole number of {}-weight {} blocks",
            self.block_size(),
            self.name()
        );
        Ok(n / self.block_size() * self.type_size())
    }

    /// The name llama.cpp prints (`Q4_0`, `F16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Iq4Nl => "IQ4_NL",
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for GgmlType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for GgmlType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(e))
    }
}

impl std::str::FromStr for GgmlType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                anyhow::anyhow!("unknown GGUF type `{s}` (available: {})", names.join(", "))
            })
    }
}

/// The largest-magnitude value of a block, with its sign (the first one on ties, as
/// ggml's `amax < fabsf(v)` scan keeps it).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// `1/d`, or 0 for an all-zero block (ggml's `d ? 1.0f/d : 0.0f`).
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// ggml's `(int8_t)(v)` for the non-negative values the encoders produce, clamped to `hi`.
fn trunc_code(v: f32, hi: i32) -> u8 {
    (v as i32).clamp(0, hi) as u8
}

/// Pack 32 codes as ggml's 4-bit blocks do: element j in the low nibble of byte j,
/// element j + 16 in its high nibble (only the low 4 bits of each code).
fn push_nibbles(out: &mut Vec<u8>, q: &[u8; QK]) {
    out.extend((0..QK / 2).map(|j| (q[j] & 0x0F) | (q[j + QK / 2] & 0x0F) << 4));
}

/// The fifth bits of 32 codes as the little-endian `qh` word of Q5_0/Q5_1 (bit j = element j).
fn push_high_bits(out: &mut Vec<u8>, q: &[u8; QK]) {
    let qh = q
        .iter()
        .enumerate()
        .fold(0u32, |acc, (j, &c)| acc | (((c >> 4) & 1) as u32) << j);
    out.extend_from_slice(&qh.to_le_bytes());
}

/// Append one block's codes in `ty`'s layout after its (already written) scales.
pub(crate) fn push_codes(ty: GgmlType, out: &mut Vec<u8>, q: &[u8; QK]) {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => push_nibbles(out, q),
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            push_high_bits(out, q);
            push_nibbles(out, q);
        }
        // Q8_0 codes are signed bytes; `q` holds them offset by 128
        GgmlType::Q8_0 => out.extend(q.iter().map(|&c| c.wrapping_sub(128))),
        _ => unreachable!("push_codes is only called for block types"),
    }
}

/// Encode one row (or several rows back to back) of `x` as `ty`, appending to `out`.
/// Round to nearest as ggml's reference quantizer for the type does.
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    ty.row_bytes(x.len())?;
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        bail!("value {} at position {i} is not finite", x[i]);
    }
    match ty {
        GgmlType::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => out.extend(x.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => out.extend(x.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes())),
        _ => {
            for b in x.chunks_exact(ty.block_size()) {
                let (p, codes) = fit_block(ty, b);
                pack_block(ty, &p, &codes, out);
            }
        }
    }
    Ok(())
}

impl GgmlType {
    /// The module that encodes a 256-weight or non-uniform type.
    fn kind(self) -> Option<GgmlKind> {
        match self {
            Self::Q2K => Some(GgmlKind::Q2K),
            Self::Q3K => Some(GgmlKind::Q3K),
            Self::Q4K => Some(GgmlKind::Q4K),
            Self::Q5K => Some(GgmlKind::Q5K),
            Self::Q6K => Some(GgmlKind::Q6K),
            Self::Iq4Nl => Some(GgmlKind::Iq4Nl),
            _ => None,
        }
    }
}

/// One block's parameters and codes as ggml's reference quantizer for `ty` chooses them.
pub fn fit_block(ty: GgmlType, x: &[f32]) -> (BlockParams, Vec<u8>) {
    match ty {
        GgmlType::Q2K => vec_codes(kquants::fit_q2_k(x)),
        GgmlType::Q3K => vec_codes(kquants::fit_q3_k(x)),
        GgmlType::Q4K => vec_codes(kquants::fit_q4_k(x)),
        GgmlType::Q5K => vec_codes(kquants::fit_q5_k(x)),
        GgmlType::Q6K => vec_codes(kquants::fit_q6_k(x)),
        GgmlType::Iq4Nl => vec_codes(kquants::fit_iq4_nl(x)),
        _ => {
            let p = fit_block32(ty, x);
            let codes = x.iter().map(|&w| encode_block(ty, w, &p, 0)).collect();
            (p, codes)
        }
    }
}

fn vec_codes<const N: usize>((p, codes): (BlockParams, [u8; N])) -> (BlockParams, Vec<u8>) {
    (p, codes.to_vec())
}

/// One block's parameters fitted with per-weight `importance` (the Hessian's diagonal): the
/// fits ggml runs with an importance matrix (`quantize_row_*_impl`), each weight weighed
/// `importance·√(σ² + x²)`. Q8_0 has no weighted fit (llama.cpp has none either). One
/// difference from ggml: the 32-weight types take σ² of the block, not of the whole row.
pub fn fit_block_weighted(ty: GgmlType, x: &[f32], importance: &[f32]) -> BlockParams {
    if let Some(kind) = ty.kind() {
        return kquants::fit_weighted(kind, x, importance);
    }
    let w = kquants::imatrix_weights(x, importance, kquants::mean_square(x));
    let mut l = [0u8; QK];
    let mut p = BlockParams::default();
    let f16_of = |v: f32| f16::from_f32(v).to_f32();
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let nmax = if ty == GgmlType::Q4_0 { 8 } else { 16 };
            let d = kquants::make_qx_quants_weighted(nmax, x, &mut l, Some(&w));
            p.step[0] = f16_of(d);
            // codes to the nearest level of the stored scale
            p.inv = inverse(p.step[0]);
            p.header[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let nmax = if ty == GgmlType::Q4_1 { 15 } else { 31 };
            let (d, the_min) =
                kquants::make_qkx2_quants(nmax, x, &w, &mut l, -0.9, 0.05, 36, false);
            p.step[0] = f16_of(d);
            p.offset[0] = f16_of(-the_min);
            p.min = p.offset[0];
            p.inv = inverse(p.step[0]);
            p.header[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            p.header[2..4].copy_from_slice(&f16::from_f32(-the_min).to_le_bytes());
        }
        _ => p = fit_block32(ty, x),
    }
    p
}

/// Q4_0 … Q8_0: the block's scale (and min) as the reference quantizer computes them.
fn fit_block32(ty: GgmlType, x: &[f32]) -> BlockParams {
    let mut p = BlockParams::default();
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            // the signed extreme maps to the lowest code, −8 (−16): d = max / −8
            let half = if ty == GgmlType::Q4_0 { 8.0 } else { 16.0 };
            let d = signed_absmax(x) / -half;
            p.inv = inverse(d);
            p.step[0] = f16::from_f32(d).to_f32();
            p.header[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let levels = if ty == GgmlType::Q4_1 { 15.0 } else { 31.0 };
            let (min, max) = min_max(x);
            let d = (max - min) / levels;
            p.inv = inverse(d);
            p.min = min;
            p.step[0] = f16::from_f32(d).to_f32();
            p.offset[0] = f16::from_f32(min).to_f32();
            p.header[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            p.header[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
        }
        GgmlType::Q8_0 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            p.inv = inverse(d);
            p.step[0] = f16::from_f32(d).to_f32();
            p.header[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        }
        _ => unreachable!("fit_block32 is only called for the 32-weight uniform types"),
    }
    p
}

/// The code of `w` at offset `col` of a block of `ty` with parameters `p`: for the
/// 32-weight types the reference quantizer's formula (the truncation of `w/d + 8.5` for
/// Q4_0, `roundf` for Q8_0), for the others the nearest level of `col`'s sub-block.
#[inline]
pub fn encode_block(ty: GgmlType, w: f32, p: &BlockParams, col: usize) -> u8 {
    if let Some(kind) = ty.kind() {
        return kquants::encode(kind, w, p, col);
    }
    match ty {
        GgmlType::Q4_0 => trunc_code(w * p.inv + 8.5, 15),
        GgmlType::Q5_0 => trunc_code(w * p.inv + 16.5, 31),
        GgmlType::Q4_1 => trunc_code((w - p.min) * p.inv + 0.5, 15),
        GgmlType::Q5_1 => trunc_code((w - p.min) * p.inv + 0.5, 31),
        // `roundf`: halves away from zero, as Rust's `round`; stored offset by 128
        GgmlType::Q8_0 => ((w * p.inv).round().clamp(-127.0, 127.0) as i32 + 128) as u8,
        _ => unreachable!("encode_block is only called for block types"),
    }
}

/// The value of `code` at offset `col`, with the consumer's arithmetic ([`dequantize_row`]'s).
#[inline]
pub fn decode_block(ty: GgmlType, code: u8, p: &BlockParams, col: usize) -> f32 {
    if let Some(kind) = ty.kind() {
        return kquants::decode(kind, code, p, col);
    }
    let d = p.step[0];
    match ty {
        GgmlType::Q4_0 => (code as i32 - 8) as f32 * d,
        GgmlType::Q5_0 => (code as i32 - 16) as f32 * d,
        GgmlType::Q4_1 | GgmlType::Q5_1 => code as f32 * d + p.offset[0],
        GgmlType::Q8_0 => (code as i32 - 128) as f32 * d,
        _ => unreachable!("decode_block is only called for block types"),
    }
}

/// Append one block of `ty`: its header from `p`, then `codes` in the type's layout.
pub fn pack_block(ty: GgmlType, p: &BlockParams, codes: &[u8], out: &mut Vec<u8>) {
    if let Some(kind) = ty.kind() {
        return kquants::pack(kind, p, codes, out);
    }
    let header = match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 => 4,
        _ => 2,
    };
    out.extend_from_slice(&p.header[..header]);
    let codes: &[u8; QK] = codes.try_into().expect("a 32-weight block");
    push_codes(ty, out, codes);
}

/// `bytes` is exactly one block of the quantized type `ty`.
fn ensure_one_block(ty: GgmlType, bytes: &[u8]) -> Result<()> {
    ensure!(
        !ty.is_float() && bytes.len() == ty.type_size(),
        "{} bytes are not one {ty} block",
        bytes.len()
    );
    Ok(())
}

/// One stored block of `ty` (`bytes`, one block) read back as [`BlockParams`]: the steps
/// and offsets [`decode_block`] applies and the header [`pack_block`] writes, so
/// `decode_block` of each code gives [`dequantize_row`]'s value and packing new codes keeps
/// the block's scales. The 32-weight types: `step[0]` their `d`, `offset[0]` Q4_1/Q5_1's
/// `m` (added, as they decode); the K-quants: each sub-block's `d·sc` and `dmin·m`
/// (subtracted).
pub fn block_params(ty: GgmlType, bytes: &[u8]) -> Result<BlockParams> {
    ensure_one_block(ty, bytes)?;
    if let Some(kind) = ty.kind() {
        return Ok(super::layout::read_params(kind, bytes));
    }
    let mut p = BlockParams::default();
    p.step[0] = f16_at(bytes, 0);
    let header = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
        p.offset[0] = f16_at(bytes, 2);
        4
    } else {
        2
    };
    p.header[..header].copy_from_slice(&bytes[..header]);
    Ok(p)
}

/// One stored block of `ty`'s codes in weight order, as [`pack_block`] was given them
/// (Q8_0: offset by 128, as bitsmith holds them).
pub fn block_codes(ty: GgmlType, bytes: &[u8]) -> Result<Vec<u8>> {
    ensure_one_block(ty, bytes)?;
    if let Some(kind) = ty.kind() {
        return Ok(super::layout::unpack_codes(kind, bytes));
    }
    let nibbles = |qs: &[u8]| -> Vec<u8> {
        (0..QK)
            .map(|j| if j < QK / 2 { qs[j] & 0xF } else { qs[j - QK / 2] >> 4 })
            .collect()
    };
    let high_bits = |qh: &[u8], low: Vec<u8>| -> Vec<u8> {
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        low.into_iter()
            .enumerate()
            .map(|(j, c)| c | (((qh >> j) & 1) as u8) << 4)
            .collect()
    };
    Ok(match ty {
        GgmlType::Q4_0 => nibbles(&bytes[2..]),
        GgmlType::Q4_1 => nibbles(&bytes[4..]),
        GgmlType::Q5_0 => high_bits(&bytes[2..6], nibbles(&bytes[6..])),
        GgmlType::Q5_1 => high_bits(&bytes[4..8], nibbles(&bytes[8..])),
        GgmlType::Q8_0 => bytes[2..].iter().map(|&c| c.wrapping_add(128)).collect(),
        other => bail!("{other} blocks hold no codes"),
    })
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes one block, appending its values.
type BlockDecoder = fn(&[u8], &mut Vec<f32>);

/// Decode `bytes` of type `ty` (whole blocks) to f32 with the consumer's arithmetic.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    ensure!(
        bytes.len().is_multiple_of(ty.type_size()),
        "{} bytes are not a whole number of {}-byte {ty} blocks",
        bytes.len(),
        ty.type_size()
    );
    let blocks = bytes.chunks_exact(ty.type_size());
    Ok(match ty {
        GgmlType::F32 => blocks
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => blocks.map(|b| f16_at(b, 0)).collect(),
        GgmlType::BF16 => blocks
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => {
            let mut out = Vec::with_capacity(bytes.len() / ty.type_size() * ty.block_size());
            let decode: Option<BlockDecoder> = match ty {
                GgmlType::Q2K => Some(kquants::dequantize_q2_k),
                GgmlType::Q3K => Some(kquants::dequantize_q3_k),
                GgmlType::Q4K => Some(kquants::dequantize_q4_k),
                GgmlType::Q5K => Some(kquants::dequantize_q5_k),
                GgmlType::Q6K => Some(kquants::dequantize_q6_k),
                GgmlType::Iq4Nl => Some(kquants::dequantize_iq4_nl),
                _ => None,
            };
            for b in blocks {
                match decode {
                    Some(decode) => decode(b, &mut out),
                    None => dequantize_block(ty, b, &mut out),
                }
            }
            out
        }
    })
}

/// The 32 codes of a 4- or 5-bit block whose nibbles start at `qs` (and `qh`, for 5 bits).
fn codes(b: &[u8], qs: usize, qh: Option<usize>) -> [u8; QK] {
    let high = qh.map_or(0, |at| {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    });
    std::array::from_fn(|j| {
        let nibble = if j < QK / 2 {
            b[qs + j] & 0x0F
        } else {
            b[qs + j - QK / 2] >> 4
        };
        nibble | (((high >> j) & 1) as u8) << 4
    })
}

fn dequantize_block(ty: GgmlType, b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    match ty {
        GgmlType::Q4_0 => out.extend(codes(b, 2, None).map(|c| (c as i32 - 8) as f32 * d)),
        GgmlType::Q5_0 => out.extend(codes(b, 6, Some(2)).map(|c| (c as i32 - 16) as f32 * d)),
        GgmlType::Q4_1 => {
            let m = f16_at(b, 2);
            out.extend(codes(b, 4, None).map(|c| c as f32 * d + m))
        }
        GgmlType::Q5_1 => {
            let m = f16_at(b, 2);
            out.extend(codes(b, 8, Some(4)).map(|c| c as f32 * d + m))
        }
        GgmlType::Q8_0 => out.extend(b[2..2 + QK].iter().map(|&c| c as i8 as f32 * d)),
        _ => unreachable!("dequantize_block is only called for block types"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    /// Reading a block's parameters back from its bytes gives what the fit packed: the
    /// same header, steps and offsets; and `decode_block` with them, code by code, gives
    /// the dequantizer's values (the codes recovered from the values on that grid).
    #[test]
    fn block_params_read_back_what_was_packed() {
        let x = lcg(11, 256 * 3);
        for ty in GgmlType::ALL.iter().copied().filter(|t| !t.is_float()) {
            for xb in x.chunks_exact(ty.block_size()) {
                let (fit, codes) = fit_block(ty, xb);
                let mut bytes = vec![];
                pack_block(ty, &fit, &codes, &mut bytes);
                let p = block_params(ty, &bytes).unwrap();
                assert_eq!(block_codes(ty, &bytes).unwrap(), codes, "{ty}");
                assert_eq!(p.header, fit.header, "{ty}");
                assert_eq!(p.step, fit.step, "{ty}");
                assert_eq!(p.offset, fit.offset, "{ty}");
                let want = dequantize_row(ty, &bytes).unwrap();
                for (col, (&c, &v)) in codes.iter().zip(&want).enumerate() {
                    assert_eq!(decode_block(ty, c, &p, col), v, "{ty} weight {col}");
                }
            }
        }
        let e = block_params(GgmlType::Q4K, &[0u8; 100]).unwrap_err().to_string();
        assert!(e.contains("100 bytes") && e.contains("Q4_K"), "{e}");
    }

    /// Independent float64 model of each type: the decoded value of every weight is within
    /// half a step of the input (plus the f16 rounding of the scales), and the codes
    /// decode to a grid of the declared number of levels.
    #[test]
    fn round_to_nearest_within_half_a_step() {
        let x = lcg(7, 32 * 40);
        // the float types and the 32-weight uniform types (the K-quants and IQ4_NL: below)
        for ty in GgmlType::ALL[..8].iter().copied() {
            let mut bytes = vec![];
            quantize_row(ty, &x, &mut bytes).unwrap();
            assert_eq!(bytes.len(), ty.row_bytes(x.len()).unwrap());
            let y = dequantize_row(ty, &bytes).unwrap();
            for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                let (lo, hi) = min_max(xb);
                let amax = lo.abs().max(hi.abs()) as f64;
                let step = match ty {
                    GgmlType::F32 => 0.0,
                    GgmlType::F16 => amax * 2f64.powi(-10),
                    GgmlType::BF16 => amax * 2f64.powi(-7),
                    GgmlType::Q4_0 => amax / 8.0,
                    GgmlType::Q5_0 => amax / 16.0,
                    GgmlType::Q8_0 => amax / 127.0,
                    GgmlType::Q4_1 => (hi - lo) as f64 / 15.0,
                    GgmlType::Q5_1 => (hi - lo) as f64 / 31.0,
                    other => unreachable!("{other} is tested below"),
                };
                // the symmetric types have one level fewer on the side opposite the block's
                // extreme (−8..7 with −8 at the extreme): a value beyond the last level there
                // is clamped, up to a whole step away
                let top = match ty {
                    GgmlType::Q4_0 => Some(7.0),
                    GgmlType::Q5_0 => Some(15.0),
                    _ => None,
                };
                for (&a, &b) in xb.iter().zip(yb) {
                    let err = (a as f64 - b as f64).abs();
                    let clamped = top.is_some_and(|t| a.abs() as f64 > t * step);
                    let steps = if clamped { 1.0 } else { 0.5 };
                    // plus the f16 scale's relative error over up to 31 steps
                    let bound = steps * step * (1.0 + 1e-3) + 31.0 * step * 2f64.powi(-11) + 1e-12;
                    assert!(err <= bound, "{ty}: {a} -> {b}, error {err} > {bound}");
                }
            }
        }
    }

    /// Hand-worked blocks: the layouts (nibble order, qh bit order, signed Q8 bytes) and
    /// the reference formulas.
    #[test]
    fn hand_worked_blocks() {
        // Q4_0: max = -1 at element 0, d = 1/8; element j = -1 + j/16 (j < 32)
        let x: Vec<f32> = (0..32).map(|j| -1.0 + j as f32 / 16.0).collect();
        let mut b = vec![];
        quantize_row(GgmlType::Q4_0, &x, &mut b).unwrap();
        assert_eq!(f16_at(&b, 0), 0.125);
        // x·id + 8.5 = -8j/16·... : element j → code trunc(8 - 8 + j/2 + 0.5) = trunc(j/2 + 0.5)
        let want: Vec<u8> = (0..32)
            .map(|j| ((j as f32 / 2.0 + 0.5) as u8).min(15))
            .collect();
        for j in 0..16 {
            assert_eq!(b[2 + j], want[j] | want[j + 16] << 4, "byte {j}");
        }
        // Q5_0 of the same block: codes up to 31 set the qh bits of elements with code ≥ 16
        let mut b5 = vec![];
        quantize_row(GgmlType::Q5_0, &x, &mut b5).unwrap();
        let c = codes(&b5, 6, Some(2));
        let want5: Vec<u8> = (0..32).map(|j| ((j as f32 + 0.5) as u8).min(31)).collect();
        assert_eq!(c.to_vec(), want5);
        // Q8_0: halves round away from zero; negative codes are two's complement bytes
        let mut x8 = vec![0f32; 32];
        x8[0] = 127.0;
        x8[1] = -2.5;
        x8[2] = 2.5;
        let mut b8 = vec![];
        quantize_row(GgmlType::Q8_0, &x8, &mut b8).unwrap();
        assert_eq!(f16_at(&b8, 0), 1.0);
        assert_eq!(&b8[2..5], &[127u8, (-3i8) as u8, 3]);
        // Q4_1: min −1, max 2 → d = 0.2, codes round((x − min)/d)
        let mut x1 = vec![0f32; 32];
        x1[0] = -1.0;
        x1[1] = 2.0;
        let mut b1 = vec![];
        quantize_row(GgmlType::Q4_1, &x1, &mut b1).unwrap();
        assert_eq!(f16_at(&b1, 2), -1.0);
        assert_eq!(b1[4] & 0x0F, 0);
        assert_eq!(b1[5] & 0x0F, 15);
        assert_eq!(b1[6] & 0x0F, 5);
    }

    /// The K-quants and IQ4_NL on Gaussian-like rows whose scale varies from block to block
    /// (float64 error sums): each type's relative RMS error is in its known range and falls
    /// with the bits it spends, and a row of zeros stays zeros.
    #[test]
    fn k_quants_error_falls_with_their_bits() {
        let n = 256 * 64;
        let x: Vec<f32> = lcg(11, n)
            .chunks(4)
            .flat_map(|c| {
                // sum of 4 uniforms: roughly Gaussian; the scale drifts across blocks
                let g: f32 = c.iter().sum();
                std::iter::repeat_n(g, 1)
            })
            .chain(lcg(12, n - n / 4))
            .enumerate()
            .map(|(i, v)| v * (1.0 + (i / 256) as f32 * 0.05))
            .collect();
        let rel_rmse = |ty: GgmlType| {
            let mut bytes = vec![];
            quantize_row(ty, &x, &mut bytes).unwrap();
            assert_eq!(bytes.len(), ty.row_bytes(n).unwrap(), "{ty}");
            let y = dequantize_row(ty, &bytes).unwrap();
            assert_eq!(y.len(), n);
            let (mut e, mut s) = (0f64, 0f64);
            for (&a, &b) in x.iter().zip(&y) {
                e += (a as f64 - b as f64).powi(2);
                s += (a as f64).powi(2);
            }
            (e / s).sqrt()
        };
        // (type, largest relative RMS error accepted); ordered by bits per weight
        let table = [
            (GgmlType::Q2K, 0.45),
            (GgmlType::Q3K, 0.22),
            (GgmlType::Iq4Nl, 0.11),
            (GgmlType::Q4K, 0.11),
            (GgmlType::Q5K, 0.055),
            (GgmlType::Q6K, 0.03),
        ];
        let errs: Vec<f64> = table.iter().map(|&(ty, _)| rel_rmse(ty)).collect();
        for (&(ty, bound), &e) in table.iter().zip(&errs) {
            assert!(e > 1e-4 && e < bound, "{ty}: relative RMS error {e}");
        }
        for w in [(0, 1), (1, 3), (3, 4), (4, 5)] {
            assert!(
                errs[w.1] < errs[w.0],
                "{:?} not below {:?}: {errs:?}",
                table[w.1],
                table[w.0]
            );
        }
        for (ty, _) in table {
            let mut bytes = vec![];
            quantize_row(ty, &[0.0; 256], &mut bytes).unwrap();
            assert!(
                dequantize_row(ty, &bytes)
                    .unwrap()
                    .iter()
                    .all(|&v| v == 0.0),
                "{ty}"
            );
        }
        // rows that are not whole blocks
        assert!(quantize_row(GgmlType::Q4K, &[0.0; 288], &mut vec![]).is_err());
        assert!(quantize_row(GgmlType::Iq4Nl, &[0.0; 48], &mut vec![]).is_err());
    }

    #[test]
    fn k_quants_fall_back_as_llama_cpp() {
        assert_eq!(GgmlType::Q4K.fallback_for(576), GgmlType::Q5_0);
        assert_eq!(GgmlType::Q4K.fallback_for(1536), GgmlType::Q4K);
        assert_eq!(GgmlType::Q5K.fallback_for(576), GgmlType::Q5_1);
        assert_eq!(GgmlType::Q6K.fallback_for(576), GgmlType::Q8_0);
        assert_eq!(GgmlType::Q2K.fallback_for(576), GgmlType::Q4_0);
        assert_eq!(GgmlType::Q3K.fallback_for(576), GgmlType::Q4_0);
        assert_eq!(GgmlType::Q6K.fallback_for(100), GgmlType::F16);
        assert_eq!(GgmlType::Q8_0.fallback_for(100), GgmlType::F16);
        assert_eq!("q4_k".parse::<GgmlType>().unwrap(), GgmlType::Q4K);
        assert_eq!("IQ4_NL".parse::<GgmlType>().unwrap(), GgmlType::Iq4Nl);
    }

    #[test]
    fn rejects_partial_blocks_and_non_finite_values() {
        let mut out = vec![];
        assert!(quantize_row(GgmlType::Q8_0, &[0.0; 33], &mut out).is_err());
        let mut x = vec![0.0; 32];
        x[3] = f32::NAN;
        let e = quantize_row(GgmlType::Q4_0, &x, &mut out).unwrap_err();
        assert!(e.to_string().contains("position 3"), "{e}");
        assert!(dequantize_row(GgmlType::Q4_1, &[0; 19]).is_err());
        assert!(quantize_row(GgmlType::F16, &[1.0; 33], &mut out).is_ok());
    }
}
