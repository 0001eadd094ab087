//! BAQ: Hessian-based bit allocation across input columns (methods.md §3). Built so far:
//! the allocation math (`allocation`), one layer's exact-budget allocation + mixed-width
//! GPTQ pass (`layer`, on [`crate::quant::gptq_mixed`]), the two passes as layer-wise
//! methods run by the calibration runner (`quantizer`: `measure`, `Baq`), and the tensor
//! layout ([`crate::pack::mixed`]). Not yet: model-wide allocation, whole-model
//! mixed-width files (writer/loader), reusing a saved measurement and `--method baq`.

pub mod allocation;
pub mod layer;
pub mod quantizer;
