//! A whole model as a llama.cpp GGUF file (`llama` architecture for Llama and Mistral,
//! `qwen2` for Qwen2): metadata, tokenizer, norms and embeddings, and the linears in a GGML
//! type.
//!
//! From a float model every linear is rounded to nearest as llama.cpp's reference
//! quantizer for the type rounds ([`super::blocks`]). From a bitsmith GPTQ-layout model
//! the linears convert code for code where the grid is the block type
//! ([`super::exact`]); other grids are an error that says which types they convert to.
//!
//! llama.cpp applies rotary embeddings to interleaved pairs (dimensions 2i, 2i+1 of a
//! head) where Hugging Face Llama rotates halves (i, i + d/2): the converter reorders the
//! rows of `q_proj` and `k_proj` (and their biases) inside every head so the two agree,
//! row `2i + h` of a head taking row `h·d/2 + i`. Rows carry their own scales in every
//! layout here, so the reordering moves whole rows of blocks and keeps exactness. llama.cpp's
//! `qwen2` rotates halves as Hugging Face does (its NeoX mode): no reordering there.

use super::blocks::{dequantize_row, quantize_row, GgmlType, QK};
use super::container::{GgufWriter, MetaValue, TensorInfo};
use super::exact::{exact_blocks, exact_type};
use super::tokenizer::read_vocab;
use super::GgufFileType;
use crate::loader::{Architecture, ModelConfig, ModelFiles, WeightStore};
use crate::model::spec::lm_head;
use crate::model::{block_linears, LinearSpec};
use crate::pack::compat::refuse_online_ops;
use crate::pack::model::write_f32_safetensors;
use crate::pack::{read_quantized_linear, GptqConfig, MIXED_METHOD};
use crate::quant::grid::{LinearRole, MixShape};
use crate::quant::GgmlQuantizedLinear;
use crate::error::{ErrorKind, ResultExt};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// What [`export_gguf`] writes.
#[derive(Debug, Clone, Default)]
pub struct GgufExportOptions {
    /// Type of the block linears, or llama.cpp's mix of types. `None`: the type a quantized
    /// model converts to exactly (required for a float model).
    pub ty: Option<GgufFileType>,
    /// Type of `token_embd` (and of `output` when the head is not tied). Default: F32 for
    /// a single block type, llama.cpp's choice for a mix.
    pub embedding_ty: Option<GgmlType>,
    /// llama.cpp's pre-tokenizer name, when the tokenizer's is not recognised.
    pub tokenizer_pre: Option<String>,
    /// Write no vocabulary (`tokenizer.ggml.model = "none"`): for models without a BPE
    /// `tokenizer.json`; llama.cpp then cannot tokenize text.
    pub no_vocab: bool,
    /// Replace an existing output file.
    pub overwrite: bool,
    /// Also write every tensor's values as bitsmith computes them (F32 safetensors, GGUF
    /// names and rotary row order): a quantized layer's own dequantized weights where it
    /// converts code for code, bitsmith's decoding of the written blocks otherwise. A
    /// consumer's dequantization of the GGUF must equal these bit for bit
    /// (`scripts/gguf_check.py`).
    pub reference_weights: Option<PathBuf>,
}

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufExportReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    /// The linears' type (or mix).
    pub linear_type: String,
    /// The source was a quantized model whose codes were written as they are.
    pub exact: bool,
    /// Tensors written in another type than asked, and why.
    pub fallbacks: Vec<String>,
}

/// Where a tensor's values come from.
enum Source {
    /// A float tensor of the checkpoint.
    Float(String),
    /// A block linear (quantized or float in the checkpoint).
    Linear(LinearSpec),
    /// A linear solved on its GGML type by `bitsmith quantize --format gguf`: its blocks.
    Solved(String),
    /// Values computed from the config (Llama 3's `rope_freqs`).
    Computed(Vec<f32>),
}

struct Planned {
    info: TensorInfo,
    source: Source,
    /// Heads whose rows are reordered for llama.cpp's rotary layout.
    permute_heads: Option<usize>,
}

/// The GGUF name of a block linear (`self_attn.q_proj` → `attn_q`).
fn gguf_linear_name(suffix: &str) -> Result<&'static str> {
    Ok(match suffix {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => bail!("no GGUF name for the linear `{other}`"),
    })
}

