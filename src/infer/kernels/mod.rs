//! bitsmith's own CPU kernels on [`PackedLayout`]: a register-unpacking GEMV for batches
//! of 1..=8 rows (AVX-512, AVX2+FMA, or portable Rust, picked at runtime) and a tiled
//! dequantize-into-L2 GEMM for larger batches.

pub mod bf16;
pub mod bf16_gemm;
#[cfg(feature = "cuda")]
mod cuda;
pub mod dense;
mod gemm;
pub mod int8;
mod gemv;
pub mod gpu;
pub mod lut;
pub mod lut_mixed;
#[cfg(feature = "metal")]
mod metal;

pub use bf16::Bf16Linear;
pub use lut::LutLinear;
pub use lut_mixed::MixedLutLinear;

use super::layout::PackedLayout;
use crate::model::{host_matmul_tensor, HostMatmul, PackedMatmul, MAX_GEMV_ROWS};
use crate::quant::{MixedQuantizedLinear, QuantizedLinear};
use anyhow::{bail, ensure, Result};
use candle_core::{Device, Tensor};

/// Instruction set a [`BitsmithLinear`] runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let base = is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            if base && is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if base && is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Every instruction set this CPU can run (tests run each).
    pub fn available() -> Vec<Self> {
        let best = Self::detect();
        [Self::Portable, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|&i| i as u8 <= best as u8)
            .collect()
    }
}

/// A quantized linear kept in [`PackedLayout`] and run by bitsmith's CPU kernels.
#[derive(Debug)]
pub struct BitsmithLinear {
    layout: PackedLayout,
    isa: Isa,
    /// The codes re-laid for the int8-activation GEMM (`--kernels int8`), if asked for.
    int8: Option<int8::Int8Weights>,
    what: String,
    /// The layout uploaded to each CUDA device it ran on (`cuda` feature).
    #[cfg(feature = "cuda")]
    cuda: cuda::CudaCache,
    /// The layout uploaded to each Metal device it ran on (`metal` feature).
    #[cfg(feature = "metal")]
    metal: metal::MetalCache,
}

impl BitsmithLinear {
    pub fn from_quantized(q: &QuantizedLinear) -> Result<Self> {
        let act_order = q
            .g_idx
            .iter()
            .enumerate()
            .any(|(j, &g)| g as usize != j / q.grid.group_size.columns(q.in_features));
        let what = format!(
            "bitsmith w{} g{}{}{}",
            q.grid.bits,
            q.grid.group_size.as_i64(),
            if q.grid.sym { " sym" } else { " asym" },
            if act_order { " act-order" } else { "" }
        );
        Ok(Self::new(PackedLayout::from_quantized(q)?, what))
    }

    pub fn from_mixed(q: &MixedQuantizedLinear) -> Result<Self> {
        Ok(Self::new(
            PackedLayout::from_mixed(q)?,
            format!("bitsmith mixed {:.2} bits/code", q.mean_width()),
        ))
    }

    fn new(layout: PackedLayout, what: String) -> Self {
        Self {
            layout,
            isa: Isa::detect(),
            int8: None,
            what,
            #[cfg(feature = "cuda")]
            cuda: Default::default(),
            #[cfg(feature = "metal")]
            metal: Default::default(),
        }
    }

    /// Force an instruction set (tests, benchmarks); an error if this CPU lacks it.
    pub fn with_isa(mut self, isa: Isa) -> Result<Self> {
        ensure!(
            Isa::available().contains(&isa),
            "this CPU cannot run the {isa:?} kernels"
        );
        self.isa = isa;
        Ok(self)
    }

    /// Run batches above [`MAX_GEMV_ROWS`] (prefill, `ppl`) with int8 activations (see
    /// [`int8`]); the GEMV of decode stays exact.
    pub fn with_int8_activations(mut self) -> Self {
        self.int8 = Some(int8::Int8Weights::new(&self.layout));
        self
    }

    pub fn layout(&self) -> &PackedLayout {
        &self.layout
    }

    /// `x` `[rows, in]` row-major f32 → `[rows, out]`.
    pub fn matmul_f32(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * self.layout.out_features];
        self.matmul_into(x, rows, &mut y);
        y
    }

    /// `y` `[rows, out]` = `x` `[rows, in]` · Wᵀ, overwriting `y`.
    pub fn matmul_into(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let l = &self.layout;
        assert_eq!(
            x.len(),
            rows * l.in_features,
            "x is not [{rows}, {}]",
            l.in_features
        );
        assert_eq!(
            y.len(),
            rows * l.out_features,
            "y is not [{rows}, {}]",
            l.out_features
        );
        if rows == 0 || l.out_features == 0 {
            return;
        }
        if l.padded_in == 0 {
            // every column pruned (a BAQ layer given 0 bits): W = 0, so is the product
            y.fill(0.0);
            return;
        }
        let xp = l.gather_rows(x, rows);
        if rows <= MAX_GEMV_ROWS {
            gemv::gemv(l, self.isa, &xp, rows, y);
        } else if let Some(int8) = &self.int8 {
            int8.gemm(&xp, rows, y, int8::Int8Kernel::best_for(self.isa));
        } else {
            gemm::gemm(l, &xp, rows, y);
        }
    }
}

impl HostMatmul for BitsmithLinear {
    fn matmul_host(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.matmul_into(x, rows, y)
    }
}

impl PackedMatmul for BitsmithLinear {
    fn out_features(&self) -> usize {
        self.layout.out_features
    }
    fn in_features(&self) -> usize {
        self.layout.in_features
    }
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (_, k) = x.dims2()?;
        ensure!(
            k == self.layout.in_features,
            "input has {k} features, the layer takes {}",
            self.layout.in_features
        );
        match x.device() {
            Device::Cpu => {}
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => return cuda::matmul(&self.layout, &self.cuda, x),
            #[cfg(feature = "metal")]
            Device::Metal(_) => return metal::matmul(&self.layout, &self.metal, x),
            #[allow(unreachable_patterns)]
            other => bail!(
                "bitsmith's kernels got an input on {other:?}; this build has no launcher for it \
                 (build with the `cuda` or `metal` feature)"
            ),
        }
        host_matmul_tensor(self, x, self.layout.out_features)
    }
    fn resident_bytes(&self) -> usize {
        self.layout.resident_bytes() + self.int8.as_ref().map_or(0, |w| w.resident_bytes())
    }
    fn describe(&self) -> String {
        let int8 = match &self.int8 {
            None => String::new(),
            Some(_) => format!(
                ", int8 activations above batch 8: {:?}",
                int8::Int8Kernel::best_for(self.isa)
            ),
        };
        format!("{} ({:?}{int8})", self.what, self.isa)
    }
    fn host(&self) -> Option<&dyn HostMatmul> {
        Some(self)
    }
}
