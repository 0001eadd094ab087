//! BAQ: Hessian-based bit allocation across input columns (methods.md §3): the allocation
//! math (`allocation`), one layer's exact-budget allocation (`layer`), one budget across all
//! layers (`model_wide`), and the two passes as layer-wise methods run by the calibration
//! runner (`quantizer`: `measure`, then `Baq` on [`crate::quant::gptq_mixed`]). The packed
//! layout is [`crate::pack::mixed`]; `codebook` puts the widths on NUPES' power tables
//! ([`crate::pack::mixed_codebook`]).

pub mod allocation;
pub mod codebook;
pub mod ggml_types;
pub mod layer;
pub mod model_wide;
pub mod quantizer;
pub use quantizer::BaqAllocation;
