//! The prefill/`ppl` GEMM with int8 activations (`--kernels int8`), the way llama.cpp
//! multiplies its blocks: each token's activations are quantized to int8 per chunk of at
//! most [`MAX_CHUNK`] columns (one f32 scale each, symmetric, round to nearest), then
//! multiplied with the layer's integer codes by integer dot products (AVX-512 VNNI's
//! `vpdpbusd`: 64 u8 × i8 products per instruction, four times the f32 FMA's 16; its
//! 256-bit AVX-VNNI form; or portable Rust, all with the same bits), and the integer sums
//! are scaled once per chunk:
//!
//! `y[t, j] = Σ_c s[j, c] · d[t, c] · (Σ_{k∈c} code[j, k] · q[t, k] − z[j, c] · Σ_{k∈c} q[t, k])`
//!
//! The zero-point term takes the sum of the *quantized* activations (as llama.cpp's Q4_1
//! takes its Q8_1 block sum), not the exact one: then the error is `Σ_k w_k · (d·q_k − x_k)`,
//! weighted by the weights themselves; with the exact sum it would be weighted by
//! `s · code`, which for an asymmetric 8-bit row is up to twice `|w|` everywhere (it cost
//! 3 % of perplexity on the fixture). That rounding is the only error against the exact
//! f32 GEMM (measured in the README).
//! Chunks never straddle a scale group (a span of the [`PackedLayout`]), so the weights'
//! scale is constant inside one.
//!
//! The weights are re-laid once, at load, as `u8` codes in the order the dot product
//! reads them: per tile of [`TILE_ROWS`] output rows, `[padded_in / 4][TILE_ROWS][4]` (four
//! consecutive columns of one row in one `u32` lane), with each row's scale and
//! scale·zero per chunk as f32. That costs about 1.25 bytes per weight on top of the
//! packed codes, and is only built for the int8 route.

mod avx512;
mod avx_vnni;

use super::super::layout::{PackedLayout, SLOT, TILE_WORDS, slots_per_tile};
use crate::util::SharedOut;
use rayon::prelude::*;

/// Output rows per tile (two AVX-512 registers of `i32`).
pub const TILE_ROWS: usize = 32;
/// Most columns one activation scale covers (a multiple of [`SLOT`]).
pub const MAX_CHUNK: usize = 32;

/// A run of padded columns with one activation scale and one weight scale per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    col0: usize,
    width: usize,
}

/// The instructions an int8 GEMM runs with (all give the same bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    Portable,
    /// AVX2 with the 256-bit `vpdpbusd` (AVX-VNNI: Intel client cores since Alder Lake).
    AvxVnni,
    /// AVX-512 VNNI.
    Avx512Vnni,
}

