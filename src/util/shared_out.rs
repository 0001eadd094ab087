//! Disjoint writes into one output buffer from parallel tasks (the host kernels' and the
//! fused attention's outputs).

/// An output buffer shared by parallel tasks that each write their own disjoint part of
/// it (rows of a GEMV, column blocks of a GEMM).
pub(crate) struct SharedOut<T = f32>(*mut T);
// SAFETY: users write disjoint elements only (each kernel documents its split).
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

// by hand: a derive would require `T: Copy` of the pointee, not of the pointer
impl<T> Clone for SharedOut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedOut<T> {}

impl<T> SharedOut<T> {
    pub(crate) fn new(y: &mut [T]) -> Self {
        Self(y.as_mut_ptr())
    }

    /// A buffer known only by its start (e.g. a `Vec`'s spare capacity); the writers
    /// promise to stay inside it.
    pub(crate) fn from_ptr(p: *mut T) -> Self {
        Self(p)
    }

    /// Element `i`, through a method so closures capture the whole (Send) wrapper.
    pub(crate) fn at(self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}
