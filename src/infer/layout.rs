//! The kernel-friendly layout every bitsmith kernel (CPU, CUDA, Metal) runs on, built at
//! load from a [`QuantizedLinear`] or a [`MixedQuantizedLinear`].
//!
//! **Columns.** The input columns are reordered once into a *padded* order in which every
//! scale/zero group is contiguous and a multiple of 16 columns long: act-order columns are
//! sorted by group (like exllama), mixed-width columns are sorted into runs of one width,
//! pruned columns are dropped, and a group whose size is not a multiple of 16 is padded with
//! zero columns. A call gathers `x` into that order once (`gather`); when the order is the
//! identity (contiguous groups of 16·k columns, the common case) there is no gather at all.
//!
//! **Spans.** A span is one group of one width: `slots` consecutive 16-column slots of the
//! padded order, with one scale and zero per output row.
//!
//! **Codes.** Per output row, each width's codes live in *tiles* of 16 `u32` words (64
//! bytes, one AVX-512 register). A `b`-bit tile holds `spt = 32 / b` slots of 16 columns:
//! column `16·t + ℓ` of the tile sits in word `ℓ` at bits `t·b .. t·b + b`. Unpacking slot
//! `t` is therefore one load, one shift by `t·b` and one mask, giving 16 codes in 16 lanes
//! in column order; AVX2 does the same on the two 8-word halves, and a GPU lane `ℓ` reads
//! word `ℓ`. 3-bit codes use 10 per word (2 bits of each word unused, 3.2 bits per code).
//!
//! **Scales.** Per output row and span one `u32`: the f16 scale's bits in the low half, the
//! true zero point in the high half; `w = scale · (code − zero)` exactly as
//! [`crate::quant::UniformGrid::decode`] computes it.

use crate::pack::validate::{check_mixed, check_uniform};
use crate::quant::{MixedQuantizedLinear, QuantizedLinear};
use anyhow::{ensure, Result};
use half::f16;

/// Columns per slot (one SIMD register of f32 on AVX-512, one half-warp on a GPU).
pub const SLOT: usize = 16;
/// `u32` words per tile.
pub const TILE_WORDS: usize = 16;
/// Marks a padded column in [`PackedLayout::gather`].
pub const PAD: u32 = u32::MAX;

/// Slots per tile for a width: how many `b`-bit codes fit in one `u32`.
pub const fn slots_per_tile(bits: u8) -> usize {
    32 / bits as usize
}

/// One group of one width (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub bits: u8,
    /// Offset of the span's segment (its width's tiles) within a row's words.
    pub word_base: u32,
    /// First slot of the span, counted from the start of its segment.
    pub slot0: u32,
    pub slots: u32,
    /// First column of the span in the padded order (`= 16 · slots before it`).
    pub col0: u32,
    /// Where the first slot lives, precomputed so kernels do no division: the word offset
    /// of its tile within a row, and its index inside that tile.
    pub tile_word0: u32,
    pub t0: u32,
}

/// Packed weights in the layout of the module doc.
#[derive(Debug, Clone)]
pub struct PackedLayout {
    pub out_features: usize,
    pub in_features: usize,
    /// Columns of the padded order (a multiple of 16).
    pub padded_in: usize,
    /// Original column of each padded column ([`PAD`] = zero), or `None` when the padded
    /// order is the original order.
    pub gather: Option<Vec<u32>>,
    pub spans: Vec<Span>,
    /// `u32` words per output row.
    pub row_words: usize,
    /// `[out_features, row_words]`.
    pub words: Vec<u32>,
    /// `[out_features, spans.len()]`: f16 scale bits | zero << 16.
    pub params: Vec<u32>,
}

/// One group before packing: its width, its original columns (in padded order) and where
/// its per-row scale/zero come from.
struct Group {
    bits: u8,
    cols: Vec<usize>,
    param: Box<dyn Fn(usize) -> (f16, u8) + Sync>,
}

