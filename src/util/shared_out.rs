//! Disjoint writes into one output buffer from parallel tasks (the host kernels' and the
//! fused attention's outputs).

/// An output buffer shared by parallel tasks that each write their own disjoint part of
/// it (rows of a GEMV, column blocks of a GEMM).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32);
// SAFETY: users write disjoint elements only (each kernel documents its split).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(y: &mut [f32]) -> Self {
        Self(y.as_mut_ptr())
    }

    /// Element `i`, through a method so closures capture the whole (Send) wrapper.
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