impl Int8Kernel {
    /// Whether this CPU runs the kernel (no allocation: asked on every GEMM call).
    pub fn runs_here(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::AvxVnni => {
                is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => {
                is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every kernel this CPU runs, the fastest last.
    pub fn available() -> Vec<Self> {
        [Self::Portable, Self::AvxVnni, Self::Avx512Vnni]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// The fastest kernel allowed under a [`super::Isa`] (AVX-512 kernels under `Avx512`
    /// only, the AVX-VNNI one under `Avx2` or `Avx512`).
    pub fn best_for(isa: super::Isa) -> Self {
        let allowed: &[Self] = match isa {
            super::Isa::Portable => &[],
            super::Isa::Avx2 => &[Self::AvxVnni],
            super::Isa::Avx512 => &[Self::Avx512Vnni, Self::AvxVnni],
        };
        allowed
            .iter()
            .copied()
            .find(|k| k.runs_here())
            .unwrap_or(Self::Portable)
    }
}

/// A packed layer re-laid for the integer dot products (see the module doc).
#[derive(Debug, Clone)]
pub struct Int8Weights {
    out_features: usize,
    padded_in: usize,
    chunks: Vec<Chunk>,
    /// `[tiles][padded_in / 4][TILE_ROWS][4]`.
    codes: Vec<u8>,
    /// `[tiles][chunks][TILE_ROWS]`: the weights' scale of each row in each chunk.
    scale: Vec<f32>,
    /// `[tiles][chunks][TILE_ROWS]`: scale × zero point.
    scaled_zero: Vec<f32>,
}

impl Int8Weights {
    /// Re-lay `l` (any widths ≤ 8 bits).
    pub fn new(l: &PackedLayout) -> Self {
        let (n, kp) = (l.out_features, l.padded_in);
        let tiles = n.div_ceil(TILE_ROWS);
        let mut chunks = Vec::new();
        let mut chunk_span = Vec::new();
        for (si, sp) in l.spans.iter().enumerate() {
            let (c0, c1) = (sp.col0 as usize, sp.col0 as usize + SLOT * sp.slots as usize);
            for col0 in (c0..c1).step_by(MAX_CHUNK) {
                chunks.push(Chunk {
                    col0,
                    width: MAX_CHUNK.min(c1 - col0),
                });
                chunk_span.push(si);
            }
        }
        let mut codes = vec![0u8; tiles * kp * TILE_ROWS];
        let mut scale = vec![0f32; tiles * chunks.len() * TILE_ROWS];
        let mut scaled_zero = vec![0f32; scale.len()];
        for r in 0..n {
            let (tile, lane) = (r / TILE_ROWS, r % TILE_ROWS);
            let tile_codes = &mut codes[tile * kp * TILE_ROWS..(tile + 1) * kp * TILE_ROWS];
            let row = &l.words[r * l.row_words..(r + 1) * l.row_words];
            for sp in &l.spans {
                let (b, spt) = (sp.bits as usize, slots_per_tile(sp.bits));
                let mask = (1u32 << b) - 1;
                for i in 0..sp.slots as usize {
                    let slot = sp.slot0 as usize + i;
                    let base = sp.word_base as usize + (slot / spt) * TILE_WORDS;
                    let shift = (slot % spt) * b;
                    for (lanes, &w) in row[base..base + TILE_WORDS].iter().enumerate() {
                        let col = sp.col0 as usize + SLOT * i + lanes;
                        tile_codes[(col / 4) * TILE_ROWS * 4 + lane * 4 + col % 4] =
                            ((w >> shift) & mask) as u8;
                    }
                }
            }
            for (c, &si) in chunk_span.iter().enumerate() {
                let (s, z) = l.param(r, si);
                let at = (tile * chunks.len() + c) * TILE_ROWS + lane;
                scale[at] = s;
                scaled_zero[at] = s * z;
            }
        }
        Self {
            out_features: n,
            padded_in: kp,
            chunks,
            codes,
            scale,
            scaled_zero,
        }
    }

    pub fn resident_bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scale.len() + self.scaled_zero.len())
    }

    /// `y` `[m, out]` = `x` `[m, padded_in]` (padded order) · Wᵀ, with `x` quantized to
    /// int8 per token and chunk, by `kernel` (every kernel gives the same bits).
    pub fn gemm(&self, x: &[f32], m: usize, y: &mut [f32], kernel: Int8Kernel) {
        assert!(
            kernel.runs_here(),
            "the {kernel:?} int8 kernel asked for on a CPU without it"
        );
        debug_assert_eq!(x.len(), m * self.padded_in);
        debug_assert_eq!(y.len(), m * self.out_features);
        let acts = Int8Acts::quantize(x, m, self.padded_in, &self.chunks, kernel);
        let out = SharedOut::new(y);
        (0..self.out_features.div_ceil(TILE_ROWS))
            .into_par_iter()
            .for_each(|tile| {
                let t = self.tile(tile);
                match kernel {
                    Int8Kernel::Avx512Vnni => avx512::tile_gemm(&t, &acts, out),
                    Int8Kernel::AvxVnni => avx_vnni::tile_gemm(&t, &acts, out),
                    Int8Kernel::Portable => portable_tile_gemm(&t, &acts, out),
                }
            });
    }

    fn tile(&self, tile: usize) -> Tile<'_> {
        let (kp, nc) = (self.padded_in, self.chunks.len());
        let params = tile * nc * TILE_ROWS..(tile + 1) * nc * TILE_ROWS;
        Tile {
            row0: tile * TILE_ROWS,
            rows: TILE_ROWS.min(self.out_features - tile * TILE_ROWS),
            out_features: self.out_features,
            chunks: &self.chunks,
            codes: &self.codes[tile * kp * TILE_ROWS..(tile + 1) * kp * TILE_ROWS],
            scale: &self.scale[params.clone()],
            scaled_zero: &self.scaled_zero[params],
        }
    }
}

/// One tile's share of [`Int8Weights`], what a kernel reads.
struct Tile<'a> {
    row0: usize,
    /// Real rows of the tile (the last one may be short; its missing rows hold zeros).
    rows: usize,
    out_features: usize,
    chunks: &'a [Chunk],
    codes: &'a [u8],
    scale: &'a [f32],
    scaled_zero: &'a [f32],
}

