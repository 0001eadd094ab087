//! BAQ: Hessian-based bit allocation across input columns (methods.md §3). Built so far:
//! the allocation math (`allocation`). Not yet: the second GPTQ pass with per-column
//! level counts, the mixed-width packed layout and the CLI (`--method baq`).

pub mod allocation;
