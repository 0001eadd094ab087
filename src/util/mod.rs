//! Small helpers below every other module: the random number generator, corpus text
//! joining, the shared output pointer of parallel kernels, and a vectorized `e^x`.

#[cfg(feature = "metal")]
mod metal_library;
mod fast_math;
mod progress;
mod rng;
mod shared_out;
mod tensor_bytes;
mod text;

#[cfg(feature = "metal")]
pub(crate) use metal_library::compile_pipelines;
pub(crate) use fast_math::{exp_poly, silu_mul, softmax_in_place};
pub use progress::progress_bar;
pub use rng::SplitMix64;
pub(crate) use shared_out::SharedOut;
pub(crate) use tensor_bytes::{f16_bytes, u32_bytes, OutTensor};
pub use text::{read_text_file, wikitext_joined};