/// Reorder the rows of a `[n_head·d, …]` tensor (`row_bytes` bytes per row) from Hugging
/// Face's rotate-half layout to llama.cpp's interleaved one, per head.
pub fn permute_rows(data: &[u8], row_bytes: usize, n_head: usize) -> Result<Vec<u8>> {
    let rows = data.len() / row_bytes.max(1);
    ensure!(
        rows * row_bytes == data.len() && rows.is_multiple_of(2 * n_head.max(1)),
        "{rows} rows do not split into {n_head} heads of an even size"
    );
    let d = rows / n_head;
    let mut out = Vec::with_capacity(data.len());
    for head in 0..n_head {
        for i in 0..d / 2 {
            for h in 0..2 {
                let old = head * d + h * (d / 2) + i;
                out.extend_from_slice(&data[old * row_bytes..(old + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

/// The inverse of [`permute_rows`] (llama.cpp's layout back to Hugging Face's).
pub fn unpermute_rows(data: &[u8], row_bytes: usize, n_head: usize) -> Result<Vec<u8>> {
    let rows = data.len() / row_bytes.max(1);
    ensure!(
        rows * row_bytes == data.len() && rows.is_multiple_of(2 * n_head.max(1)),
        "{rows} rows do not split into {n_head} heads of an even size"
    );
    let d = rows / n_head;
    let mut out = vec![0u8; data.len()];
    let mut new = 0;
    for head in 0..n_head {
        for i in 0..d / 2 {
            for h in 0..2 {
                let old = head * d + h * (d / 2) + i;
                out[old * row_bytes..(old + 1) * row_bytes]
                    .copy_from_slice(&data[new * row_bytes..(new + 1) * row_bytes]);
                new += 1;
            }
        }
    }
    Ok(out)
}

/// llama.cpp's architecture name for `c`, and whether its rotary layout needs `q_proj`'s
/// and `k_proj`'s rows reordered (see the module doc).
pub fn gguf_architecture(c: &ModelConfig) -> (&'static str, bool) {
    match c.architecture {
        Architecture::Llama | Architecture::Mistral => ("llama", true),
        Architecture::Qwen2 => ("qwen2", false),
    }
}

/// The `{arch}.*` and `general.*` metadata of `c`.
fn architecture_metadata(
    c: &ModelConfig,
    name: &str,
    linear: GgufFileType,
) -> Vec<(String, MetaValue)> {
    let u = |v: usize| MetaValue::U32(v as u32);
    let arch = gguf_architecture(c).0;
    let k = |key: &str| format!("{arch}.{key}");
    let mut m = vec![
        (
            "general.architecture".into(),
            MetaValue::String(arch.into()),
        ),
        ("general.name".into(), MetaValue::String(name.into())),
        (
            "general.file_type".into(),
            MetaValue::U32(linear.file_type()),
        ),
        (k("context_length"), u(c.max_position_embeddings)),
        (k("embedding_length"), u(c.hidden_size)),
        (k("block_count"), u(c.num_hidden_layers)),
        (k("feed_forward_length"), u(c.intermediate_size)),
        (k("rope.dimension_count"), u(c.head_dim)),
        (
            k("attention.head_count"),
            u(c.num_attention_heads),
        ),
        (
            k("attention.head_count_kv"),
            u(c.num_key_value_heads),
        ),
        (
            k("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(c.rms_norm_eps as f32),
        ),
        (
            k("rope.freq_base"),
            MetaValue::F32(c.rope_theta as f32),
        ),
        (k("vocab_size"), u(c.vocab_size)),
    ];
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        m.push((k("attention.key_length"), u(c.head_dim)));
        m.push((k("attention.value_length"), u(c.head_dim)));
    }
    if let Some(s) = &c.rope_scaling {
        // the scaling itself is the `rope_freqs` tensor; llama.cpp uses this key for YaRN
        // only, import reads it to write the config's value back exactly
        m.push((
            k("rope.scaling.original_context_length"),
            u(s.original_max_position_embeddings),
        ));
    }
    if !linear.is_float() {
        m.push(("general.quantization_version".into(), MetaValue::U32(2)));
    }
    m
}

/// Is the model quantized, and how.
fn quantization(c: &ModelConfig) -> Result<Option<GptqConfig>> {
    let method = c
        .raw
        .get("quantization_config")
        .filter(|v| !v.is_null())
        .map(|q| q["quant_method"].as_str().unwrap_or(""));
    match method {
        None => Ok(None),
        Some("gptq") => GptqConfig::from_model_config(&c.raw),
        Some(MIXED_METHOD) => bail!(
            "bitsmith's mixed-width layout has no GGUF block type; export the float model \
             with --type instead"
        ),
        Some(other) => bail!("quantization_config.quant_method `{other}` is not supported"),
    }
}

/// The type a quantized model's linears convert to exactly, from its config alone.
fn exact_type_of(q: &GptqConfig) -> Result<GgmlType> {
    let g = q.group_size.as_columns();
    let whole_blocks = g.is_none_or(|g| g.is_multiple_of(QK));
    match (q.bits, q.sym, whole_blocks, q.desc_act) {
        (4, true, true, false) => Ok(GgmlType::Q4_0),
        (8, true, true, false) => Ok(GgmlType::Q8_0),
        _ => bail!(
            "a w{} g{} {}{} model converts to no GGML block type code for code (exact: w4 \
             sym → Q4_0, w8 sym → Q8_0, groups of 32·k columns, no act-order); pass --type \
             F32 (exact, dequantized), F16 or BF16, or export the float model with a block type",
            q.bits,
            q.group_size.as_i64(),
            if q.sym { "sym" } else { "asym" },
            if q.desc_act { " act-order" } else { "" }
        ),
    }
}

/// Export the model at `files` to the GGUF file `out` (written under a temporary name and
/// renamed when complete).
pub fn export_gguf(
    files: &ModelFiles,
    out: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportReport> {
    let c = ModelConfig::from_file(&files.config)?;
    let store = WeightStore::open(&files.weights)?;
    export_gguf_model(files, &c, &store, &HashMap::new(), out, opts)
}

/// Write a model whose linears were solved on their GGML types (`solved`, by module name;
/// `opts.ty` the type asked for) as a GGUF: the linears' blocks as they are, every other
/// tensor from `store` (the weights after any transform, with `config`); the tokenizer
/// from `files`.
pub fn export_gguf_solved(
    files: &ModelFiles,
    config: &ModelConfig,
    store: &WeightStore,
    solved: &HashMap<String, GgmlQuantizedLinear>,
    out: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportReport> {
    ensure!(
        opts.ty.is_some_and(|t| !t.is_float()),
        "a solved GGUF needs its block type"
    );
    export_gguf_model(files, config, store, solved, out, opts)
}

fn export_gguf_model(
    files: &ModelFiles,
    c: &ModelConfig,
    store: &WeightStore,
    solved: &HashMap<String, GgmlQuantizedLinear>,
    out: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportReport> {
    let c = c.clone();
    refuse_online_ops(&c, "GGUF", "llama.cpp")?;
    let (arch, reorder_rotary) = gguf_architecture(&c);
    ensure!(
        c.rope_scaling.is_none() || arch == "llama",
        "Llama 3 RoPE scaling is written for llama.cpp's `llama` architecture only, not `{arch}`"
    );
    if c.sliding_window.is_some() {
        eprintln!("warning: llama.cpp's `{arch}` architecture has no sliding attention window; the GGUF attends over the whole context");
    }
    let gptq = quantization(&c)?;
    let linear_ty = match (opts.ty, &gptq) {
        (Some(t), None) => t,
        (None, None) => bail!(
            "a float model needs --type (one of {})",
            GgufFileType::names()
        ),
        (Some(t), Some(q)) if !t.is_float() => {
            let exact = exact_type_of(q)?;
            ensure!(
                t == GgufFileType::Pure(exact),
                "this w{} model converts code for code to {exact}, not {t}; pass --type {exact} \
                 (or F32, F16, BF16 for its dequantized weights), or export the float model as {t}",
                q.bits
            );
            t
        }
        (Some(t), Some(_)) => t,
        (None, Some(q)) => GgufFileType::Pure(exact_type_of(q)?),
    };
    ensure!(
        !linear_ty.needs_calibration() || !solved.is_empty(),
        "{linear_ty} needs calibration data, as llama-quantize needs an importance matrix for \
         it (its 2-bit layers rounded to nearest lose too much): use `bitsmith quantize \
         --format gguf --type {linear_ty} --method gptq`"
    );
    let h = c.hidden_size;
    let shape = MixShape::of(&c);
    // llama.cpp's mixes choose the head's type (and a tied embedding's) themselves
    let head_ty = opts
        .embedding_ty
        .or(linear_ty.default_head_type(h))
        .unwrap_or(GgmlType::F32);
    let emb_ty = if c.tie_word_embeddings {
        head_ty
    } else {
        opts.embedding_ty
            .or(linear_ty.default_untied_embedding_type(h))
            .unwrap_or(GgmlType::F32)
    };
    if out.exists() && !opts.overwrite {
        bail!(
            "output `{}` already exists; pass --overwrite to replace it",
            out.display()
        );
    }

    // metadata
    let name = Path::new(&files.source)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| files.source.clone());
    let mut meta = architecture_metadata(&c, &name, linear_ty);
    meta.extend(vocab_metadata(files, &c, opts)?);

    // tensors, in llama.cpp's order
    let mut fallbacks = vec![];
    let mut solved_notes = vec![];
    let mut block_ty = |name: &str,
                        ty: GgmlType,
                        cols: usize,
                        exact_source: bool|
     -> Result<GgmlType> {
        if cols.is_multiple_of(ty.block_size()) {
            return Ok(ty);
        }
        ensure!(
            !exact_source,
            "`{name}` has {cols} input columns, not whole {}-weight blocks: no {ty} layout holds it",
            ty.block_size()
        );
        // llama.cpp's quantize falls back the same way for rows that are not whole blocks
        let instead = ty.fallback_for(cols);
        fallbacks.push(format!(
            "{name}: {cols} columns are not whole {}-weight {ty} blocks, written as {instead}",
            ty.block_size()
        ));
        Ok(instead)
    };
    let mut plan = vec![];
    let float = |hf: &str, gg: String, shape: Vec<usize>, ty: GgmlType| Planned {
        info: TensorInfo {
            name: gg,
            shape,
            ty,
        },
        source: Source::Float(hf.to_string()),
        permute_heads: None,
    };
    if let Some(s) = &c.rope_scaling {
        // Llama 3 scaling: llama.cpp divides each rotary frequency by this factor
        plan.push(Planned {
            info: TensorInfo {
                name: "rope_freqs.weight".into(),
                shape: vec![c.head_dim / 2],
                ty: GgmlType::F32,
            },
            source: Source::Computed(super::rope_freqs::llama3_factors(
                c.head_dim,
                c.rope_theta,
                s,
            )),
            permute_heads: None,
        });
    }
    let emb = block_ty("token_embd.weight", emb_ty, h, false)?;
    plan.push(float(
        "model.embed_tokens.weight",
        "token_embd.weight".into(),
        vec![c.vocab_size, h],
        emb,
    ));
    for layer in 0..c.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{layer}.{s}");
        plan.push(float(
            &p("input_layernorm.weight"),
            format!("blk.{layer}.attn_norm.weight"),
            vec![h],
            GgmlType::F32,
        ));
        for spec in block_linears(&c, layer) {
            let suffix = spec.name.trim_start_matches(&p("")).to_string();
            let suffix = suffix.as_str();
            let gg = format!("blk.{layer}.{}", gguf_linear_name(suffix)?);
            let heads = match suffix {
                "self_attn.q_proj" if reorder_rotary => Some(c.num_attention_heads),
                "self_attn.k_proj" if reorder_rotary => Some(c.num_key_value_heads),
                _ => None,
            };
            let quantized = gptq.is_some() && store.contains(&format!("{}.qweight", spec.name));
            let role = LinearRole::of_suffix(suffix)
                .with_context(|| format!("no llama.cpp role for `{suffix}`"))?;
            let wanted = linear_ty.linear_type(role, layer, &shape);
            let ty = match solved.get(&spec.name) {
                Some(q) => {
                    // a layer on its type's fallback (an allocation's own choices are not)
                    if q.ty != wanted && q.ty == wanted.fallback_for(spec.in_features) {
                        solved_notes.push(format!(
                            "{gg}.weight: {} columns are not whole {}-weight {wanted} blocks, \
                             solved as {}",
                            spec.in_features,
                            wanted.block_size(),
                            q.ty
                        ));
                    }
                    q.ty
                }
                None => block_ty(
                    &format!("{gg}.weight"),
                    wanted,
                    spec.in_features,
                    quantized && !linear_ty.is_float(),
                )?,
            };
            if spec.bias {
                plan.push(Planned {
                    info: TensorInfo {
                        name: format!("{gg}.bias"),
                        shape: vec![spec.out_features],
                        ty: GgmlType::F32,
                    },
                    source: Source::Float(format!("{}.bias", spec.name)),
                    permute_heads: heads,
                });
            }
            plan.push(Planned {
                info: TensorInfo {
                    name: format!("{gg}.weight"),
                    shape: vec![spec.out_features, spec.in_features],
                    ty,
                },
                source: if solved.contains_key(&spec.name) {
                    Source::Solved(spec.name.clone())
                } else {
                    Source::Linear(spec)
                },
                permute_heads: heads,
            });
            if suffix == "self_attn.o_proj" {
                plan.push(float(
                    &p("post_attention_layernorm.weight"),
                    format!("blk.{layer}.ffn_norm.weight"),
                    vec![h],
                    GgmlType::F32,
                ));
            }
        }
    }
    plan.push(float(
        "model.norm.weight",
        "output_norm.weight".into(),
        vec![h],
        GgmlType::F32,
    ));
    if !c.tie_word_embeddings {
        if gptq.is_some() && store.contains("lm_head.qweight") {
            // a quantized head (`--lm-head`) converts like the block linears
            let ty = block_ty("output.weight", linear_ty.base(), h, !linear_ty.is_float())?;
            plan.push(Planned {
                info: TensorInfo {
                    name: "output.weight".into(),
                    shape: vec![c.vocab_size, h],
                    ty,
                },
                source: Source::Linear(lm_head(&c)),
                permute_heads: None,
            });
        } else {
            let head = block_ty("output.weight", head_ty, h, false)?;
            plan.push(float(
                "lm_head.weight",
                "output.weight".into(),
                vec![c.vocab_size, h],
                head,
            ));
        }
    }

    fallbacks.extend(solved_notes);
    // write under a temporary name, renamed when complete
    let tmp = out.with_file_name(format!(
        ".{}.partial-{}",
        out.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let guard = RemoveOnDrop(Some(tmp.clone()));
    let file = std::fs::File::create(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))
        .kind(ErrorKind::Output)?;
    let infos = plan.iter().map(|p| p.info.clone()).collect();
    let mut w = GgufWriter::begin(BufWriter::new(file), &meta, infos)?;
    let mut exact = (gptq.is_some() || !solved.is_empty()) && !linear_ty.is_float();
    let mut reference = vec![];
    for p in &plan {
        let (data, values) = tensor_bytes(
            store,
            solved,
            p,
            gptq.as_ref(),
            &mut exact,
            opts.reference_weights.is_some(),
        )
        .with_context(|| format!("writing `{}` ({})", p.info.name, p.info.ty))?;
        w.write_tensor(&p.info.name, &data)
            .with_context(|| format!("writing {}", tmp.display()))
            .kind(ErrorKind::Output)?;
        if let Some(v) = values {
            reference.push((p.info.name.clone(), p.info.shape.clone(), v));
        }
    }
    if let Some(path) = &opts.reference_weights {
        write_f32_safetensors(path, &reference)?;
    }
    let written = || -> Result<u64> {
        let (bw, bytes) = w.finish()?;
        bw.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(bytes)
    };
    let bytes = written()
        .with_context(|| format!("writing {}", tmp.display()))
        .kind(ErrorKind::Output)?;
    std::fs::rename(&tmp, out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
        .kind(ErrorKind::Output)?;
    std::mem::forget(guard);
    Ok(GgufExportReport {
        path: out.to_path_buf(),
        bytes,
        tensors: plan.len(),
        linear_type: linear_ty.name().into(),
        exact,
        fallbacks,
    })
}

/// The tokenizer's GGUF metadata (`tokenizer.ggml.*`), or `tokenizer.ggml.model = none`
/// with `no_vocab`: an error, before any work, for a tokenizer GGUF cannot hold.
pub fn vocab_metadata(
    files: &ModelFiles,
    c: &ModelConfig,
    opts: &GgufExportOptions,
) -> Result<Vec<(String, MetaValue)>> {
    let mut meta = vec![];
    if opts.no_vocab {
        meta.push((
            "tokenizer.ggml.model".into(),
            MetaValue::String("none".into()),
        ));
    } else {
        let tok = files.tokenizer.as_deref().with_context(|| {
            format!(
                "{} has no tokenizer.json (pass --no-vocab to write the weights alone)",
                files.source
            )
        })?;
        let extra = |n: &str| {
            files
                .extras
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, p)| p.as_path())
        };
        let vocab = read_vocab(
            tok,
            extra("tokenizer_config.json"),
            extra("chat_template.jinja"),
            &c.raw,
            c.vocab_size,
            opts.tokenizer_pre.as_deref(),
        )?;
        meta.extend(vocab.metadata());
    }
    Ok(meta)
}

/// Removes a half-written file when the export fails.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The bytes of one planned tensor, and with `values` the f32 values bitsmith means them
/// to hold (little-endian bytes, in the written row order). `exact` is cleared when a
/// quantized model's linear had to be rounded from float weights (a layer the checkpoint
/// keeps in float).
fn tensor_bytes(
    store: &WeightStore,
    solved: &HashMap<String, GgmlQuantizedLinear>,
    p: &Planned,
    gptq: Option<&GptqConfig>,
    exact: &mut bool,
    values: bool,
) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    let ty = p.info.ty;
    let cols = *p.info.shape.last().unwrap_or(&1);
    let mut own = None;
    let data = match &p.source {
        Source::Float(hf) => {
            let mut out = vec![];
            quantize_row(ty, &store.f32_vec(hf, &p.info.shape)?, &mut out)?;
            out
        }
        Source::Solved(name) => solved[name].data.clone(),
        Source::Computed(v) => {
            let mut out = vec![];
            quantize_row(ty, v, &mut out)?;
            out
        }
        Source::Linear(spec) => match gptq {
            Some(q) if store.contains(&format!("{}.qweight", spec.name)) => {
                let ql = read_quantized_linear(store, spec, q)?;
                if ty.is_float() {
                    let mut out = vec![];
                    quantize_row(ty, &ql.dequantize(), &mut out)?;
                    out
                } else {
                    exact_type(&ql).with_context(|| format!("`{}`", spec.name))?;
                    if values {
                        own = Some(ql.dequantize());
                    }
                    exact_blocks(&ql, ty)?
                }
            }
            _ => {
                if gptq.is_some() && !ty.is_float() {
                    *exact = false;
                }
                let w = store.f32_vec(
                    &format!("{}.weight", spec.name),
                    &[spec.out_features, spec.in_features],
                )?;
                let mut out = vec![];
                quantize_row(ty, &w, &mut out)?;
                out
            }
        },
    };
    let reorder = |bytes: Vec<u8>, row_bytes: usize| match p.permute_heads {
        Some(heads) => permute_rows(&bytes, row_bytes, heads),
        None => Ok(bytes),
    };
    // bitsmith's values in the checkpoint's row order: a layer's own dequantized weights
    // when it converted code for code, else the decoding of the blocks just encoded
    let values = match (values, own) {
        (false, _) => None,
        (true, Some(v)) => Some(v),
        (true, None) => Some(dequantize_row(ty, &data)?),
    };
    let values = values
        .map(|v| reorder(v.iter().flat_map(|x| x.to_le_bytes()).collect(), 4 * cols))
        .transpose()?;
    Ok((reorder(data, ty.row_bytes(cols)?)?, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reordering matches convert_hf_to_gguf's `reshape(n_head, 2, d/2, …)
    /// .swapaxes(1, 2)` on row indices, and the inverse undoes it.
    #[test]
    fn permutation_is_convert_hf_to_gguf_s() {
        let (heads, d) = (3, 8);
        let rows: Vec<u8> = (0..(heads * d) as u8).collect();
        let p = permute_rows(&rows, 1, heads).unwrap();
        // reshape (3, 2, 4) then swap the last two axes: new[h][i][s] = old[h][s][i]
        let want: Vec<u8> = (0..heads)
            .flat_map(|h| {
                (0..d / 2).flat_map(move |i| (0..2).map(move |s| (h * d + s * d / 2 + i) as u8))
            })
            .collect();
        assert_eq!(p, want);
        assert_eq!(&p[..8], &[0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(unpermute_rows(&p, 1, heads).unwrap(), rows);
        assert!(permute_rows(&rows, 1, 5).is_err());
    }
}
