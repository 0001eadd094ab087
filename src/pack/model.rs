//! Whole-model packing: write a quantized model as a GPTQ-layout folder, and read a
//! quantized linear back.

use super::gptq::{GptqConfig, GptqTensors, ZeroConvention};
use super::mixed::{MixedRun, MixedTensors};
use super::output::OutputFolder;
use super::validate::asymmetric_zero;
use crate::loader::{ModelConfig, ModelFiles, SourceDType, WeightStore};
use crate::model::LinearSpec;
use crate::quant::{
    CodebookQuantizedLinear, LayerCodes, MixedCodebookQuantizedLinear, MixedQuantizedLinear,
    QuantizedLinear,
};
pub(crate) use crate::util::{f16_bytes, u32_bytes, OutTensor};
use crate::error::{tagged, ErrorKind, ResultExt};
use anyhow::{bail, ensure, Context, Result};
use half::f16;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What was written, for the CLI's summary and the README's tables.
#[derive(Debug, Clone)]
pub struct PackReport {
    pub files: Vec<(String, u64)>,
    pub total_bytes: u64,
    /// Weights stored quantized and the bytes their tensors take.
    pub quantized_weights: usize,
    pub quantized_bytes: u64,
}

impl PackReport {
    /// Bits per quantized weight including scales, zeros and `g_idx`.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.quantized_bytes as f64 / self.quantized_weights.max(1) as f64
    }
}

/// Write `layers` (quantized) and every other tensor of `store` (unchanged) into `out` in
/// the GPTQ layout, with `config.json` (+ `quantization_config`), `quantize_config.json`,
/// the tokenizer and side files, and `bitsmith.json` provenance.
#[allow(clippy::too_many_arguments)]
pub fn write_gptq_model(
    out: &OutputFolder,
    files: &ModelFiles,
    config: &ModelConfig,
    store: &WeightStore,
    layers: &[(LinearSpec, QuantizedLinear)],
    qcfg: &GptqConfig,
    provenance: Value,
    max_shard_bytes: u64,
) -> Result<PackReport> {
    let refs: Vec<(&LinearSpec, CodesRef)> = layers
        .iter()
        .map(|(s, q)| (s, CodesRef::Uniform(q)))
        .collect();
    let report = write_quantized_model(
        out,
        files,
        config,
        store,
        &refs,
        qcfg.zeros,
        &qcfg.to_json(),
        provenance,
        max_shard_bytes,
    )?;
    Ok(report)
}

