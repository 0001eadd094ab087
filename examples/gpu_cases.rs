//! Writes test cases for the GPU kernels (`kernels/*.cu`, `kernels/*.metal`): random packed
//! layers in bitsmith's layout (2/3/4/8 bits, groups 32/64/128/-1 and partial, act-order,
//! mixed widths with pruned columns), inputs already gathered into the padded order, f64
//! reference outputs of dequantize-then-matmul and each output's error bound
//! `γ(K + 8)·Σ|w·x|` (f32 accumulation order only). `kernels/test_bitsmith_matmul.cu`
//! reads them; `kernels/run-cuda-tests.sh` drives both.
//!
//!     cargo run --release --example gpu_cases -- OUT_DIR [--bench]
//!
//! File layout (little-endian): `BSMK`, u32 n, kp, row_words, n_spans, m, n_slots, bench;
//! spans (5 u32 each: bits, slots, col0, tile_word0, t0); slot_span; words; params;
//! x (f32 `[m, kp]`); reference (f64 `[m, n]`); bound (f64 `[m, n]`).

use anyhow::{Context, Result};
use bitsmith::infer::layout::PackedLayout;
use bitsmith::quant::{GroupSize, MixedQuantizedLinear, QuantizedLinear, UniformGrid};
use half::f16;
use std::io::Write;
use std::path::PathBuf;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn uniform(
    rng: &mut Rng,
    n: usize,
    k: usize,
    bits: u8,
    g: i64,
    sym: bool,
    act: bool,
) -> QuantizedLinear {
    let grid = UniformGrid::new(bits, GroupSize::from_i64(g).expect("group"), sym).expect("grid");
    let (gs, ng) = (grid.group_size.columns(k), grid.group_size.n_groups(k));
    let mut g_idx: Vec<u32> = (0..k).map(|j| (j / gs) as u32).collect();
    if act {
        for i in (1..k).rev() {
            g_idx.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    let maxq = grid.max_code() as u64 + 1;
    QuantizedLinear {
        out_features: n,
        in_features: k,
        grid,
        codes: (0..n * k).map(|_| rng.below(maxq) as u8).collect(),
        scales: (0..ng * n)
            .map(|_| f16::from_f32(0.001 + 0.05 * rng.unit()))
            .collect(),
        zeros: (0..ng * n)
            .map(|_| {
                if sym {
                    1 << (bits - 1)
                } else {
                    rng.below(maxq) as u8
                }
            })
            .collect(),
        g_idx,
    }
}

fn mixed(rng: &mut Rng, n: usize, k: usize) -> MixedQuantizedLinear {
    let widths: Vec<u8> = (0..k).map(|_| rng.below(9) as u8).collect();
    MixedQuantizedLinear {
        out_features: n,
        in_features: k,
        sym: false,
        codes: (0..n * k)
            .map(|i| match widths[i % k] {
                0 => 0,
                b => rng.below(1 << b) as u8,
            })
            .collect(),
        widths,
        scales: (0..n * 9)
            .map(|_| f16::from_f32(0.001 + 0.05 * rng.unit()))
            .collect(),
        zeros: (0..n * 9)
            .map(|i| rng.below(1 << (i % 9).max(1)) as u8)
            .collect(),
    }
}

fn write_case(
    dir: &PathBuf,
    name: &str,
    l: &PackedLayout,
    w: &[f32],
    m: usize,
    bench: bool,
    rng: &mut Rng,
) -> Result<()> {
    let (n, k) = (l.out_features, l.in_features);
    let x: Vec<f32> = (0..m * k).map(|_| 2.0 * rng.unit() - 1.0).collect();
    let xp = l.gather_rows(&x, m);
    // references are skipped for benchmark-only cases (too slow in f64 at 11008 rows)
    let (mut want, mut bound) = (vec![0f64; m * n], vec![0f64; m * n]);
    if !bench {
        let u = f64::powi(2.0, -24);
        let gamma = (k + 8) as f64 * u / (1.0 - (k + 8) as f64 * u);
        for i in 0..m {
            for r in 0..n {
                let (mut s, mut a) = (0f64, 0f64);
                for j in 0..k {
                    let p = w[r * k + j] as f64 * x[i * k + j] as f64;
                    s += p;
                    a += p.abs();
                }
                want[i * n + r] = s;
                bound[i * n + r] = gamma * a;
            }
        }
    }
    let slot_span = l.slot_spans();
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(dir.join(format!("{name}.bin"))).context("creating a case file")?,
    );
    f.write_all(b"BSMK")?;
    for v in [
        n,
        l.padded_in,
        l.row_words,
        l.spans.len(),
        m,
        slot_span.len(),
        bench as usize,
    ] {
        f.write_all(&(v as u32).to_le_bytes())?;
    }
    for s in &l.spans {
        for v in [s.bits as u32, s.slots, s.col0, s.tile_word0, s.t0] {
            f.write_all(&v.to_le_bytes())?;
        }
    }
    for v in slot_span.iter().chain(&l.words).chain(&l.params) {
        f.write_all(&v.to_le_bytes())?;
    }
    for v in xp.iter() {
        f.write_all(&v.to_le_bytes())?;
    }
    for v in want.iter().chain(&bound) {
        f.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(args.first().context("usage: gpu_cases OUT_DIR [--bench]")?);
    std::fs::create_dir_all(&dir)?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let mut count = 0;
    for &(n, k) in &[(37usize, 40usize), (577, 576), (65, 130)] {
        for bits in [2u8, 3, 4, 8] {
            for g in [32i64, 64, 128, -1] {
                for (sym, act) in [(true, false), (false, true)] {
                    let q = uniform(&mut rng, n, k, bits, g, sym, act);
                    let l = PackedLayout::from_quantized(&q)?;
                    let w = q.dequantize();
                    for m in [1usize, 3, 8, 9, 64] {
                        let name = format!(
                            "{n}x{k}_w{bits}_g{g}_{}{}_m{m}",
                            if sym { "sym" } else { "asym" },
                            if act { "_act" } else { "" }
                        );
                        write_case(&dir, &name, &l, &w, m, false, &mut rng)?;
                        count += 1;
                    }
                }
            }
        }
        let q = mixed(&mut rng, n, k);
        let l = PackedLayout::from_mixed(&q)?;
        for m in [1usize, 8, 64] {
            write_case(
                &dir,
                &format!("{n}x{k}_mixed_m{m}"),
                &l,
                &q.dequantize(),
                m,
                false,
                &mut rng,
            )?;
            count += 1;
        }
    }
    if args.iter().any(|a| a == "--bench") {
        for (bits, g) in [(4u8, 128i64), (3, 128), (2, 64), (8, -1)] {
            let q = uniform(&mut rng, 4096, 4096, bits, g, true, false);
            let l = PackedLayout::from_quantized(&q)?;
            for m in [1usize, 512] {
                write_case(
                    &dir,
                    &format!("bench_4096x4096_w{bits}_g{g}_m{m}"),
                    &l,
                    &[],
                    m,
                    true,
                    &mut rng,
                )?;
                count += 1;
            }
        }
    }
    println!("{count} cases in {}", dir.display());
    Ok(())
}
