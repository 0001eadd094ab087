//! A bitsmith GPTQ-layout model as a compressed-tensors `pack-quantized` folder, the format
//! vLLM loads natively (`CompressedTensorsWNA16`). Every quantized linear converts code for
//! code ([`super::layer`]); float tensors, the tokenizer and the side files are copied as
//! they are; `config.json` gets a `quantization_config` with one config group for the
//! quantized linears and every float linear in `ignore`.

use super::layer::{PackQuantized, Scheme, Strategy};
use crate::loader::{ModelConfig, ModelFiles, WeightStore};
use crate::model::spec::lm_head;
use crate::model::{block_linears, LinearSpec};
use crate::pack::compat::refuse_online_ops;
use crate::pack::model::{
    copy_side_files, f16_bytes, u32_bytes, write_f32_safetensors, write_json, write_shards,
    OutTensor,
};
use crate::pack::{read_quantized_linear, GptqConfig, OutputFolder, MIXED_METHOD};
use anyhow::{bail, Context, Result};
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The leaves a GPTQ-layout linear is stored under, none of which is copied.
const GPTQ_LEAVES: &[&str] = &["qweight", "qzeros", "scales", "g_idx"];

/// What [`export_compressed_tensors`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompressedTensorsReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub quantized_linears: usize,
    /// Linears kept in float (listed in `ignore`).
    pub ignored: Vec<String>,
    pub bits: u8,
    pub symmetric: bool,
    pub strategy: &'static str,
    pub group_size: Option<usize>,
}

/// The scheme a GPTQ-layout config converts to. Bits, symmetry and group size carry over;
/// act-order is checked per layer (a layer whose groups are contiguous converts).
fn scheme_of(q: &GptqConfig) -> Scheme {
    Scheme {
        bits: q.bits,
        symmetric: q.sym,
        strategy: Strategy::of(q.group_size),
    }
}

/// The `quantization_config` compressed-tensors (and vLLM) read for `scheme`.
pub fn quantization_config(scheme: Scheme, ignore: &[String]) -> Value {
    json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": scheme.bits,
                    "type": "int",
                    "symmetric": scheme.symmetric,
                    "strategy": scheme.strategy.name(),
                    "group_size": scheme.strategy.group_size(),
                    "dynamic": false,
                    "actorder": null,
                },
                "input_activations": null,
                "output_activations": null,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
    })
}