impl PackedLayout {
    /// Repack a GPTQ-layout linear (any width, group size, act-order `g_idx`).
    pub fn from_quantized(q: &QuantizedLinear) -> Result<Self> {
        let (n, k) = (q.out_features, q.in_features);
        // a code or zero wider than its field would spill into its neighbours' bits
        check_uniform(q)?;
        let n_groups = q.n_groups();
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_groups];
        for (j, &g) in q.g_idx.iter().enumerate() {
            members[g as usize].push(j);
        }
        let groups = members
            .into_iter()
            .enumerate()
            .filter(|(_, cols)| !cols.is_empty())
            .map(|(g, cols)| {
                let scales = q.scales[g * n..(g + 1) * n].to_vec();
                let zeros = q.zeros[g * n..(g + 1) * n].to_vec();
                Group {
                    bits: q.grid.bits,
                    cols,
                    param: Box::new(move |r| (scales[r], zeros[r])),
                }
            })
            .collect();
        Self::build(n, k, groups, |r, j| q.codes[r * k + j])
    }

    /// Repack a mixed-width linear: one span per range group (one per width present
    /// without a group size), runs in ascending width, pruned columns dropped.
    pub fn from_mixed(q: &MixedQuantizedLinear) -> Result<Self> {
        let (n, k) = (q.out_features, q.in_features);
        check_mixed(q)?;
        let mg = q.groups();
        let groups = (0..mg.n_groups())
            .map(|g| {
                let scales = q.scales[g * n..(g + 1) * n].to_vec();
                let zeros = q.zeros[g * n..(g + 1) * n].to_vec();
                Group {
                    bits: mg.group_width[g],
                    cols: mg.columns(g).to_vec(),
                    param: Box::new(move |r| (scales[r], zeros[r])) as Box<_>,
                }
            })
            .collect();
        Self::build(n, k, groups, |r, j| q.codes[r * k + j])
    }

    /// Lay out `groups` (already in padded order; consecutive groups of one width form a
    /// segment) and pack `code(row, column)`.
    fn build(
        n: usize,
        k: usize,
        groups: Vec<Group>,
        code: impl Fn(usize, usize) -> u8 + Sync,
    ) -> Result<Self> {
        let mut gather: Vec<u32> = Vec::with_capacity(k + SLOT);
        let mut spans = Vec::with_capacity(groups.len());
        // per segment: (bits, first span, slots)
        let mut segments: Vec<(u8, usize, usize)> = Vec::new();
        let mut row_words = 0usize;
        for g in &groups {
            ensure!(
                (1..=8).contains(&g.bits),
                "bit width {} is not 1..=8",
                g.bits
            );
            let slots = g.cols.len().div_ceil(SLOT);
            match segments.last_mut() {
                Some(seg) if seg.0 == g.bits => {}
                _ => {
                    if let Some(&(b, _, s)) = segments.last() {
                        row_words += s.div_ceil(slots_per_tile(b)) * TILE_WORDS;
                    }
                    segments.push((g.bits, spans.len(), 0));
                }
            }
            let seg = segments.last_mut().expect("a segment was just pushed");
            let spt = slots_per_tile(g.bits);
            spans.push(Span {
                bits: g.bits,
                word_base: row_words as u32,
                slot0: seg.2 as u32,
                slots: slots as u32,
                col0: gather.len() as u32,
                tile_word0: (row_words + seg.2 / spt * TILE_WORDS) as u32,
                t0: (seg.2 % spt) as u32,
            });
            seg.2 += slots;
            gather.extend(g.cols.iter().map(|&j| j as u32));
            gather.resize(gather.len().next_multiple_of(SLOT), PAD);
        }
        if let Some(&(b, _, s)) = segments.last() {
            row_words += s.div_ceil(slots_per_tile(b)) * TILE_WORDS;
        }
        let padded_in = gather.len();
        let identity = padded_in == k && gather.iter().enumerate().all(|(i, &j)| i as u32 == j);
        let mut words = vec![0u32; n * row_words];
        let mut params = vec![0u32; n * spans.len()];
        use rayon::prelude::*;
        words
            .par_chunks_mut(row_words.max(1))
            .zip(params.par_chunks_mut(spans.len().max(1)))
            .enumerate()
            .for_each(|(r, (row, prow))| {
                for (si, (span, g)) in spans.iter().zip(&groups).enumerate() {
                    let (s, z) = (g.param)(r);
                    prow[si] = s.to_bits() as u32 | (z as u32) << 16;
                    let spt = slots_per_tile(span.bits);
                    for (i, &j) in g.cols.iter().enumerate() {
                        let slot = span.slot0 as usize + i / SLOT;
                        let w = span.word_base as usize + (slot / spt) * TILE_WORDS + i % SLOT;
                        row[w] |= (code(r, j) as u32) << ((slot % spt) * span.bits as usize);
                    }
                }
            });
        Ok(Self {
            out_features: n,
            in_features: k,
            padded_in,
            gather: (!identity).then_some(gather),
            spans,
            row_words,
            words,
            params,
        })
    }

    /// The GPU GEMV's work list (`kernels/bitsmith_matmul.cu`): one entry per (span, tile)
    /// pair of a row, the same for every row, as `[word, span, col, bits | t_lo << 8 |
    /// t_hi << 16]`: the word offset of the tile within a row, the span (its scale/zero),
    /// the padded column of the tile's slot 0 and the slots `t_lo..t_hi` of the tile that
    /// belong to the span. A tile shared by two spans (a span starting or ending inside a
    /// tile) appears once per span.
    pub fn gemv_chunks(&self) -> Vec<[u32; 4]> {
        let mut out = Vec::new();
        for (si, sp) in self.spans.iter().enumerate() {
            let spt = slots_per_tile(sp.bits) as u32;
            // slots counted from the start of the span's segment
            let (first, end) = (sp.slot0, sp.slot0 + sp.slots);
            let mut tile = first / spt;
            while tile * spt < end {
                let tile_first = tile * spt;
                let (lo, hi) = (first.max(tile_first), end.min(tile_first + spt));
                out.push([
                    sp.word_base + tile * TILE_WORDS as u32,
                    si as u32,
                    // columns of a segment are consecutive slots, so this is >= 0
                    sp.col0 + SLOT as u32 * tile_first - SLOT as u32 * first,
                    sp.bits as u32 | (lo - tile_first) << 8 | (hi - tile_first) << 16,
                ]);
                tile += 1;
            }
        }
        out
    }

    /// The GPU GEMM's slot table: the span of each padded 16-column slot.
    pub fn slot_spans(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.padded_in / SLOT);
        for (si, sp) in self.spans.iter().enumerate() {
            out.extend(std::iter::repeat_n(si as u32, sp.slots as usize));
        }
        out
    }

    /// The spans as the GPU kernels' `Span` struct: `[bits, slots, col0, tile_word0, t0]`.
    pub fn gpu_spans(&self) -> Vec<[u32; 5]> {
        self.spans
            .iter()
            .map(|s| [s.bits as u32, s.slots, s.col0, s.tile_word0, s.t0])
            .collect()
    }

    /// Bytes of codes and scales held (the gather table included).
    pub fn resident_bytes(&self) -> usize {
        4 * (self.words.len() + self.params.len() + self.gather.as_ref().map_or(0, Vec::len))
    }

    /// `x` `[rows, in_features]` in the padded order (`[rows, padded_in]`), or `x` itself
    /// when no gather is needed.
    pub fn gather_rows<'a>(&self, x: &'a [f32], rows: usize) -> std::borrow::Cow<'a, [f32]> {
        let Some(g) = &self.gather else {
            return x.into();
        };
        let k = self.in_features;
        let mut out = vec![0f32; rows * self.padded_in];
        if self.padded_in == 0 || k == 0 {
            // a fully pruned layer keeps no column (and chunks of 0 are not allowed)
            return out.into();
        }
        for (dst, src) in out.chunks_exact_mut(self.padded_in).zip(x.chunks_exact(k)) {
            for (d, &j) in dst.iter_mut().zip(g) {
                if j != PAD {
                    *d = src[j as usize];
                }
            }
        }
        out.into()
    }

    /// Scale and zero of span `si` for output row `r`, as f32.
    #[inline]
    pub fn param(&self, r: usize, si: usize) -> (f32, f32) {
        let p = self.params[r * self.spans.len() + si];
        (f16::from_bits(p as u16).to_f32(), (p >> 16) as f32)
    }

    /// Dequantize rows `rows` over padded columns `cols` (both slot-aligned for columns)
    /// into `out` `[rows.len(), cols.len()]`: the exact values `scale · (code − zero)`.
    /// Padding columns hold `−scale · zero`, harmless since `x` is zero there. Used by the
    /// tiled GEMM.
    pub fn dequantize_tile(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let width = cols.len();
        debug_assert!(cols.start.is_multiple_of(SLOT) && width.is_multiple_of(SLOT));
        for (r, dst) in rows.zip(out.chunks_exact_mut(width)) {
            let row = &self.words[r * self.row_words..(r + 1) * self.row_words];
            for (si, span) in self.spans.iter().enumerate() {
                let (c0, c1) = (
                    span.col0 as usize,
                    span.col0 as usize + SLOT * span.slots as usize,
                );
                let (lo, hi) = (c0.max(cols.start), c1.min(cols.end));
                if lo >= hi {
                    continue;
                }
                let (s, z) = self.param(r, si);
                let (b, spt) = (span.bits as usize, slots_per_tile(span.bits));
                let mask = (1u32 << b) - 1;
                for col in (lo..hi).step_by(SLOT) {
                    let slot = span.slot0 as usize + (col - c0) / SLOT;
                    let base = span.word_base as usize + (slot / spt) * TILE_WORDS;
                    let shift = (slot % spt) * b;
                    let out16 = &mut dst[col - cols.start..col - cols.start + SLOT];
                    for (o, &w) in out16.iter_mut().zip(&row[base..base + TILE_WORDS]) {
                        *o = s * (((w >> shift) & mask) as f32 - z);
                    }
                }
            }
        }
    }
}
