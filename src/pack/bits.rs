//! LSB-first bitstreams in 32-bit words. Value `j` of a stream occupies bits
//! `[j·b, (j+1)·b)`; for b = 2, 4, 8 that is GPTQ's word packing and for b = 3 it is exactly
//! GPTQ's "32 values in 3 words" layout (formats.md §1.3). A stream takes `ceil(len·b/32)`
//! words, zero-padded: exactly GPTQ's `len·b/32` whenever that is whole, and a natural
//! extension for widths GPTQ cannot express.

/// Words needed for `len` values of `bits` bits.
pub fn packed_words(len: usize, bits: u8) -> usize {
    (len * bits as usize).div_ceil(32)
}

/// Pack `values` (each `< 2^bits`) into `out` (`packed_words(len, bits)` words, zeroed).
pub fn pack_into(values: impl IntoIterator<Item = u8>, bits: u8, out: &mut [u32]) {
    let b = bits as usize;
    let mask = (1u64 << b) - 1;
    let words = out.len();
    for (j, v) in values.into_iter().enumerate() {
        debug_assert!((v as u64) <= mask, "code {v} does not fit in {bits} bits");
        let bit = j * b;
        let (word, off) = (bit / 32, bit % 32);
        let v = (v as u64) & mask;
        out[word] |= (v << off) as u32;
        if off + b > 32 && word + 1 < words {
            out[word + 1] |= (v >> (32 - off)) as u32;
        }
    }
}

pub fn pack(values: &[u8], bits: u8) -> Vec<u32> {
    let mut out = vec![0u32; packed_words(values.len(), bits)];
    pack_into(values.iter().copied(), bits, &mut out);
    out
}

/// Value `j` of a packed stream.
#[inline]
pub fn get(words: &[u32], bits: u8, j: usize) -> u8 {
    let b = bits as usize;
    let bit = j * b;
    let (word, off) = (bit / 32, bit % 32);
    let mut v = (words[word] as u64) >> off;
    if off + b > 32 && word + 1 < words.len() {
        v |= (words[word + 1] as u64) << (32 - off);
    }
    (v & ((1u64 << b) - 1)) as u8
}

pub fn unpack(words: &[u32], bits: u8, len: usize) -> Vec<u8> {
    (0..len).map(|j| get(words, bits, j)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_md_test_vectors() {
        assert_eq!(pack(&[1, 2, 3, 4, 5, 6, 7, 8], 4), vec![0x87654321]);
        let two: Vec<u8> = (0..16).map(|i| i % 4).collect();
        assert_eq!(pack(&two, 2), vec![0xE4E4E4E4]);
        assert_eq!(pack(&[0x10, 0x20, 0x30, 0x40], 8), vec![0x40302010]);
        let three: Vec<u8> = (0..32).map(|j| j % 8).collect();
        assert_eq!(pack(&three, 3), vec![0x88FAC688, 0xC688FAC6, 0xFAC688FA]);
        assert_eq!(pack(&[1; 32], 3), vec![0x49249249, 0x92492492, 0x24924924]);
    }

    #[test]
    fn round_trip_all_widths_and_odd_lengths() {
        for bits in [2u8, 3, 4, 8] {
            for len in [1usize, 7, 31, 32, 33, 70, 96, 577] {
                let vals: Vec<u8> = (0..len)
                    .map(|i| ((i * 7 + 3) % (1 << bits)) as u8)
                    .collect();
                let words = pack(&vals, bits);
                assert_eq!(words.len(), packed_words(len, bits));
                assert_eq!(unpack(&words, bits, len), vals, "bits {bits} len {len}");
            }
        }
    }
}
