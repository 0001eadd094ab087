//! Packed-kernel throughput: bitsmith kernels (w4 g128, w3 g128, w2 g64, w8 per-channel;
//! the lookup-table kernels of codebook layers on the same codes at 4, 3 and 2 bits, and
//! at 4 bits also forced to AVX2 where the CPU has AVX-512) against candle's f32 and bf16 matmul and candle's Q4_0 `QMatMul`, at batch 1 (GEMV)
//! and batch 512 (GEMM), for the fixture's shapes and Llama-7B's, in one run. GEMV speed
//! is reported as GB/s of weight bytes (what each kernel holds resident) against the
//! memory bandwidth measured in the same run (a multi-threaded sum over a 1 GiB array).
//!
//!     cargo bench --bench kernels                 # all shapes
//!     BITSMITH_BENCH_SHAPES=4096x4096 cargo bench --bench kernels
//!
//! Prints a Markdown table.

use bitsmith::infer::ggml::GgmlLinear;
use bitsmith::infer::kernels::{Bf16Linear, BitsmithLinear, Isa, LutLinear};
use bitsmith::model::PackedMatmul;
use bitsmith::quant::{CodebookQuantizedLinear, GroupSize, QuantizedLinear, UniformGrid};
use candle_core::{DType, Device, Tensor};
use half::f16;
use rayon::prelude::*;

#[path = "timing.rs"]
#[allow(dead_code)] // shared helpers; this bench uses best_of only
mod timing;
use timing::best_of;

const SHAPES: &[(usize, usize)] = &[
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),
];

