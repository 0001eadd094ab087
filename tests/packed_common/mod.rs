//! Random packed layers, inputs and the f64 reference shared by the kernel tests
//! (`tests/infer_kernels.rs`, whose module doc explains the bound, `tests/gpu_layout.rs`,
//! `tests/cuda_kernels.rs`).
#![allow(dead_code)]

use bitsmith::quant::{GroupSize, MixedQuantizedLinear, QuantizedLinear, UniformGrid};
use half::f16;

/// xorshift64*: enough randomness for test data, no RNG crate.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

pub fn seed() -> u64 {
    std::env::var("BITSMITH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
                | 1
        })
}

pub fn random_scale(rng: &mut Rng) -> f16 {
    f16::from_f32(0.001 + 0.05 * rng.unit())
}

pub fn random_layer(
    rng: &mut Rng,
    n: usize,
    k: usize,
    bits: u8,
    group: GroupSize,
    sym: bool,
    act_order: bool,
) -> QuantizedLinear {
    let grid = UniformGrid::new(bits, group, sym).expect("valid grid");
    let g = group.columns(k);
    let n_groups = group.n_groups(k);
    let maxq = grid.max_code() as u64;
    let mut g_idx: Vec<u32> = (0..k).map(|j| (j / g) as u32).collect();
    if act_order {
        rng.shuffle(&mut g_idx);
    }
    QuantizedLinear {
        out_features: n,
        in_features: k,
        grid,
        codes: (0..n * k).map(|_| rng.below(maxq + 1) as u8).collect(),
        scales: (0..n_groups * n).map(|_| random_scale(rng)).collect(),
        zeros: (0..n_groups * n)
            .map(|_| {
                if sym {
                    1u8 << (bits - 1)
                } else {
                    rng.below(maxq + 1) as u8
                }
            })
            .collect(),
        g_idx,
    }
}

pub fn random_x(rng: &mut Rng, len: usize) -> Vec<f32> {
    // a few large outliers, like real activations
    (0..len)
        .map(|_| {
            let v = 2.0 * rng.unit() - 1.0;
            if rng.below(64) == 0 {
                20.0 * v
            } else {
                v
            }
        })
        .collect()
}

/// Reference outputs `[m, n]` in f64 and each output's `Σ|w·x|`.
pub fn reference(w: &[f32], x: &[f32], n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let m = x.len() / k;
    let mut y = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for r in 0..n {
            let (mut s, mut a) = (0f64, 0f64);
            for j in 0..k {
                let p = w[r * k + j] as f64 * x[i * k + j] as f64;
                s += p;
                a += p.abs();
            }
            y[i * n + r] = s;
            mag[i * n + r] = a;
        }
    }
    (y, mag)
}

pub fn gamma(n: usize) -> f64 {
    let u = f64::powi(2.0, -24);
    n as f64 * u / (1.0 - n as f64 * u)
}

/// Largest `|y − ref| / bound` over all outputs; fails the test above 1.
pub fn check(what: &str, seed: u64, y: &[f32], want: &[f64], bound: &[f64]) -> f64 {
    assert_eq!(y.len(), want.len(), "{what}: output length (seed {seed})");
    let mut worst = 0f64;
    for (i, ((&a, &b), &e)) in y.iter().zip(want).zip(bound).enumerate() {
        let ratio = (a as f64 - b).abs() / e.max(f64::MIN_POSITIVE);
        assert!(
            ratio <= 1.0,
            "{what}: output {i} = {a}, reference {b}, error {} > bound {e} (seed {seed}; rerun with BITSMITH_TEST_SEED={seed})",
            (a as f64 - b).abs()
        );
        worst = worst.max(ratio);
    }
    worst
}

pub fn random_mixed(
    rng: &mut Rng,
    n: usize,
    k: usize,
    widths: &[u8],
    group_size: Option<usize>,
) -> MixedQuantizedLinear {
    let widths: Vec<u8> = (0..k)
        .map(|_| widths[rng.below(widths.len() as u64) as usize])
        .collect();
    mixed_with_widths(rng, n, widths, group_size)
}

/// A random mixed-width layer with the given width of every input column.
pub fn mixed_with_widths(
    rng: &mut Rng,
    n: usize,
    widths: Vec<u8>,
    group_size: Option<usize>,
) -> MixedQuantizedLinear {
    let k = widths.len();
    let codes = (0..n * k)
        .map(|i| {
            let b = widths[i % k];
            if b == 0 {
                0
            } else {
                rng.below(1 << b) as u8
            }
        })
        .collect();
    let groups = bitsmith::quant::mixed_groups(&widths, group_size);
    let scales = (0..groups.n_groups() * n)
        .map(|_| random_scale(rng))
        .collect();
    let zeros = (0..groups.n_groups() * n)
        .map(|i| rng.below(1 << groups.group_width[i / n]) as u8)
        .collect();
    MixedQuantizedLinear {
        out_features: n,
        in_features: k,
        sym: false,
        widths,
        group_size,
        codes,
        scales,
        zeros,
    }
}

/// The mixed-width cases every kernel test runs (shapes × width sets × range groups):
/// `f(rng, description, layer)` for each.
pub fn for_each_mixed_case(
    rng: &mut Rng,
    mut f: impl FnMut(&mut Rng, String, MixedQuantizedLinear),
) {
    for &(n, k) in &[(37, 40), (33, 576), (65, 130)] {
        for widths in [
            &[0u8, 1, 2, 3, 4, 5, 6, 7, 8][..],
            &[0, 2, 4],
            &[3],
            &[0, 8],
            // a fully pruned layer (BAQ gave it 0 bits): no span, no code, output 0
            &[0],
        ] {
            for group_size in [None, Some(32), Some(7)] {
                let q = random_mixed(rng, n, k, widths, group_size);
                f(
                    rng,
                    format!("mixed {n}x{k} widths {widths:?} groups {group_size:?}"),
                    q,
                );
            }
        }
    }
}
