//! Load a model folder or repo id — float or packed — as a runnable [`CausalLm`]: the
//! format dispatch (reading `quantization_config`, building packed linears) and the host
//! kernels the model runs through its traits, kept out of `src/model/`.

use super::kernels::{dense::DenseKernel, Bf16Linear, LutLinear, MixedLutLinear};
use super::{packed_linear, packed_mixed, Route};
use crate::loader::{ModelConfig, ModelFiles, WeightStore};
use crate::model::{block_linears, CausalLm, LinearSource, LinearSpec, LinearWeight};
use crate::pack::{
    read_codebook_linear, read_mixed_codebook_linear, read_mixed_linear, read_quantized_linear,
    CodebookConfig, GptqConfig, MixedConfig, CODEBOOK_METHOD, MIXED_METHOD,
};
use crate::error::{fail, ErrorKind, ResultExt};
use anyhow::Result;
use candle_core::{DType, Device};
use std::sync::Arc;

/// How the quantized linears of a packed model are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMode {
    /// Dequantized on load to dense weights in the compute dtype: the exact values the
    /// quantizer produced, at float memory cost; quantizers can modify them.
    Dequantized,
    /// Kept packed and run by packed kernels (`infer::kernels`): on the CPU, and on CUDA
    /// (`cuda` feature) or Metal (`metal` feature) devices with bitsmith's GPU kernels
    /// (`Route::Auto`/`Bitsmith`; the GGML route holds its blocks on the CPU, CPU only).
    /// For serving on the CPU in f32, a dense LM head whose values are all bf16 numbers is
    /// also kept in bf16 (`keep_head_in_bf16`).
    Packed(Route),
}

/// Whether this build has packed kernels for `device`.
fn packed_runs_on(device: &Device) -> bool {
    match device {
        Device::Cpu => true,
        Device::Cuda(_) => cfg!(feature = "cuda"),
        Device::Metal(_) => cfg!(feature = "metal"),
    }
}

/// A float model as-is, or a packed model (GPTQ layout, or bitsmith's mixed-width layout)
/// with its linears dequantized on load (the exact values the quantizer produced).
pub fn load_model(files: &ModelFiles, dtype: DType, device: &Device) -> crate::Result<CausalLm> {
    load_model_with(files, dtype, device, WeightMode::Dequantized)
}

/// [`load_model`] with the quantized linears held as `mode` says (a float model loads the
/// same either way).
///
/// Errors: [`ErrorKind::InvalidModel`] for files bitsmith cannot read (config, tensors,
/// a quantization format it does not know), [`ErrorKind::InvalidOption`] for a weight
/// mode this build cannot run on `device`.
pub fn load_model_with(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    mode: WeightMode,
) -> crate::Result<CausalLm> {
    Ok(load(files, dtype, device, mode)?)
}