/// Export the bitsmith GPTQ-layout model at `files` to the folder `out` (written under a
/// temporary name and renamed when complete). A float model, bitsmith's mixed layout or
/// a layer the format cannot hold exactly (see [`PackQuantized::from_quantized`]) is an
/// error that names the reason.
///
/// With `reference_weights`, also writes every quantized linear's weights as bitsmith
/// dequantizes them (F32 safetensors, `NAME.weight`): compressed-tensors' decompression of
/// the folder must give these (`scripts/compressed_tensors_check.py`).
pub fn export_compressed_tensors(
    files: &ModelFiles,
    out: &Path,
    overwrite: bool,
    max_shard_bytes: u64,
    reference_weights: Option<&Path>,
) -> Result<CompressedTensorsReport> {
    let c = ModelConfig::from_file(&files.config)?;
    refuse_online_ops(
        &c,
        "compressed-tensors",
        "vLLM (or any compressed-tensors loader)",
    )?;
    let method = c
        .raw
        .get("quantization_config")
        .filter(|v| !v.is_null())
        .map(|q| q["quant_method"].as_str().unwrap_or("").to_string());
    let gptq = match method.as_deref() {
        None => bail!(
            "{} is a float model; compressed-tensors export converts a bitsmith quantized \
             model (run `bitsmith quantize` first)",
            files.source
        ),
        Some(MIXED_METHOD) => bail!(
            "bitsmith's mixed-width layout has no compressed-tensors scheme (one width per \
             layer group); export a uniform model"
        ),
        Some(_) => GptqConfig::from_model_config(&c.raw)?
            .context("quantization_config disappeared while reading it")?,
    };
    let scheme = scheme_of(&gptq);
    let store = WeightStore::open(&files.weights)?;

    let mut linears: Vec<LinearSpec> = (0..c.num_hidden_layers)
        .flat_map(|layer| block_linears(&c, layer))
        .collect();
    linears.push(lm_head(&c));
    let mut tensors: BTreeMap<String, OutTensor> = BTreeMap::new();
    let mut quantized_stems = vec![];
    let mut ignored = vec![];
    let mut reference = vec![];
    for spec in &linears {
        if !store.contains(&format!("{}.qweight", spec.name)) {
            ignored.push(spec.name.clone());
            continue;
        }
        let q = read_quantized_linear(&store, spec, &gptq)?;
        let p = PackQuantized::from_quantized(&spec.name, &q, scheme)?;
        if reference_weights.is_some() {
            let bytes = q
                .dequantize()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            reference.push((
                format!("{}.weight", spec.name),
                vec![q.out_features, q.in_features],
                bytes,
            ));
        }
        let mut put = |leaf: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>| {
            tensors.insert(
                format!("{}.{leaf}", spec.name),
                OutTensor {
                    dtype,
                    shape,
                    data: data.into(),
                },
            );
        };
        put(
            "weight_packed",
            Dtype::I32,
            p.packed_shape(scheme.bits).to_vec(),
            u32_bytes(&p.weight_packed),
        );
        put(
            "weight_scale",
            Dtype::F16,
            vec![p.out_features, p.n_groups()],
            f16_bytes(&p.weight_scale),
        );
        if let Some(z) = &p.weight_zero_point {
            put(
                "weight_zero_point",
                Dtype::I32,
                p.zero_point_shape(scheme.bits).to_vec(),
                u32_bytes(z),
            );
        }
        // `torch.tensor(weight.shape)`: int64
        let shape: Vec<u8> = [p.out_features as i64, p.in_features as i64]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        put("weight_shape", Dtype::I64, vec![2], shape);
        quantized_stems.push(spec.name.as_str());
    }
    if quantized_stems.is_empty() {
        bail!(
            "{} declares quantization but holds no quantized linear (`*.qweight`)",
            files.source
        );
    }
    // a tied head has no tensor of its own but is still a module vLLM builds
    if c.tie_word_embeddings && !ignored.iter().any(|n| n == "lm_head") {
        ignored.push("lm_head".into());
    }
    for name in store.names() {
        let (stem, leaf) = name.rsplit_once('.').unwrap_or((name, ""));
        if quantized_stems.contains(&stem) && GPTQ_LEAVES.contains(&leaf) {
            continue;
        }
        let (dtype, shape, data) = store.read_raw(name)?;
        tensors.insert(
            name.to_string(),
            OutTensor {
                dtype: dtype.st(),
                shape,
                data,
            },
        );
    }

    let folder = OutputFolder::create(out, overwrite)?;
    let written = write_shards(&folder, &tensors, max_shard_bytes)?;
    let mut cfg = c.raw.clone();
    cfg["quantization_config"] = quantization_config(scheme, &ignored);
    write_json(&folder, "config.json", &cfg)?;
    copy_side_files(&folder, files)?;
    let bytes = written.iter().map(|(_, b)| b).sum::<u64>()
        + std::fs::metadata(folder.path().join("config.json"))?.len();
    if let Some(path) = reference_weights {
        write_f32_safetensors(path, &reference)?;
    }
    let path = folder.commit()?;
    Ok(CompressedTensorsReport {
        path,
        bytes,
        quantized_linears: quantized_stems.len(),
        ignored,
        bits: scheme.bits,
        symmetric: scheme.symmetric,
        strategy: scheme.strategy.name(),
        group_size: scheme.strategy.group_size(),
    })
}
