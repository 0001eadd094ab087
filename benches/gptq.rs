//! Calibration hot spots on the fixture's layer shapes, against the f32 matmul rate measured
//! in the same run: Hessian accumulation (`XᵀX` over 2048-token segments) and the GPTQ
//! solve (Cholesky + inverse + column sweep with lazy block updates).
//!
//!     cargo bench --bench gptq

use bitsmith::calibration::HessianAccumulator;
use bitsmith::quant::{gptq, GptqOptions, GroupSize, UniformGrid};
use candle_core::{Device, Tensor};

#[path = "timing.rs"]
mod timing;
use timing::{best_of, matmul_gflops};

fn main() {
    let mm = matmul_gflops(2048, 2048, 2048);
    println!("f32 matmul 2048^3 (candle): {mm:.1} GFLOP/s");

    for k in [576usize, 1536] {
        let x = Tensor::randn(0f32, 1.0, (1, 2048, k), &Device::Cpu).unwrap();
        let segments = 8;
        let t = best_of(3, || {
            let mut acc = HessianAccumulator::new(k);
            for _ in 0..segments {
                acc.add(&x).unwrap();
            }
            acc.finish().unwrap();
        });
        let flops = 2.0 * (segments * 2048 * k * k) as f64;
        println!("Hessian accumulation, width {k}: {:.1} GFLOP/s ({:.0}% of matmul), {:.1} ms per 2048-token segment", flops / t / 1e9, 100.0 * flops / t / 1e9 / mm, 1e3 * t / segments as f64);
    }

    // GPTQ solve on the fixture's shapes (out, in), w4 g128 asym
    let grid = UniformGrid::new(4, GroupSize::Columns(128), false).unwrap();
    for (n, k, name) in [
        (576usize, 576usize, "q_proj/o_proj"),
        (1536, 576, "gate/up_proj"),
        (576, 1536, "down_proj"),
    ] {
        let w: Vec<f32> = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, (4096, k), &Device::Cpu).unwrap();
        let mut acc = HessianAccumulator::new(k);
        acc.add(&x).unwrap();
        let h = acc.finish().unwrap();
        let opts = GptqOptions::new(grid);
        let t = best_of(3, || {
            gptq(&w, n, k, &h, &opts).unwrap();
        });
        // Cholesky + inverse + Cholesky ≈ k³ (f64), sweep + lazy updates ≈ n·k² (f64)
        let flops = (k as f64).powi(3) + 2.0 * n as f64 * (k as f64).powi(2);
        println!("GPTQ solve {name} {n}x{k}: {:.1} ms, {:.1} GFLOP/s (f64) = {:.0}% of the f32 matmul rate", t * 1e3, flops / t / 1e9, 100.0 * flops / t / 1e9 / mm);
    }
}
