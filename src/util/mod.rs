//! Small helpers below every other module: the random number generator, corpus text
//! joining, and the shared output pointer of parallel kernels.

#[cfg(feature = "metal")]
mod metal_library;
mod progress;
mod rng;
mod shared_out;
mod tensor_bytes;
mod text;

#[cfg(feature = "metal")]
pub(crate) use metal_library::compile_pipelines;
pub use progress::progress_bar;
pub use rng::SplitMix64;
pub(crate) use shared_out::SharedOut;
pub(crate) use tensor_bytes::{f16_bytes, u32_bytes, OutTensor};
pub use text::{read_text_file, wikitext_joined};
