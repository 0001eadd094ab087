//! Large-batch bf16 × bf16 GEMM with f32 accumulation (as transformers' bf16 matmuls
//! accumulate), each output rounded once to bf16: the prefill and perplexity path of a
//! model computed in bf16. Two kernels, one per kind of CPU ([`select`]).

mod dpbf16;
pub mod select;
#[cfg(test)]
mod test_support;
mod widen;

pub use select::{chosen, Bf16Gemm};

/// `y` `[m, n]` (bf16 bits, overwritten) = `x` `[m, k]` · `Wᵀ` for `W` `[n, k]`, all bf16
/// bit patterns, row-major, accumulated in f32 and rounded to nearest even, on this
/// process's kernel ([`chosen`]). Panics (a programming error, not input) when the slices
/// do not have those lengths.
pub fn gemm(w: &[u16], n: usize, k: usize, x: &[u16], m: usize, y: &mut [u16]) {
    match chosen() {
        // the dot product reads pairs: an odd reduction length takes the widened path
        Bf16Gemm::DotProduct if k.is_multiple_of(2) => dpbf16::gemm(w, n, k, x, m, y),
        _ => widen::gemm(w, n, k, x, m, y),
    }
}
