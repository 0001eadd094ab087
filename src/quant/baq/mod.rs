//! BAQ: Hessian-based bit allocation across input columns (methods.md §3). Built so far:
//! the allocation math (`allocation`), one layer's exact-budget allocation + mixed-width
//! GPTQ pass (`layer`, on [`crate::quant::gptq_mixed`]); the tensor layout is
//! [`crate::pack::mixed`]. Not yet: the model-wide two-pass pipeline, model-wide
//! allocation, whole-model mixed-width files and `--method baq`.

pub mod allocation;
pub mod layer;
