//! Calibration: text → token segments (`data`), Hessian proxies (`hessian`), the
//! layer-by-layer runner that streams blocks through them (`runner`). The per-block
//! checkpoints of a quantization run live with the run, in `quant::checkpoint`.

pub mod data;
pub mod hessian;
pub mod runner;

pub use crate::model::spec::LINEAR_GROUPS;
pub use crate::util::SplitMix64;
pub use data::{sample_segments, CalibrationSet, CalibrationSource};
pub use hessian::HessianAccumulator;
pub use runner::{embed_segments, run_block, GroupInput, RunnerOptions};
