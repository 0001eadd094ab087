//! Which bf16 GEMM this machine runs: decided once per process by measuring the two
//! instructions the kernels are built on, because the CPU's name does not tell. On the
//! project's CI-like machine `vdpbf16ps` (64 flops) retired at twice the rate of an f32
//! `vfmadd` (32 flops) one day — the dot-product GEMM reached 639–739 GFLOP/s on two cores,
//! 3× the f32 GEMM — and at half that rate on another host reporting the same CPU family
//! (85.6 against 171 GFLOP/s per core in the probe below), where widening to f32 wins by
//! 1.4–1.7×. The two outcomes are a factor of four apart, so a probe of about a millisecond
//! decides reliably. `BITSMITH_BF16_GEMM=dot|widen` forces a kernel (reproducible
//! roundings across machines: the kernels sum in different orders).

use std::sync::OnceLock;

/// The two bf16 GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Gemm {
    /// `vdpbf16ps` on bf16 pairs ([`super::dpbf16`]); needs AVX-512 BF16.
    DotProduct,
    /// Both operands widened to f32 for the `gemm` crate ([`super::widen`]); any CPU.
    Widened,
}

impl Bf16Gemm {
    pub fn name(self) -> &'static str {
        match self {
            Self::DotProduct => "dot",
            Self::Widened => "widen",
        }
    }
}

/// The environment variable that forces a kernel.
pub const ENV: &str = "BITSMITH_BF16_GEMM";

/// Dot products win when they retire at least this many times the flops of f32 FMA (the
/// dot-product GEMM reaches a smaller share of its instruction's peak than the `gemm`
/// crate of its own).
const MIN_FLOP_RATIO: f64 = 1.5;

/// The kernel of this process: forced by [`ENV`], else measured on first use.
pub fn chosen() -> Bf16Gemm {
    static CHOICE: OnceLock<Bf16Gemm> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let forced = std::env::var(ENV).ok();
        choose(forced.as_deref(), super::dpbf16::available(), measured_flop_ratio)
    })
}

fn choose(forced: Option<&str>, has_dot: bool, ratio: impl FnOnce() -> f64) -> Bf16Gemm {
    match forced.map(str::trim) {
        Some("widen") => return Bf16Gemm::Widened,
        Some("dot") if has_dot => return Bf16Gemm::DotProduct,
        Some("dot") => {
            eprintln!("warning: {ENV}=dot, but this CPU has no AVX-512 BF16; using `widen`");
            return Bf16Gemm::Widened;
        }
        None | Some("") | Some("auto") => {}
        Some(other) => eprintln!(
            "warning: {ENV}={other:?} is not one of dot, widen, auto; choosing by measurement"
        ),
    }
    if has_dot && ratio() >= MIN_FLOP_RATIO {
        Bf16Gemm::DotProduct
    } else {
        Bf16Gemm::Widened
    }
}

/// Flops per second of `vdpbf16ps` over those of f32 `vfmadd`, each the best of three
/// register-only runs of 12 independent accumulators (no memory traffic; ~0.3 ms each).
fn measured_flop_ratio() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if !super::dpbf16::available() {
            return 0.0;
        }
        const ITERS: usize = 20_000;
        let best = |f: &dyn Fn() -> f32| {
            (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(f());
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        };
        // SAFETY: AVX-512F/BF16 checked above
        let dot = best(&|| unsafe { probe::dot(ITERS) });
        let fma = best(&|| unsafe { probe::fma(ITERS) });
        // per iteration: 12 instructions of 64 (dot) or 32 (fma) flops
        (64.0 / dot) / (32.0 / fma)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
mod probe {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    const LANES: usize = 12;

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot(iters: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); LANES];
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(black_box(0x3f80_3f80)));
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(black_box(0x0001_0001)));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma(iters: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); LANES];
        let a = _mm512_set1_ps(black_box(1.0));
        let b = _mm512_set1_ps(black_box(1e-30));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_choices_and_the_measured_threshold() {
        let never = || -> f64 { panic!("a forced choice must not measure") };
        assert_eq!(choose(Some("widen"), true, never), Bf16Gemm::Widened);
        assert_eq!(choose(Some("dot"), true, never), Bf16Gemm::DotProduct);
        assert_eq!(choose(Some("dot"), false, never), Bf16Gemm::Widened);
        assert_eq!(choose(None, true, || 2.0), Bf16Gemm::DotProduct);
        assert_eq!(choose(None, true, || 0.5), Bf16Gemm::Widened);
        assert_eq!(choose(Some("auto"), true, || 2.0), Bf16Gemm::DotProduct);
        assert_eq!(choose(Some("bogus"), true, || 0.5), Bf16Gemm::Widened);
        // no AVX-512 BF16: never the dot product, whatever a measurement would say
        assert_eq!(choose(None, false, || 9.0), Bf16Gemm::Widened);
    }

    #[test]
    fn the_probe_measures_something_finite() {
        let r = measured_flop_ratio();
        assert!(r.is_finite() && r >= 0.0, "{r}");
        eprintln!("vdpbf16ps / vfmadd flop ratio here: {r:.2}");
    }
}
