//! BAQ: Hessian-based bit allocation across input columns (methods.md §3). Built so far:
//! the allocation math (`allocation`) and the mixed-width GPTQ pass it feeds
//! ([`crate::quant::gptq_mixed`]). Not yet: the two-pass pipeline, the mixed-width packed
//! layout and the CLI (`--method baq`).

pub mod allocation;
