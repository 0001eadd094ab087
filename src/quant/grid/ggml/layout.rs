//! The byte layouts of the K-quants and IQ4_NL: packing a block's header and codes, and
//! decoding a block with the consumer's arithmetic.

use super::kquants::{
    f16_at, q3_k_scale, scale_min_k4, BlockParams, GgmlKind, IQ4_NL_VALUES, QK4_NL, QK_K,
};

/// Q2_K/Q3_K's 2-bit code layout: 4 codes per byte, 32 apart, in two 128-weight halves.
pub(super) fn push_2bit(out: &mut Vec<u8>, l: &[u8]) {
    for j in (0..QK_K).step_by(128) {
        for k in 0..32 {
            out.push(
                (l[j + k] & 3)
                    | (l[j + k + 32] & 3) << 2
                    | (l[j + k + 64] & 3) << 4
                    | (l[j + k + 96] & 3) << 6,
            );
        }
    }
}

/// Append one block: header and codes in the type's layout.
pub fn pack(kind: GgmlKind, p: &BlockParams, l: &[u8], out: &mut Vec<u8>) {
    match kind {
        GgmlKind::Q2K => {
            out.extend_from_slice(&p.header[..16]);
            push_2bit(out, l);
            out.extend_from_slice(&p.header[16..20]);
        }
        GgmlKind::Q3K => {
            let mut hmask = [0u8; 32];
            let low: Vec<u8> = l
                .iter()
                .enumerate()
                .map(|(j, &c)| {
                    if c > 3 {
                        hmask[j % 32] |= 1 << (j / 32);
                        c - 4
                    } else {
                        c
                    }
                })
                .collect();
            out.extend_from_slice(&hmask);
            push_2bit(out, &low);
            out.extend_from_slice(&p.header[..14]);
        }
        GgmlKind::Q4K => {
            out.extend_from_slice(&p.header[..16]);
            for j in (0..QK_K).step_by(64) {
                out.extend((0..32).map(|k| (l[j + k] & 0xF) | l[j + k + 32] << 4));
            }
        }
        GgmlKind::Q5K => {
            out.extend_from_slice(&p.header[..16]);
            let mut qh = [0u8; 32];
            let mut ql = [0u8; 128];
            for (c, j) in (0..QK_K).step_by(64).enumerate() {
                for k in 0..32 {
                    let (l1, l2) = (l[j + k], l[j + k + 32]);
                    qh[k] |= (l1 >> 4 & 1) << (2 * c) | (l2 >> 4 & 1) << (2 * c + 1);
                    ql[32 * c + k] = (l1 & 0xF) | (l2 & 0xF) << 4;
                }
            }
            out.extend_from_slice(&qh);
            out.extend_from_slice(&ql);
        }
        GgmlKind::Q6K => {
            let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
            for (h, j) in (0..QK_K).step_by(128).enumerate() {
                for k in 0..32 {
                    let q = |o: usize| l[j + k + o];
                    ql[64 * h + k] = (q(0) & 0xF) | (q(64) & 0xF) << 4;
                    ql[64 * h + k + 32] = (q(32) & 0xF) | (q(96) & 0xF) << 4;
                    qh[32 * h + k] =
                        (q(0) >> 4) | (q(32) >> 4) << 2 | (q(64) >> 4) << 4 | (q(96) >> 4) << 6;
                }
            }
            out.extend_from_slice(&ql);
            out.extend_from_slice(&qh);
            out.extend_from_slice(&p.header[..18]);
        }
        GgmlKind::Iq4Nl => {
            out.extend_from_slice(&p.header[..2]);
            out.extend((0..16).map(|j| (l[j] & 0xF) | l[j + 16] << 4));
        }
    }
}

/// A stored block's parameters read back from its bytes: each sub-block's `step` and
/// `offset` as [`super::kquants::decode`] applies them (`step[s]·q − offset[s]`; IQ4_NL:
/// `step[0]`, its `d`) with the consumer's arithmetic (`step = d·sc` in f32, as the
/// dequantizers below multiply), and the header bytes in [`pack`]'s order, so packing new
/// codes with them keeps the block's scales byte for byte.
pub fn read_params(kind: GgmlKind, b: &[u8]) -> BlockParams {
    let mut p = BlockParams::default();
    match kind {
        GgmlKind::Q2K => {
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for (s, &sc) in b[..16].iter().enumerate() {
                p.step[s] = d * (sc & 0xF) as f32;
                p.offset[s] = dmin * (sc >> 4) as f32;
            }
            p.header[..16].copy_from_slice(&b[..16]);
            p.header[16..20].copy_from_slice(&b[80..84]);
        }
        GgmlKind::Q3K => {
            let d = f16_at(b, 108);
            for s in 0..16 {
                p.step[s] = d * q3_k_scale(&b[96..108], s) as f32;
            }
            p.header[..14].copy_from_slice(&b[96..110]);
        }
        GgmlKind::Q4K | GgmlKind::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            for s in 0..8 {
                let (sc, m) = scale_min_k4(s, &b[4..16]);
                p.step[s] = d * sc as f32;
                p.offset[s] = dmin * m as f32;
            }
            p.header[..16].copy_from_slice(&b[..16]);
        }
        GgmlKind::Q6K => {
            let d = f16_at(b, 208);
            for s in 0..16 {
                p.step[s] = d * (b[192 + s] as i8) as f32;
            }
            p.header[..18].copy_from_slice(&b[192..210]);
        }
        GgmlKind::Iq4Nl => {
            p.step[0] = f16_at(b, 0);
            p.header[..2].copy_from_slice(&b[..2]);
        }
    }
    p
}