/// A quantized layer to write, in either representation.
#[derive(Clone, Copy)]
pub enum CodesRef<'a> {
    /// GPTQ tensors (`qweight`, `qzeros`, `scales`, `g_idx`).
    Uniform(&'a QuantizedLinear),
    /// The mixed-width layout of [`super::mixed`].
    Mixed(&'a MixedQuantizedLinear),
    /// The codebook layout of [`super::codebook`].
    Codebook(&'a CodebookQuantizedLinear),
    /// The mixed-codebook layout of [`super::mixed_codebook`].
    MixedCodebook(&'a MixedCodebookQuantizedLinear),
}

impl<'a> TryFrom<&'a LayerCodes> for CodesRef<'a> {
    type Error = anyhow::Error;

    /// GGML blocks have no bitsmith folder layout: they are written as GGUF.
    fn try_from(c: &'a LayerCodes) -> Result<Self> {
        Ok(match c {
            LayerCodes::Uniform(q) => Self::Uniform(q),
            LayerCodes::Mixed(q) => Self::Mixed(q),
            LayerCodes::Codebook(q) => Self::Codebook(q),
            LayerCodes::MixedCodebook(q) => Self::MixedCodebook(q),
            LayerCodes::Ggml(q) => {
                bail!(
                    "a layer in GGML {} blocks is written as GGUF (--format gguf)",
                    q.ty
                )
            }
        })
    }
}

/// The layers a folder packer writes, borrowed; an error for GGML blocks (GGUF only).
pub fn codes_refs(layers: &[(LinearSpec, LayerCodes)]) -> Result<Vec<(&LinearSpec, CodesRef<'_>)>> {
    layers
        .iter()
        .map(|(s, c)| Ok((s, CodesRef::try_from(c)?)))
        .collect()
}

/// Write quantized `layers` plus every other tensor of `store` (unchanged), `config.json`
/// with `quant_config` as its `quantization_config`, the tokenizer and side files, and
/// `bitsmith.json`.
#[allow(clippy::too_many_arguments)]
pub fn write_quantized_model(
    out: &OutputFolder,
    files: &ModelFiles,
    config: &ModelConfig,
    store: &WeightStore,
    layers: &[(&LinearSpec, CodesRef)],
    zeros: ZeroConvention,
    quant_config: &Value,
    provenance: Value,
    max_shard_bytes: u64,
) -> Result<PackReport> {
    let quantized: HashMap<&str, ()> = layers.iter().map(|(s, _)| (s.name.as_str(), ())).collect();
    let mut tensors: BTreeMap<String, OutTensor> = BTreeMap::new();
    let mut quantized_bytes = 0u64;
    let mut quantized_weights = 0usize;

    let mut names: Vec<&str> = store.names().collect();
    names.sort_unstable();
    for name in names {
        let (stem, leaf) = name.rsplit_once('.').unwrap_or((name, ""));
        if quantized.contains_key(stem) && leaf == "weight" {
            continue;
        }
        // biases of quantized modules keep their source dtype: lossless, and GPTQ
        // loaders cast them on load (a transform's rewritten tensors come as computed)
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
    for (spec, codes) in layers {
        let mut put = |leaf: String, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>| {
            quantized_bytes += data.len() as u64;
            tensors.insert(
                format!("{}.{leaf}", spec.name),
                OutTensor {
                    dtype,
                    shape,
                    data: data.into(),
                },
            );
        };
        match codes {
            CodesRef::Uniform(q) => {
                let t = GptqTensors::from_quantized(q, zeros)
                    .with_context(|| format!("packing `{}`", spec.name))?;
                let (n, k, b) = (q.out_features, q.in_features, q.grid.bits);
                let g_idx: Vec<u32> = t.g_idx.iter().map(|&g| g as u32).collect();
                put(
                    "qweight".into(),
                    Dtype::I32,
                    GptqTensors::qweight_shape(k, n, b).to_vec(),
                    u32_bytes(&t.qweight),
                );
                put(
                    "qzeros".into(),
                    Dtype::I32,
                    GptqTensors::qzeros_shape(n, q.n_groups(), b).to_vec(),
                    u32_bytes(&t.qzeros),
                );
                put(
                    "scales".into(),
                    Dtype::F16,
                    vec![q.n_groups(), n],
                    f16_bytes(&t.scales),
                );
                put("g_idx".into(), Dtype::I32, vec![k], u32_bytes(&g_idx));
                quantized_weights += n * k;
            }
            CodesRef::Mixed(q) => {
                let t = MixedTensors::from_quantized(q);
                let (n, k) = (q.out_features, q.in_features);
                let perm: Vec<u32> = t.col_perm.iter().map(|&j| j as u32).collect();
                put("col_perm".into(), Dtype::I32, vec![k], u32_bytes(&perm));
                put(
                    "col_widths".into(),
                    Dtype::U8,
                    vec![k],
                    t.col_widths.clone(),
                );
                for run in &t.runs {
                    let b = run.bits;
                    put(
                        format!("w{b}.qweight"),
                        Dtype::I32,
                        vec![run.qweight.len() / n, n],
                        u32_bytes(&run.qweight),
                    );
                    let groups = run.scales.len() / n;
                    put(
                        format!("w{b}.scales"),
                        Dtype::F16,
                        vec![groups, n],
                        f16_bytes(&run.scales),
                    );
                    put(
                        format!("w{b}.qzeros"),
                        Dtype::I32,
                        vec![groups, run.qzeros.len() / groups],
                        u32_bytes(&run.qzeros),
                    );
                }
                quantized_weights += n * k;
            }
            CodesRef::MixedCodebook(q) => {
                let t = super::mixed_codebook::MixedCodebookTensors::from_quantized(q)
                    .with_context(|| format!("packing `{}`", spec.name))?;
                let (n, k) = (q.out_features, q.in_features);
                let perm: Vec<u32> = t.col_perm.iter().map(|&j| j as u32).collect();
                put("col_perm".into(), Dtype::I32, vec![k], u32_bytes(&perm));
                put("col_widths".into(), Dtype::U8, vec![k], t.col_widths);
                for run in &t.runs {
                    let b = run.bits;
                    put(
                        format!("w{b}.qweight"),
                        Dtype::I32,
                        vec![run.qweight.len() / n, n],
                        u32_bytes(&run.qweight),
                    );
                    put(
                        format!("w{b}.scales"),
                        Dtype::F16,
                        vec![run.scales.len() / n, n],
                        f16_bytes(&run.scales),
                    );
                    let table: Vec<u8> = run.table.iter().flat_map(|x| x.to_le_bytes()).collect();
                    put(format!("w{b}.codebook"), Dtype::F32, vec![run.table.len()], table);
                    put(
                        format!("w{b}.exponent"),
                        Dtype::F32,
                        vec![1],
                        run.exponent.to_le_bytes().to_vec(),
                    );
                }
                quantized_weights += n * k;
            }
            CodesRef::Codebook(q) => {
                let (n, k) = (q.out_features, q.in_features);
                let words = super::bits::packed_words(k, q.bits);
                put(
                    "qweight".into(),
                    Dtype::I32,
                    vec![n, words],
                    u32_bytes(&super::codebook::pack_codes(q)),
                );
                put(
                    "scales".into(),
                    Dtype::F16,
                    vec![q.n_groups(), n],
                    f16_bytes(&q.scales),
                );
                put("g_idx".into(), Dtype::I32, vec![k], u32_bytes(&q.g_idx));
                let table: Vec<u8> = q.table.iter().flat_map(|x| x.to_le_bytes()).collect();
                put("codebook".into(), Dtype::F32, vec![q.table.len()], table);
                put(
                    "exponent".into(),
                    Dtype::F32,
                    vec![1],
                    q.exponent.to_le_bytes().to_vec(),
                );
                quantized_weights += n * k;
            }
        }
    }

    let mut written = write_shards(out, &tensors, max_shard_bytes)?;

    let mut cfg = config.raw.clone();
    cfg["quantization_config"] = quant_config.clone();
    write_json(out, "config.json", &cfg)?;
    write_json(out, "bitsmith.json", &provenance)?;
    let mut own = vec!["config.json", "bitsmith.json"];
    if quant_config.get("quant_method").and_then(|m| m.as_str()) == Some("gptq") {
        // older GPTQ readers look for the block here
        write_json(out, "quantize_config.json", quant_config)?;
        own.push("quantize_config.json");
    }
    copy_side_files(out, files)?;
    for name in own {
        written.push((
            name.to_string(),
            std::fs::metadata(out.path().join(name))?.len(),
        ));
    }
    let total_bytes = written.iter().map(|(_, b)| b).sum();
    Ok(PackReport {
        files: written,
        total_bytes,
        quantized_weights,
        quantized_bytes,
    })
}

/// Copy the tokenizer and the side files (generation config, chat template, …) as they are.
pub(crate) fn copy_side_files(out: &OutputFolder, files: &ModelFiles) -> Result<()> {
    for (name, path) in files
        .tokenizer
        .iter()
        .map(|p| ("tokenizer.json".to_string(), p))
        .chain(files.extras.iter().map(|(n, p)| (n.clone(), p)))
    {
        std::fs::copy(path, out.path().join(&name))
            .with_context(|| format!("copying {}", path.display()))?;
    }
    Ok(())
}

pub(crate) fn write_json(out: &OutputFolder, name: &str, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)? + "\n";
    std::fs::write(out.path().join(name), text)
        .with_context(|| format!("writing {name}"))
        .kind(ErrorKind::Output)
}

/// Split into shards of at most `max_bytes` (a larger single tensor gets its own shard).
pub(crate) fn write_shards(
    out: &OutputFolder,
    tensors: &BTreeMap<String, OutTensor>,
    max_bytes: u64,
) -> Result<Vec<(String, u64)>> {
    let mut shards: Vec<Vec<(&String, &OutTensor)>> = vec![vec![]];
    let mut size = 0u64;
    for (name, t) in tensors {
        let len = t.data.len() as u64;
        if size > 0 && size + len > max_bytes {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("one shard").push((name, t));
        size += len;
    }
    let count = shards.len();
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let mut written = vec![];
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let path = out.path().join(&file);
        safetensors::serialize_to_file(
            shard.iter().map(|(n, t)| (n.as_str(), *t)),
            meta.clone(),
            &path,
        )
        .map_err(|e| tagged(ErrorKind::Output, format!("writing {}: {e}", path.display())))?;
        for (n, _) in shard {
            weight_map.insert(n.to_string(), json!(file));
        }
        written.push((file, std::fs::metadata(&path)?.len()));
    }
    if count > 1 {
        let total: usize = tensors.values().map(|t| t.data.len()).sum();
        write_json(
            out,
            "model.safetensors.index.json",
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
        written.push((
            "model.safetensors.index.json".into(),
            std::fs::metadata(out.path().join("model.safetensors.index.json"))?.len(),
        ));
    }
    Ok(written)
}

/// Check the headers of `spec`'s packed tensors against the model config and
/// `quantization_config` without reading their data (`inspect` runs it on every layer):
/// `qweight`'s shape against `bits`, the rows of `scales` against `group_size`. A
/// contradiction is an error naming the tensor, the file and both numbers.
pub fn check_gptq_shapes(store: &WeightStore, spec: &LinearSpec, qcfg: &GptqConfig) -> Result<()> {
    let (n, k) = (spec.out_features, spec.in_features);
    let grid = qcfg.grid()?;
    let b = grid.bits;
    let name = |leaf: &str| format!("{}.{leaf}", spec.name);
    let file = || {
        store
            .file_of(&name("qweight"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let qweight_info = store.info(&name("qweight"))?;
    let want = GptqTensors::qweight_shape(k, n, b);
    if qweight_info.shape != want {
        let fits: Vec<String> = crate::quant::SUPPORTED_BITS
            .iter()
            .filter(|&&w| qweight_info.shape == GptqTensors::qweight_shape(k, n, w))
            .map(|w| format!("{w}-bit"))
            .collect();
        bail!(
            "tensor `{}` in {} has shape {:?}, expected {want:?} for quantization_config.bits {b}{}",
            name("qweight"),
            file(),
            qweight_info.shape,
            if fits.is_empty() {
                String::new()
            } else {
                format!(" (the shape fits {} codes: the config and the tensors disagree)", fits.join(" or "))
            }
        );
    }
    let scales_info = store.info(&name("scales"))?;
    ensure!(
        scales_info.shape.len() == 2 && scales_info.shape[1] == n,
        "tensor `{}` in {} has shape {:?}, expected [n_groups, {n}]",
        name("scales"),
        file(),
        scales_info.shape
    );
    ensure!(
        scales_info.dtype == SourceDType::F16,
        "tensor `{}` in {} must be F16, found {}",
        name("scales"),
        file(),
        scales_info.dtype.name()
    );
    let n_groups = scales_info.shape[0];
    let want_groups = grid.group_size.n_groups(k);
    ensure!(
        n_groups == want_groups,
        "tensor `{}` in {} has {n_groups} rows of scales, but quantization_config.group_size {} \
         means {want_groups} groups over {k} input columns: the config and the tensors disagree",
        name("scales"),
        file(),
        grid.group_size.as_i64()
    );
    Ok(())
}

/// Read the packed tensors of `spec` back into codes/scales/zeros, validated: shapes
/// ([`check_gptq_shapes`]), every scale finite and non-zero, codes and zeros within their
/// width ([`super::validate`]). A config that says `sym` over zero points that are not
/// symmetric is read with the stored zero points (they define the weights), with a
/// warning.
pub fn read_quantized_linear(
    store: &WeightStore,
    spec: &LinearSpec,
    qcfg: &GptqConfig,
) -> Result<QuantizedLinear> {
    check_gptq_shapes(store, spec, qcfg)?;
    let (n, k) = (spec.out_features, spec.in_features);
    let grid = qcfg.grid()?;
    let b = grid.bits;
    let name = |leaf: &str| format!("{}.{leaf}", spec.name);
    let file = || {
        store
            .file_of(&name("qweight"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let n_groups = grid.group_size.n_groups(k);
    let want = GptqTensors::qweight_shape(k, n, b);
    let as_u32 = |v: Vec<i32>| v.into_iter().map(|x| x as u32).collect::<Vec<u32>>();
    let tensors = GptqTensors {
        qweight: as_u32(store.i32_vec(&name("qweight"), &want)?),
        qzeros: as_u32(store.i32_vec(&name("qzeros"), &GptqTensors::qzeros_shape(n, n_groups, b))?),
        scales: store
            .f32_vec(&name("scales"), &[n_groups, n])?
            .into_iter()
            .map(f16::from_f32)
            .collect(),
        g_idx: store.i32_vec(&name("g_idx"), &[k])?,
    };
    let mut q = tensors
        .to_quantized(n, k, grid, qcfg.zeros)
        .with_context(|| format!("unpacking `{}` from {}", spec.name, file()))?;
    if let Some((g, r, z)) = grid
        .sym
        .then(|| asymmetric_zero(&q.zeros, n, |_| b))
        .flatten()
    {
        warn_once(&format!(
            "quantization_config.sym is true, but `{}` in {} holds zero point {z} (group {g}, \
             row {r}) where a symmetric {b}-bit grid has {}; the stored zero points are used",
            name("qzeros"),
            file(),
            1u32 << (b - 1)
        ));
        q.grid.sym = false;
    }
    Ok(q)
}

/// Print `message` as a warning once per process: a contradiction in a model's config
/// repeats in every layer, and one line says it.
fn warn_once(message: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| eprintln!("warning: {message} (further such warnings not shown)"));
}

/// Write `tensors` (name, shape, f32 little-endian bytes) as an F32 safetensors file
/// (the reference weights consumers' decoders are checked against).
pub(crate) fn write_f32_safetensors(
    path: &std::path::Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<()> {
    write_safetensors_as(path, tensors, Dtype::F32)
}

/// Write `tensors` (name, shape, little-endian bytes already in `dtype`) as one
/// safetensors file with `format: pt` metadata.
pub(crate) fn write_safetensors_as(
    path: &std::path::Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    dtype: Dtype,
) -> Result<()> {
    let views: Vec<(&str, OutTensor)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            (
                n.as_str(),
                OutTensor {
                    dtype,
                    shape: shape.clone(),
                    data: Cow::Borrowed(data),
                },
            )
        })
        .collect();
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views.iter().map(|(n, t)| (*n, t)), meta, path)
        .map_err(|e| tagged(ErrorKind::Output, format!("writing {}: {e}", path.display())))
}

/// Save GPTQ's per-column losses (`column_losses.safetensors`, F64 `[in_features]` per
/// layer) next to the packed weights, so bit allocation can reuse the measurement.
pub fn write_column_losses(out: &OutputFolder, losses: &[(String, Vec<f64>)]) -> Result<()> {
    write_column_losses_to(&out.path().join("column_losses.safetensors"), losses)
}

/// Where a GGUF output's pass-1 column losses go: beside it, `NAME.column_losses.safetensors`
/// for `NAME.gguf` (a GGUF file has no folder to hold them).
pub fn column_losses_beside(gguf: &Path) -> PathBuf {
    gguf.with_extension("column_losses.safetensors")
}

/// [`write_column_losses`] to the file `path`, whole or not at all: written under a
/// temporary name and renamed over any earlier file.
pub fn write_column_losses_file(path: &Path, losses: &[(String, Vec<f64>)]) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    write_column_losses_to(&partial, losses)?;
    std::fs::rename(&partial, path).map_err(|e| {
        std::fs::remove_file(&partial).ok();
        tagged(ErrorKind::Output, format!("renaming {} into place: {e}", path.display()))
    })
}

fn write_column_losses_to(path: &Path, losses: &[(String, Vec<f64>)]) -> Result<()> {
    let tensors: BTreeMap<String, OutTensor> = losses
        .iter()
        .map(|(n, l)| {
            let bytes: Vec<u8> = l.iter().flat_map(|x| x.to_le_bytes()).collect();
            (
                n.clone(),
                OutTensor {
                    dtype: Dtype::F64,
                    shape: vec![l.len()],
                    data: bytes.into(),
                },
            )
        })
        .collect();
    let meta = Some(HashMap::from([(
        "format".to_string(),
        "bitsmith-column-losses".to_string(),
    )]));
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), meta, path)
        .map_err(|e| tagged(ErrorKind::Output, format!("writing {}: {e}", path.display())))
}

/// A mixed-width layer's `col_perm` and `col_widths` (U8 `[k]`, every width 0..=8), shapes
/// and dtypes checked; both mixed layouts store them alike.
pub(super) fn read_column_order(
    store: &WeightStore,
    layer: &str,
    k: usize,
) -> Result<(Vec<i32>, Vec<u8>)> {
    let col_perm = store.i32_vec(&format!("{layer}.col_perm"), &[k])?;
    let widths_name = format!("{layer}.col_widths");
    let (wi, widths) = store.raw(&widths_name)?;
    ensure!(
        wi.shape == [k] && wi.dtype.st() == Dtype::U8,
        "tensor `{widths_name}` is {} {:?}, expected U8 [{k}]",
        wi.dtype.name(),
        wi.shape
    );
    if let Some(j) = widths.iter().position(|&b| b > 8) {
        bail!(
            "tensor `{widths_name}` gives column {j} width {}, outside 0..=8",
            widths[j]
        );
    }
    Ok((col_perm, widths.to_vec()))
}

/// Read the mixed-width tensors of `spec` back (see [`super::mixed`]), validated like
/// [`read_quantized_linear`]: shapes from the widths and `group_size`, every scale finite
/// and non-zero, every code and zero point within its width.
pub fn read_mixed_linear(
    store: &WeightStore,
    spec: &LinearSpec,
    sym: bool,
    group_size: Option<usize>,
) -> Result<MixedQuantizedLinear> {
    let (n, k) = (spec.out_features, spec.in_features);
    let name = |leaf: &str| format!("{}.{leaf}", spec.name);
    let file = || {
        store
            .file_of(&name("col_widths"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    ensure!(
        group_size != Some(0),
        "quantization_config.group_size 0 is not a size"
    );
    let (col_perm, col_widths) =
        read_column_order(store, &spec.name, k).with_context(|| format!("in {}", file()))?;
    let mut runs = Vec::new();
    for b in 1..=8u8 {
        let kb = col_widths.iter().filter(|&&w| w == b).count();
        if kb == 0 {
            continue;
        }
        let groups = group_size.map_or(1, |g| kb.div_ceil(g));
        let scales = name(&format!("w{b}.scales"));
        let si = store.info(&scales)?;
        ensure!(
            si.shape == [groups, n],
            "tensor `{scales}` in {} has shape {:?}, but {kb} columns of width {b} with \
             quantization_config.group_size {} make {groups} range groups of {n} rows: the \
             config and the tensors disagree",
            file(),
            si.shape,
            group_size.map_or(-1, |g| g as i64)
        );
        let rows = super::bits::packed_words(kb, b);
        let q = store.i32_vec(&name(&format!("w{b}.qweight")), &[rows, n])?;
        let z = store.i32_vec(
            &name(&format!("w{b}.qzeros")),
            &[groups, super::bits::packed_words(n, b)],
        )?;
        let s = store.f32_vec(&scales, &[groups, n])?;
        runs.push(MixedRun {
            bits: b,
            qweight: q.into_iter().map(|x| x as u32).collect(),
            scales: s.into_iter().map(f16::from_f32).collect(),
            qzeros: z.into_iter().map(|x| x as u32).collect(),
        });
    }
    let mut q = MixedTensors {
        col_perm,
        col_widths,
        runs,
    }
    .to_quantized(n, k, sym, group_size)
    .with_context(|| format!("unpacking `{}` from {}", spec.name, file()))?;
    if sym {
        let group_width = q.groups().group_width;
        if let Some((g, r, z)) = asymmetric_zero(&q.zeros, n, |g| group_width[g]) {
            warn_once(&format!(
                "quantization_config.sym is true, but `{}` holds zero point {z} (range group \
                 {g}, row {r}) where a symmetric grid has 2^(width-1); the stored zero points \
                 are used",
                spec.name
            ));
            q.sym = false;
        }
    }
    Ok(q)
}