/// Activations quantized per token and chunk.
struct Int8Acts {
    m: usize,
    padded_in: usize,
    /// `[m, padded_in]`.
    q: Vec<i8>,
    /// `[m, chunks]`: the step `d` of each token's chunk (`x ≈ d · q`).
    step: Vec<f32>,
    /// `[m, chunks]`: `d · Σq` of each token's chunk.
    sum: Vec<f32>,
}

impl Int8Acts {
    /// `kernel` only picks the instructions; every path gives the same bits (rounding to
    /// nearest even, integer sums).
    fn quantize(x: &[f32], m: usize, kp: usize, chunks: &[Chunk], kernel: Int8Kernel) -> Self {
        let nc = chunks.len();
        let mut q = vec![0i8; m * kp];
        let mut step = vec![0f32; m * nc];
        let mut sum = vec![0f32; m * nc];
        q.par_chunks_mut(kp)
            .zip(step.par_chunks_mut(nc))
            .zip(sum.par_chunks_mut(nc))
            .zip(x.par_chunks(kp))
            .for_each(|(((q, step), sum), x)| {
                for (c, ch) in chunks.iter().enumerate() {
                    let cols = ch.col0..ch.col0 + ch.width;
                    let (xs, qs) = (&x[cols.clone()], &mut q[cols]);
                    (step[c], sum[c]) = if kernel == Int8Kernel::Avx512Vnni {
                        avx512::quantize_chunk(xs, qs)
                    } else {
                        quantize_chunk(xs, qs)
                    };
                }
            });
        Self {
            m,
            padded_in: kp,
            q,
            step,
            sum,
        }
    }
}

/// Quantize one chunk (a multiple of 16 values) to int8 with one step `d = max|x| / 127`;
/// returns `d` and `d · Σq`, the sum of the quantized values the zero-point term uses.
fn quantize_chunk(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    if amax == 0.0 {
        q.fill(0);
        return (0.0, 0.0);
    }
    let inv = 127.0 / amax;
    // adding and removing 1.5·2²³ rounds to nearest even without a libm call
    const ROUND: f32 = 12_582_912.0;
    let mut qsum = 0i32;
    for (qv, &v) in q.iter_mut().zip(x) {
        *qv = ((v * inv + ROUND) - ROUND).clamp(-127.0, 127.0) as i8;
        qsum += *qv as i32;
    }
    let step = amax / 127.0;
    (step, step * qsum as f32)
}

