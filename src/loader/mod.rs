//! Resolve a model (local folder or Hugging Face repo id), read its `config.json`,
//! open its safetensors weights memory-mapped and load its tokenizer.

pub mod config;
pub mod resolve;
pub mod rope_config;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig, RopeScaling, ONLINE_HADAMARD_KEY};
pub use resolve::{resolve_model, ModelFiles};
pub use tokenizer::load_tokenizer;
pub use weights::{Rewritten, SourceDType, TensorInfo, TensorRewrite, WeightStore};
