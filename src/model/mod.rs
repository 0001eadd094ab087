//! Llama-family decoders (Llama 2/3, Mistral, Qwen2, SmolLM) on candle, built from parts
//! that run one at a time: embedding, each decoder block, final norm + head.

pub mod attention;
pub mod block;
pub mod causal_lm;
pub mod decode;
mod fused_ops;
pub mod hadamard;
pub mod kv_cache;
pub mod layers;
pub mod online;
#[cfg(feature = "cuda")]
mod online_cuda;
#[cfg(any(feature = "cuda", feature = "metal"))]
mod online_gpu;
#[cfg(feature = "metal")]
mod online_metal;
pub mod rope;
pub mod spec;
pub mod split_gemm;

pub use block::{
    BlockContext, BlockObserver, BlockWeights, DecoderBlock, Flow, Mode, NoObserver, Outcome,
    Paused,
};
pub use causal_lm::{CausalLm, LinearLoader, LinearSource, LogitsFor};
pub use hadamard::Hadamard;
pub use kv_cache::{HostKv, KvCache, LayerKvCache};
pub use layers::{
    host_matmul_tensor, DenseGemv, HostMatmul, Linear, LinearWeight, PackedMatmul, RmsNorm,
    MAX_GEMV_ROWS,
};
pub use online::OnlineHadamard;
pub use spec::{block_linears, LinearSpec};