/// The portable kernel: the same operations in the same order as the VNNI one (integer
/// sums are exact; each chunk's f32 update is one fused multiply-add of `(d · s)` and one
/// of `−Σx · (s · z)`), so the two agree to the bit.
fn portable_tile_gemm(t: &Tile, acts: &Int8Acts, out: SharedOut) {
    let (kp, nc) = (acts.padded_in, t.chunks.len());
    for tok in 0..acts.m {
        let q = &acts.q[tok * kp..(tok + 1) * kp];
        for lane in 0..t.rows {
            let mut y = 0f32;
            for (c, ch) in t.chunks.iter().enumerate() {
                let mut acc = 0i32;
                for (k, &qk) in q.iter().enumerate().skip(ch.col0).take(ch.width) {
                    let code = t.codes[(k / 4) * TILE_ROWS * 4 + lane * 4 + k % 4];
                    acc += code as i32 * qk as i32;
                }
                let p = c * TILE_ROWS + lane;
                let ds = acts.step[tok * nc + c] * t.scale[p];
                y = (acc as f32).mul_add(ds, y);
                y = (-acts.sum[tok * nc + c]).mul_add(t.scaled_zero[p], y);
            }
            // SAFETY: row `row0 + lane` of token `tok` belongs to this tile alone.
            unsafe { *out.at(tok * t.out_features + t.row0 + lane) = y };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{GroupSize, QuantizedLinear, UniformGrid};
    use half::f16;

    struct Xorshift(u64);
    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Heavy-tailed values in about ±`scale`·8.
        fn value(&mut self, scale: f32) -> f32 {
            let u = (self.next() % 20001) as f32 / 10000.0 - 1.0;
            scale * u * u * u * 8.0
        }
    }

    fn kernels() -> Vec<Int8Kernel> {
        Int8Kernel::available()
    }

    /// Each value is the nearest multiple of the step (ties excepted, where f32's `x/d`
    /// may fall either side), the step is `max|x|/127`, the sum is `d·Σq`; both paths.
    #[test]
    fn chunks_round_to_nearest_step() {
        let mut rng = Xorshift(0x2545F4914F6CDD1D);
        for kernel in kernels() {
            for (len, scale) in [(16, 1.0), (32, 1e-3), (128, 40.0), (48, 0.0)] {
                let x: Vec<f32> = (0..len).map(|_| rng.value(scale)).collect();
                let mut q = vec![0i8; len];
                let (step, sum) = if kernel == Int8Kernel::Avx512Vnni {
                    avx512::quantize_chunk(&x, &mut q)
                } else {
                    quantize_chunk(&x, &mut q)
                };
                let amax = x.iter().fold(0f64, |a, &v| a.max(v.abs() as f64));
                assert_eq!(step, (amax / 127.0) as f32, "{kernel:?} len {len}");
                let qsum: i32 = q.iter().map(|&v| v as i32).sum();
                assert_eq!(sum, step * qsum as f32);
                for (&v, &qv) in x.iter().zip(&q) {
                    if amax == 0.0 {
                        assert_eq!(qv, 0);
                        continue;
                    }
                    let exact = v as f64 * 127.0 / amax;
                    let off = (exact - qv as f64).abs();
                    assert!(
                        off <= 0.5 + 1e-5,
                        "{kernel:?}: {v} became {qv} (exact {exact})"
                    );
                }
            }
        }
    }

    /// Given the quantized activations, the kernels compute `Σ_k w_k · d·q_k` (the
    /// dequantized weights times the dequantized activations) up to f32 rounding, against
    /// float64, over several tiles, short last tiles and token counts that leave partial
    /// register blocks.
    #[test]
    fn kernels_equal_float64_of_dequantized_operands() {
        let mut rng = Xorshift(0x9E3779B97F4A7C15);
        for (n, k, bits, group, sym) in [
            (70usize, 160usize, 8u8, -1i64, false),
            (33, 576, 4, 128, true),
            (16, 96, 2, 32, false),
            (40, 1536, 3, 64, false),
        ] {
            let grid = UniformGrid::new(bits, GroupSize::from_i64(group).unwrap(), sym).unwrap();
            let (g, ng) = (grid.group_size.columns(k), grid.group_size.n_groups(k));
            let q = QuantizedLinear {
                out_features: n,
                in_features: k,
                grid,
                codes: (0..n * k)
                    .map(|_| (rng.next() % (grid.max_code() as u64 + 1)) as u8)
                    .collect(),
                scales: (0..ng * n)
                    .map(|_| f16::from_f32(0.001 + (rng.next() % 100) as f32 * 1e-4))
                    .collect(),
                zeros: (0..ng * n)
                    .map(|_| (rng.next() % (grid.max_code() as u64 + 1)) as u8)
                    .collect(),
                g_idx: (0..k).map(|j| (j / g) as u32).collect(),
            };
            let layout = PackedLayout::from_quantized(&q).unwrap();
            assert!(layout.gather.is_none(), "these shapes keep the column order");
            let w = q.dequantize();
            let weights = Int8Weights::new(&layout);
            for m in [9usize, 13, 20] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.value(1.0)).collect();
                for kernel in kernels() {
                    let acts = Int8Acts::quantize(&x, m, k, &weights.chunks, kernel);
                    let mut y = vec![f32::NAN; m * n];
                    weights.gemm(&x, m, &mut y, kernel);
                    let nc = weights.chunks.len();
                    for t in 0..m {
                        let xhat: Vec<f64> = (0..k)
                            .map(|col| {
                                let c = weights
                                    .chunks
                                    .iter()
                                    .position(|ch| (ch.col0..ch.col0 + ch.width).contains(&col))
                                    .unwrap();
                                acts.step[t * nc + c] as f64 * acts.q[t * k + col] as f64
                            })
                            .collect();
                        for j in 0..n {
                            let (mut want, mut mag) = (0f64, 0f64);
                            for col in 0..k {
                                let wv = w[j * k + col] as f64;
                                want += wv * xhat[col];
                                // the terms the kernel rounds: s·code·x̂ and s·zero·x̂
                                let s = q.scales[(col / g) * n + j].to_f64();
                                mag += (wv.abs() + 2.0 * s * 255.0) * xhat[col].abs();
                            }
                            let got = y[t * n + j] as f64;
                            let tol = 4.0 * (k as f64) * f32::EPSILON as f64 * mag + 1e-30;
                            assert!(
                                (got - want).abs() <= tol,
                                "{n}x{k} w{bits} g{group} {kernel:?} [{t},{j}]: {got} vs {want} (±{tol})"
                            );
                        }
                    }
                }
            }
        }
    }
}