/// The codes of one stored block in weight order: what [`pack`] was given.
pub fn unpack_codes(kind: GgmlKind, b: &[u8]) -> Vec<u8> {
    // Q2_K/Q3_K's low two bits: 4 codes per byte, 32 apart, in two 128-weight halves
    let two_bits = |qs: &[u8], e: usize| (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
    // Q4_K/Q5_K's low four bits: 64-weight chunks, the second 32 in the high nibbles
    let nibble = |qs: &[u8], e: usize| {
        let byte = qs[32 * (e / 64) + e % 32];
        if (e % 64) < 32 {
            byte & 0xF
        } else {
            byte >> 4
        }
    };
    match kind {
        GgmlKind::Q2K => (0..QK_K).map(|e| two_bits(&b[16..80], e)).collect(),
        GgmlKind::Q3K => (0..QK_K)
            .map(|e| two_bits(&b[32..96], e) + if b[e % 32] & (1 << (e / 32)) != 0 { 4 } else { 0 })
            .collect(),
        GgmlKind::Q4K => (0..QK_K).map(|e| nibble(&b[16..144], e)).collect(),
        GgmlKind::Q5K => (0..QK_K)
            .map(|e| {
                let bit = 2 * (e / 64) + (e % 64) / 32;
                nibble(&b[48..176], e) + if b[16 + e % 32] & (1 << bit) != 0 { 16 } else { 0 }
            })
            .collect(),
        GgmlKind::Q6K => (0..QK_K)
            .map(|e| {
                let (h, quarter, k) = (e / 128, (e % 128) / 32, e % 32);
                let low_byte = b[64 * h + k + 32 * (quarter % 2)];
                let low = if quarter < 2 { low_byte & 0xF } else { low_byte >> 4 };
                low | ((b[128 + 32 * h + k] >> (2 * quarter)) & 3) << 4
            })
            .collect(),
        GgmlKind::Iq4Nl => (0..QK4_NL)
            .map(|j| {
                let byte = b[2 + j % 16];
                if j < 16 {
                    byte & 0xF
                } else {
                    byte >> 4
                }
            })
            .collect(),
    }
}

pub fn dequantize_q2_k(b: &[u8], out: &mut Vec<f32>) {
    let (sb, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for e in 0..QK_K {
        let (half, j, k) = (e / 128, (e % 128) / 32, e % 32);
        let code = (qs[32 * half + k] >> (2 * j)) & 3;
        let sc = sb[e / 16];
        let dl = d * (sc & 0xF) as f32;
        let ml = dmin * (sc >> 4) as f32;
        out.push(dl * code as f32 - ml);
    }
}

pub fn dequantize_q3_k(b: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, sb) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    for e in 0..QK_K {
        let (half, j, k) = (e / 128, (e % 128) / 32, e % 32);
        let low = ((qs[32 * half + k] >> (2 * j)) & 3) as i32;
        let high = hmask[k] & (1 << (e / 32)) != 0;
        let dl = d * q3_k_scale(sb, e / 16) as f32;
        out.push(dl * (low - if high { 0 } else { 4 }) as f32);
    }
}

pub fn dequantize_q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, sb, qs) = (f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[16..144]);
    for e in 0..QK_K {
        let (c, hi, k) = (e / 64, (e % 64) / 32, e % 32);
        let byte = qs[32 * c + k];
        let code = if hi == 0 { byte & 0xF } else { byte >> 4 };
        let (sc, m) = scale_min_k4(2 * c + hi, sb);
        out.push(d * sc as f32 * code as f32 - dmin * m as f32);
    }
}

pub fn dequantize_q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, sb) = (f16_at(b, 0), f16_at(b, 2), &b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for e in 0..QK_K {
        let (c, hi, k) = (e / 64, (e % 64) / 32, e % 32);
        let byte = qs[32 * c + k];
        let low = if hi == 0 { byte & 0xF } else { byte >> 4 };
        let high = if qh[k] & (1 << (2 * c + hi)) != 0 {
            16
        } else {
            0
        };
        let (sc, m) = scale_min_k4(2 * c + hi, sb);
        out.push(d * sc as f32 * (low + high) as f32 - dmin * m as f32);
    }
}

pub fn dequantize_q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for e in 0..QK_K {
        let (h, quarter, k) = (e / 128, (e % 128) / 32, e % 32);
        let low_byte = ql[64 * h + k + 32 * (quarter % 2)];
        let low = if quarter < 2 {
            low_byte & 0xF
        } else {
            low_byte >> 4
        };
        let high = (qh[32 * h + k] >> (2 * quarter)) & 3;
        let q = (low | high << 4) as i32 - 32;
        let s = sc[8 * h + k / 16 + 2 * quarter] as i8;
        out.push(d * s as f32 * q as f32);
    }
}

pub fn dequantize_iq4_nl(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    for j in 0..QK4_NL {
        let byte = b[2 + j % 16];
        let q = if j < 16 { byte & 0xF } else { byte >> 4 };
        out.push(d * IQ4_NL_VALUES[q as usize] as f32);
    }
}
