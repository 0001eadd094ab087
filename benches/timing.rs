//! Shared by the benchmarks (included with `#[path]`; not a bench itself).

use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc; // as in the binary

/// Fastest of `n` runs, in seconds.
pub fn best_of<F: FnMut()>(n: usize, mut f: F) -> f64 {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// GFLOP/s of an `m×k · k×n` f32 matmul through candle (rhs transposed, as linears use it).
pub fn matmul_gflops(m: usize, k: usize, n: usize) -> f64 {
    use candle_core::{Device, Tensor};
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    let bt = b.t().unwrap();
    let s = best_of(5, || {
        a.matmul(&bt).unwrap();
    });
    2.0 * (m * k * n) as f64 / s / 1e9
}