/// GB/s of a parallel read over 1 GiB (far beyond any cache): a wrapping integer sum in 16
/// lanes, which the compiler vectorises (an f32 sum would be latency-bound).
fn memory_bandwidth() -> f64 {
    let v: Vec<u32> = (0..(1u32 << 28)).collect();
    let secs = best_of(10, || {
        let s: u32 = v
            .par_chunks(1 << 18)
            .map(|c| {
                let mut acc = [0u32; 16];
                for w in c.chunks_exact(16) {
                    for (a, &b) in acc.iter_mut().zip(w) {
                        *a = a.wrapping_add(b);
                    }
                }
                acc.iter().fold(0u32, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u32::wrapping_add);
        std::hint::black_box(s);
    });
    (v.len() * 4) as f64 / secs / 1e9
}

fn layer(n: usize, k: usize, bits: u8, group: i64) -> QuantizedLinear {
    let grid = UniformGrid::new(bits, GroupSize::from_i64(group).unwrap(), true).unwrap();
    let g = grid.group_size.columns(k);
    let ng = grid.group_size.n_groups(k);
    let mut x = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    QuantizedLinear {
        out_features: n,
        in_features: k,
        grid,
        codes: (0..n * k)
            .map(|_| (next() % (grid.max_code() as u64 + 1)) as u8)
            .collect(),
        scales: (0..ng * n)
            .map(|i| f16::from_f32(0.01 + (i % 7) as f32 * 0.001))
            .collect(),
        zeros: vec![1u8 << (bits - 1); ng * n],
        g_idx: (0..k).map(|j| (j / g) as u32).collect(),
    }
}

/// The codebook layer of `q`'s codes and scales on a power table (`a = 0.7`, NUPES'
/// extended levels), so the lookup kernels read exactly the bytes the uniform ones do.
fn codebook(q: &QuantizedLinear) -> CodebookQuantizedLinear {
    let bits = q.grid.bits;
    let half = (1i32 << (bits - 1)) as f32;
    let table = (0..1i32 << bits)
        .map(|c| {
            let k = c as f32 - half;
            k.signum() * (k.abs() / (half - 0.5)).powf(1.0 / 0.7)
        })
        .collect();
    CodebookQuantizedLinear {
        out_features: q.out_features,
        in_features: q.in_features,
        bits,
        group_size: q.grid.group_size,
        exponent: 0.7,
        table,
        codes: q.codes.clone(),
        scales: q.scales.clone(),
        g_idx: q.g_idx.clone(),
    }
}

/// Enough copies of one kernel (built by `make`) to exceed the caches.
fn cold_copies<K: PackedMatmul + 'static>(make: impl Fn() -> K) -> Vec<Box<dyn PackedMatmul>> {
    let first = make();
    let n = copies(first.resident_bytes());
    std::iter::once(Box::new(first) as Box<dyn PackedMatmul>)
        .chain((1..n).map(|_| Box::new(make()) as Box<dyn PackedMatmul>))
        .collect()
}

/// Bytes a batch-1 sweep must touch so that no weights stay cached between calls (4× the
/// 32 MiB L3 of the machine this was written on).
const COLD_BYTES: usize = 128 << 20;

fn copies(bytes: usize) -> usize {
    COLD_BYTES.div_ceil(bytes.max(1)).clamp(1, 32)
}

/// candle's dense matmul behind the same trait, so every kernel is timed the same way.
#[derive(Debug)]
struct Dense(Tensor);

impl PackedMatmul for Dense {
    fn out_features(&self) -> usize {
        self.0.dims()[0]
    }
    fn in_features(&self) -> usize {
        self.0.dims()[1]
    }
    fn matmul(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        Ok(x.to_dtype(self.0.dtype())?.matmul(&self.0.t()?)?)
    }
    fn resident_bytes(&self) -> usize {
        self.0.elem_count() * self.0.dtype().size_in_bytes()
    }
    fn describe(&self) -> String {
        format!("candle {:?} matmul", self.0.dtype())
    }
}

/// bitsmith's bf16 linear on a bf16 input: batch 1–8 its GEMV, larger batches the AVX-512
/// BF16 GEMM (where the CPU has it).
#[derive(Debug)]
struct Bf16Input(Bf16Linear);

impl PackedMatmul for Bf16Input {
    fn out_features(&self) -> usize {
        self.0.out_features()
    }
    fn in_features(&self) -> usize {
        self.0.in_features()
    }
    fn matmul(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        self.0.matmul(&x.to_dtype(DType::BF16)?)
    }
    fn resident_bytes(&self) -> usize {
        self.0.resident_bytes()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

struct Row {
    shape: String,
    batch: usize,
    kernel: String,
    secs: f64,
    bytes: usize,
}

fn reps(batch: usize, n: usize, k: usize) -> usize {
    if batch == 1 {
        (2_000_000_000 / (n * k)).clamp(5, 200)
    } else {
        3
    }
}

fn main() {
    let only: Option<Vec<String>> = std::env::var("BITSMITH_BENCH_SHAPES")
        .ok()
        .map(|s| s.split(',').map(str::to_string).collect());
    let bw = memory_bandwidth();
    println!(
        "memory bandwidth (parallel sum over 1 GiB, {} threads): {bw:.1} GB/s\n",
        rayon::current_num_threads()
    );
    let mut rows = Vec::new();
    for &(n, k) in SHAPES {
        let shape = format!("{n}x{k}");
        if only.as_ref().is_some_and(|o| !o.contains(&shape)) {
            continue;
        }
        let dense_w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).unwrap();
        // (name, copies): GEMV cycles through enough copies to exceed the caches, as a
        // model's forward pass touches each layer's weights once per token
        let mut kernels: Vec<(String, Vec<Box<dyn PackedMatmul>>)> = Vec::new();
        for dtype in [DType::F32, DType::BF16] {
            let w = dense_w.to_dtype(dtype).unwrap();
            let c = copies(w.elem_count() * dtype.size_in_bytes());
            let list = (0..c)
                .map(|_| Box::new(Dense(w.copy().unwrap())) as Box<dyn PackedMatmul>)
                .collect();
            kernels.push((format!("candle {dtype:?} matmul").to_lowercase(), list));
        }
        let w = dense_w.to_dtype(DType::BF16).unwrap();
        let list = (0..copies(w.elem_count() * 2))
            .map(|_| {
                let k = Bf16Linear::from_bf16(&w.copy().unwrap()).unwrap().unwrap();
                Box::new(Bf16Input(k)) as Box<dyn PackedMatmul>
            })
            .collect();
        kernels.push(("bitsmith bf16 (GEMV / BF16 GEMM)".into(), list));
        for (bits, group) in [(4u8, 128i64), (3, 128), (2, 64), (8, -1)] {
            let q = layer(n, k, bits, group);
            kernels.push((
                format!("bitsmith w{bits} g{group}"),
                cold_copies(|| BitsmithLinear::from_quantized(&q).unwrap()),
            ));
            if bits == 4 || bits == 8 {
                // prompts only: batch 1 runs the same exact GEMV as the row above
                let int8 = BitsmithLinear::from_quantized(&q)
                    .unwrap()
                    .with_int8_activations();
                kernels.push((
                    format!("bitsmith w{bits} g{group} int8 activations"),
                    vec![Box::new(int8) as Box<dyn PackedMatmul>],
                ));
            }
            if bits <= 4 {
                let c = codebook(&q);
                kernels.push((
                    format!("bitsmith lut w{bits} g{group}"),
                    cold_copies(|| LutLinear::from_codebook(&c).unwrap()),
                ));
                if bits == 4 && Isa::detect() == Isa::Avx512 {
                    kernels.push((
                        format!("bitsmith lut w{bits} g{group} (avx2)"),
                        cold_copies(|| {
                            LutLinear::from_codebook(&c)
                                .unwrap()
                                .with_isa(Isa::Avx2)
                                .unwrap()
                        }),
                    ));
                }
            }
            if bits == 4 {
                let g = GgmlLinear::from_quantized(&q).unwrap();
                let list = (1..copies(g.resident_bytes())).map(|_| {
                    Box::new(GgmlLinear::from_quantized(&q).unwrap()) as Box<dyn PackedMatmul>
                });
                let all = std::iter::once(Box::new(g) as Box<dyn PackedMatmul>)
                    .chain(list)
                    .collect();
                kernels.push(("candle Q4_0 QMatMul".into(), all));
            }
        }
        for batch in [1usize, 512] {
            let x = Tensor::randn(0f32, 1.0, (batch, k), &Device::Cpu).unwrap();
            let r = reps(batch, n, k);
            for (name, list) in &kernels {
                if batch == 1 && name.ends_with("int8 activations") {
                    continue;
                }
                let used = if batch == 1 { &list[..] } else { &list[..1] };
                let secs = best_of(r, || {
                    for kern in used {
                        std::hint::black_box(kern.matmul(&x).unwrap());
                    }
                }) / used.len() as f64;
                rows.push(Row {
                    shape: shape.clone(),
                    batch,
                    kernel: name.clone(),
                    secs,
                    bytes: used[0].resident_bytes(),
                });
            }
        }
        eprintln!("done {shape}");
    }
    println!("| shape (out×in) | batch | kernel | time | weight MiB | GB/s of weights | % of bandwidth | GFLOP/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let (n, k) = r.shape.split_once('x').unwrap();
        let flops =
            2.0 * (r.batch * n.parse::<usize>().unwrap() * k.parse::<usize>().unwrap()) as f64;
        let gbs = r.bytes as f64 / r.secs / 1e9;
        let time = if r.secs < 1e-3 {
            format!("{:.1} µs", r.secs * 1e6)
        } else {
            format!("{:.2} ms", r.secs * 1e3)
        };
        println!(
            "| {} | {} | {} | {time} | {:.2} | {gbs:.1} | {:.0}% | {:.1} |",
            r.shape,
            r.batch,
            r.kernel,
            r.bytes as f64 / (1 << 20) as f64,
            100.0 * gbs / bw,
            flops / r.secs / 1e9
        );
    }
}
