//! Packed-kernel throughput: bitsmith kernels (w4 g128, w3 g128, w2 g64, w8 per-channel)
//! against candle's f32 and bf16 matmul and candle's Q4_0 `QMatMul`, at batch 1 (GEMV)
//! and batch 512 (GEMM), for the fixture's shapes and Llama-7B's, in one run. GEMV speed
//! is reported as GB/s of weight bytes (what each kernel holds resident) against the
//! memory bandwidth measured in the same run (a multi-threaded sum over a 1 GiB array).
//!
//!     cargo bench --bench kernels                 # all shapes
//!     BITSMITH_BENCH_SHAPES=4096x4096 cargo bench --bench kernels
//!
//! Prints a Markdown table.

use bitsmith::infer::ggml::GgmlLinear;
use bitsmith::infer::kernels::BitsmithLinear;
use bitsmith::model::PackedMatmul;
use bitsmith::quant::{GroupSize, QuantizedLinear, UniformGrid};
use candle_core::{DType, Device, Tensor};
use half::f16;
use rayon::prelude::*;

#[path = "timing.rs"]
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

/// GB/s of a parallel read over 1 GiB (far beyond any cache): a wrapping integer sum, which
/// the compiler vectorises (an f32 sum would be latency-bound, not memory-bound).
fn memory_bandwidth() -> f64 {
    let v: Vec<u32> = (0..(1u32 << 28)).collect();
    let secs = best_of(5, || {
        let s: u32 = v
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u32, |a, &b| a.wrapping_add(b)))
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
        let dense_bf = dense_w.to_dtype(DType::BF16).unwrap();
        let mut kernels: Vec<(String, Box<dyn PackedMatmul>)> = Vec::new();
        for (bits, group) in [(4u8, 128i64), (3, 128), (2, 64), (8, -1)] {
            let q = layer(n, k, bits, group);
            let name = format!("bitsmith w{bits} g{group}");
            kernels.push((name, Box::new(BitsmithLinear::from_quantized(&q).unwrap())));
            if bits == 4 {
                let g = GgmlLinear::from_quantized(&q).unwrap();
                kernels.push(("candle Q4_0 QMatMul".into(), Box::new(g)));
            }
        }
        for batch in [1usize, 512] {
            let x = Tensor::randn(0f32, 1.0, (batch, k), &Device::Cpu).unwrap();
            let xb = x.to_dtype(DType::BF16).unwrap();
            let r = reps(batch, n, k);
            let wt = dense_w.t().unwrap();
            let secs = best_of(r, || {
                std::hint::black_box(x.matmul(&wt).unwrap());
            });
            rows.push(Row {
                shape: shape.clone(),
                batch,
                kernel: "candle f32 matmul".into(),
                secs,
                bytes: 4 * n * k,
            });
            let wbt = dense_bf.t().unwrap();
            let secs = best_of(r, || {
                std::hint::black_box(xb.matmul(&wbt).unwrap());
            });
            rows.push(Row {
                shape: shape.clone(),
                batch,
                kernel: "candle bf16 matmul".into(),
                secs,
                bytes: 2 * n * k,
            });
            for (name, kern) in &kernels {
                let secs = best_of(r, || {
                    std::hint::black_box(kern.matmul(&x).unwrap());
                });
                rows.push(Row {
                    shape: shape.clone(),
                    batch,
                    kernel: name.clone(),
                    secs,
                    bytes: kern.resident_bytes(),
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