fn load(files: &ModelFiles, dtype: DType, device: &Device, mode: WeightMode) -> Result<CausalLm> {
    let config = ModelConfig::from_file(&files.config)?;
    let store = WeightStore::open(&files.weights)?;
    let qc = config
        .raw
        .get("quantization_config")
        .filter(|v| !v.is_null());
    let method = qc.map(|q| q.get("quant_method").and_then(|m| m.as_str()).unwrap_or(""));
    let gptq = match method {
        None | Some(MIXED_METHOD) | Some(CODEBOOK_METHOD) => None,
        Some("gptq") => GptqConfig::from_model_config(&config.raw).kind(ErrorKind::InvalidModel)?,
        Some(other) => fail!(InvalidModel, "quantization_config.quant_method `{other}` is not supported (bitsmith reads `gptq`, `{MIXED_METHOD}` and `{CODEBOOK_METHOD}`)"),
    };
    let codebook = match method {
        Some(CODEBOOK_METHOD) => {
            Some(CodebookConfig::from_model_config(&config.raw).kind(ErrorKind::InvalidModel)?)
        }
        _ => None,
    };
    if method.is_some() && matches!(mode, WeightMode::Packed(_)) && !packed_runs_on(device) {
        fail!(
            InvalidOption,
            "packed weights run on the CPU{}{} in this build; load dequantized for {device:?}",
            if cfg!(feature = "cuda") {
                " and CUDA"
            } else {
                ""
            },
            if cfg!(feature = "metal") {
                " and Metal"
            } else {
                ""
            },
        );
    }
    if let WeightMode::Packed(route @ (Route::Ggml | Route::Int8)) = mode {
        if method.is_some() && !device.is_cpu() {
            fail!(
                InvalidOption,
                "the {} route runs on the CPU only; use --kernels bitsmith (or auto) on {device:?}",
                if route == Route::Ggml { "GGML" } else { "int8" }
            );
        }
        if route == Route::Int8
            && method.is_some()
            && crate::infer::kernels::int8::Int8Kernel::available().len() == 1
        {
            eprintln!(
                "warning: this CPU has no VNNI (AVX-512 or AVX): --kernels int8 runs its \
                 portable integer kernel, correct but slower than the exact default \
                 (--kernels auto)"
            );
        }
    }
    let mixed = match method {
        Some(MIXED_METHOD) => {
            Some(MixedConfig::from_model_config(&config.raw).kind(ErrorKind::InvalidModel)?)
        }
        _ => None,
    };
    let mixed_sym = mixed.as_ref().is_some_and(|m| m.sym);
    let mixed_codebook = mixed.as_ref().is_some_and(|m| m.is_codebook());
    let mixed_group = match &mixed {
        Some(m) => m.range_groups().kind(ErrorKind::InvalidModel)?,
        None => None,
    };
    let loader = |spec: &LinearSpec| -> Result<LinearSource> {
        if let Some(q) = &gptq {
            if store.contains(&format!("{}.qweight", spec.name)) {
                let q = read_quantized_linear(&store, spec, q).kind(ErrorKind::InvalidModel)?;
                return Ok(match mode {
                    WeightMode::Dequantized => LinearSource::Dense(q.dequantize()),
                    WeightMode::Packed(route) => LinearSource::Packed(packed_linear(&q, route)?),
                });
            }
        }
        if let Some(cfg) = &codebook {
            if store.contains(&format!("{}.codebook", spec.name)) {
                let q = read_codebook_linear(&store, spec, cfg).kind(ErrorKind::InvalidModel)?;
                return Ok(match mode {
                    // the lookup-table kernels run on the CPU, CUDA and Metal
                    WeightMode::Packed(route)
                        if device.is_cpu() || device.is_cuda() || device.is_metal() =>
                    {
                        if route == Route::Ggml {
                            fail!(
                                InvalidOption,
                                "codebook layers have no GGML block type; use the bitsmith or auto route"
                            );
                        }
                        if route == Route::Int8 {
                            fail!(
                                InvalidOption,
                                "codebook layers have no int8 kernel (their levels are not \
                                 integers); use the bitsmith or auto route"
                            );
                        }
                        LinearSource::Packed(Arc::new(LutLinear::from_codebook(&q)?))
                    }
                    _ => LinearSource::Dense(q.dequantize()),
                });
            }
        }
        if mixed_codebook && store.contains(&format!("{}.col_perm", spec.name)) {
            let q = read_mixed_codebook_linear(&store, spec, mixed_group)
                .kind(ErrorKind::InvalidModel)?;
            return Ok(match mode {
                WeightMode::Packed(route)
                    if device.is_cpu() || device.is_cuda() || device.is_metal() =>
                {
                    if route != Route::Auto && route != Route::Bitsmith {
                        fail!(
                            InvalidOption,
                            "BAQ's power codebooks run on the lookup-table kernels only (no \
                             GGML block type, no int8 kernel); use the bitsmith or auto route"
                        );
                    }
                    LinearSource::Packed(Arc::new(MixedLutLinear::from_mixed_codebook(&q)?))
                }
                _ => LinearSource::Dense(q.dequantize()),
            });
        }
        if method == Some(MIXED_METHOD) && store.contains(&format!("{}.col_perm", spec.name)) {
            let q = read_mixed_linear(&store, spec, mixed_sym, mixed_group)
                .kind(ErrorKind::InvalidModel)?;
            return Ok(match mode {
                WeightMode::Dequantized => LinearSource::Dense(q.dequantize()),
                WeightMode::Packed(route) => LinearSource::Packed(packed_mixed(&q, route)?),
            });
        }
        Ok(LinearSource::Dense(store.f32_vec(
            &format!("{}.weight", spec.name),
            &[spec.out_features, spec.in_features],
        )?))
    };
    let mut model = CausalLm::load(&config, &store, &loader, dtype, device)?;
    attach_host_kernels(&mut model);
    if matches!(mode, WeightMode::Packed(_)) {
        // serving: an exactly-bf16 LM head stays bf16 (half the bytes per decoded token)
        keep_head_in_bf16(&mut model)?;
        run_bf16_linears_on_bf16_gemm(&mut model)?;
    }
    Ok(model)
}

/// Give `model` the dense GEMV its fused CPU decode step runs float linears with (a model
/// without it decodes through candle ops).
pub fn attach_host_kernels(model: &mut CausalLm) {
    model.set_dense_gemv(Arc::new(DenseKernel));
}

/// For serving on the CPU in f32: keep a dense LM head in bf16 when every weight is
/// exactly a bf16 number (checkpoints store it so), halving the bytes each decoded token
/// reads from it at no change in the results ([`Bf16Linear`]). A tied embedding is then
/// looked up from the same bf16 copy. Returns whether the head was converted.
pub fn keep_head_in_bf16(model: &mut CausalLm) -> Result<bool> {
    if !model.device().is_cpu() || model.dtype() != DType::F32 {
        return Ok(false);
    }
    let LinearWeight::Dense(w) = model.lm_head.weights() else {
        return Ok(false);
    };
    let Some(head) = Bf16Linear::exact_from(w)? else {
        return Ok(false);
    };
    let embedding = model.tied_head().then(|| head.weight().clone());
    model.replace_head(Arc::new(head), embedding)?;
    Ok(true)
}

/// For a model computed in bf16 on the CPU: every dense bf16 linear (the
/// LM head too) runs through [`Bf16Linear`], so prompts and perplexity windows multiply
/// bf16 by bf16 with f32 accumulation ([`super::kernels::bf16_gemm`]) instead of candle's bf16
/// matmul; decode steps keep the same GEMV. The weights stay where they are (no copy).
/// Returns how many linears moved.
pub fn run_bf16_linears_on_bf16_gemm(model: &mut CausalLm) -> Result<usize> {
    if !model.device().is_cpu() || model.dtype() != DType::BF16 {
        return Ok(0);
    }
    let names: Vec<String> = (0..model.config.num_hidden_layers)
        .flat_map(|layer| block_linears(&model.config, layer))
        .map(|s| s.name)
        .chain(["lm_head".to_string()])
        .collect();
    let mut moved = 0;
    for name in names {
        let Some(linear) = model.linear_mut(&name) else {
            continue;
        };
        let LinearWeight::Dense(w) = linear.weights() else {
            continue;
        };
        if let Some(kernel) = Bf16Linear::from_bf16(w)? {
            linear.set_kernel(Arc::new(kernel))?;
            moved += 1;
        }
    }
    Ok(moved)
}
