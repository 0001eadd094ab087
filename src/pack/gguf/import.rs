//! A `llama` (or `qwen2`) GGUF back to a Hugging Face folder: every tensor of a type candle knows decoded
//! by candle (an implementation independent of this crate's encoders; IQ4_NL, which candle
//! does not know, by this crate's decoder, see [`super::reader`]), the rotary row order
//! undone, stored as F32 (exact for every GGML type) or rounded to BF16/F16; a
//! `config.json` and `generation_config.json` from the `{arch}.*` metadata; and the
//! tokenizer files rebuilt from the GGUF's vocabulary ([`super::hf_tokenizer`]) or copied
//! from the model the GGUF was made from.

use super::export::unpermute_rows;
use super::rope_freqs::fit_llama3;
use super::hf_tokenizer::{hf_tokenizer_files, vocab_from_metadata, HfTokenizerFiles};
use crate::pack::model::write_safetensors_as;
use crate::pack::OutputFolder;
use anyhow::{anyhow, bail, ensure, Context, Result};
use super::reader::read_header;
use candle_core::quantized::gguf_file::Value;
use safetensors::Dtype;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How the decoded weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StoredDtype {
    /// Exact: every GGML type decodes to values an f32 holds.
    #[default]
    F32,
    /// Rounded to nearest even; half the size. Q4/Q5/Q8 blocks with f16 scales are not
    /// always exact in bf16.
    Bf16,
    F16,
}

impl StoredDtype {
    fn name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "float32",
            StoredDtype::Bf16 => "bfloat16",
            StoredDtype::F16 => "float16",
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            StoredDtype::F32 => Dtype::F32,
            StoredDtype::Bf16 => Dtype::BF16,
            StoredDtype::F16 => Dtype::F16,
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            StoredDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            StoredDtype::Bf16 => values
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
            StoredDtype::F16 => values
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }

    fn width(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::Bf16 | StoredDtype::F16 => 2,
        }
    }
}

/// Where the imported folder's tokenizer files come from.
enum TokenizerFiles<'a> {
    Rebuilt(HfTokenizerFiles),
    CopiedFrom(&'a Path),
}

/// What `import_gguf` writes besides the weights.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Copy the tokenizer files from this folder instead of rebuilding them.
    pub tokenizer_from: Option<PathBuf>,
    pub dtype: StoredDtype,
    /// Replace an existing output folder.
    pub overwrite: bool,
}

/// Llama 3's RoPE scaling factors (read into `config.json`, not a weight).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The Hugging Face name of a GGUF tensor, and the heads its rows are permuted over.
fn hf_name(gguf: &str, heads: usize, kv_heads: usize) -> Result<(String, Option<usize>)> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Ok((n.to_string(), None));
    }
    let rest = gguf
        .strip_prefix("blk.")
        .ok_or_else(|| anyhow!("GGUF tensor `{gguf}` is not a llama tensor bitsmith knows"))?;
    let (layer, leaf) = rest
        .split_once('.')
        .ok_or_else(|| anyhow!("GGUF tensor `{gguf}` has no layer number"))?;
    let (module, kind) = leaf
        .rsplit_once('.')
        .ok_or_else(|| anyhow!("GGUF tensor `{gguf}` has no .weight/.bias suffix"))?;
    let (hf, permute) = match module {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(heads)),
        "attn_k" => ("self_attn.k_proj", Some(kv_heads)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => bail!("GGUF tensor `{gguf}` is not a llama tensor bitsmith knows"),
    };
    Ok((format!("model.layers.{layer}.{hf}.{kind}"), permute))
}

fn meta_u(m: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let v = m
        .get(key)
        .ok_or_else(|| anyhow!("the GGUF has no `{key}`"))?;
    Ok(match v {
        Value::U32(x) => *x as usize,
        Value::U64(x) => *x as usize,
        Value::I32(x) if *x >= 0 => *x as usize,
        other => bail!("`{key}` is {other:?}, not a size"),
    })
}

fn meta_f(m: &HashMap<String, Value>, key: &str) -> Option<f64> {
    match m.get(key)? {
        // the shortest decimal that reads back as this f32 (1e-5, not 9.999999747378752e-6),
        // as the model's own config.json said before it became an f32
        Value::F32(x) => x.to_string().parse().ok(),
        Value::F64(x) => Some(*x),
        _ => None,
    }
}

/// Decode the GGUF at `path` into the folder `out` (`config.json`,
/// `generation_config.json`, `model.safetensors`, and the tokenizer files).
pub fn import_gguf(path: &Path, out: &Path, opts: &ImportOptions) -> Result<PathBuf> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut magic = [0u8; 4];
    let is_gguf = std::io::Read::read_exact(&mut f, &mut magic).is_ok() && &magic == b"GGUF";
    ensure!(
        is_gguf,
        "{} is not a GGUF file (it does not start with `GGUF`)",
        path.display()
    );
    std::io::Seek::rewind(&mut f)?;
    let c = read_header(&mut f).with_context(|| format!("reading {} as GGUF", path.display()))?;
    let m = &c.metadata;
    let arch = m
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned();
    // llama.cpp's name, Hugging Face's class and model type, and whether q/k rows were
    // reordered for llama.cpp's interleaved rotary layout (see `export`)
    let (arch, hf_class, model_type, reordered) = match arch.as_deref() {
        Some("llama") => ("llama", "LlamaForCausalLM", "llama", true),
        Some("qwen2") => ("qwen2", "Qwen2ForCausalLM", "qwen2", false),
        other => bail!(
            "{}: architecture {other:?}; GGUF import reads `llama` and `qwen2`",
            path.display()
        ),
    };
    let k = |key: &str| format!("{arch}.{key}");
    let heads = meta_u(m, &k("attention.head_count"))?;
    let kv_heads = meta_u(m, &k("attention.head_count_kv")).unwrap_or(heads);
    let hidden = meta_u(m, &k("embedding_length"))?;
    let head_dim = meta_u(m, &k("rope.dimension_count")).unwrap_or(hidden / heads.max(1));
    let vocab = match meta_u(m, &k("vocab_size")) {
        Ok(v) => v,
        Err(_) => c
            .tensors
            .get("token_embd.weight")
            .map(|t| t.dims[0])
            .ok_or_else(|| anyhow!("{}: no vocab size and no token_embd.weight", path.display()))?,
    };
    // the tokenizer first: a vocabulary that cannot be rebuilt fails before any decoding
    let (tokenizer, (bos, eos, pad)) = match &opts.tokenizer_from {
        Some(src) => (TokenizerFiles::CopiedFrom(src), (None, None, None)),
        None => {
            let v = vocab_from_metadata(m)
                .with_context(|| format!("rebuilding the tokenizer from {}", path.display()))?;
            let context = meta_u(m, &k("context_length")).unwrap_or(2048);
            let files = hf_tokenizer_files(&v, context)
                .with_context(|| format!("rebuilding the tokenizer from {}", path.display()))?;
            (TokenizerFiles::Rebuilt(files), (v.bos, v.eos, v.pad))
        }
    };
    let mut config = json!({
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": meta_u(m, &k("feed_forward_length"))?,
        "num_hidden_layers": meta_u(m, &k("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": meta_f(m, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        "rope_theta": meta_f(m, &k("rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": meta_u(m, &k("context_length"))?,
        "tie_word_embeddings": !c.tensors.contains_key("output.weight"),
        "hidden_act": "silu",
        "torch_dtype": opts.dtype.name(),
        "attention_bias": c.tensors.contains_key("blk.0.attn_q.bias"),
    });
    if c.tensors.contains_key(ROPE_FREQS) {
        // Llama 3 scaling, held as per-frequency factors: back to config.json's rope_scaling
        let factors: Vec<f32> = c
            .dequantize(&mut f, ROPE_FREQS)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
            .with_context(|| format!("decoding `{ROPE_FREQS}` of {}", path.display()))?;
        ensure!(
            reordered,
            "{}: `{ROPE_FREQS}` in a `{arch}` model is not Llama 3's scaling",
            path.display()
        );
        let theta = meta_f(m, &k("rope.freq_base")).unwrap_or(10000.0);
        let original = meta_u(m, &k("rope.scaling.original_context_length")).ok();
        let s = fit_llama3(head_dim, theta, &factors, original)
            .with_context(|| format!("`{ROPE_FREQS}` of {}", path.display()))?;
        config["rope_scaling"] = json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        });
    }
    let mut generation = json!({});
    for (key, id) in [
        ("bos_token_id", bos),
        ("eos_token_id", eos),
        ("pad_token_id", pad),
    ] {
        if let Some(id) = id {
            config[key] = json!(id);
            generation[key] = json!(id);
        }
    }
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for name in c.tensors.keys().filter(|n| *n != ROPE_FREQS) {
        let (hf, permute) = hf_name(name, heads, kv_heads)?;
        let permute = permute.filter(|_| reordered);
        let t = c
            .dequantize(&mut f, name)
            .with_context(|| format!("decoding `{name}` of {}", path.display()))?;
        let shape = t.dims().to_vec();
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let mut bytes = opts.dtype.encode(&values);
        if let Some(h) = permute {
            let cols = if shape.len() > 1 { shape[1] } else { 1 };
            bytes = unpermute_rows(&bytes, opts.dtype.width() * cols, h)
                .with_context(|| format!("`{name}`"))?;
        }
        tensors.insert(hf, (shape, bytes));
    }
    let folder = OutputFolder::create(out, opts.overwrite)?;
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = folder.path().join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v)? + "\n")
            .with_context(|| format!("writing {}", p.display()))
    };
    write_json("config.json", &config)?;
    write_json("generation_config.json", &generation)?;
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, (s, d))| (n, s, d)).collect();
    write_safetensors_as(
        &folder.path().join("model.safetensors"),
        &tensors,
        opts.dtype.safetensors(),
    )?;
    match &tokenizer {
        TokenizerFiles::Rebuilt(files) => {
            write_json("tokenizer.json", &files.tokenizer)?;
            write_json("tokenizer_config.json", &files.tokenizer_config)?;
            write_json("special_tokens_map.json", &files.special_tokens_map)?;
        }
        TokenizerFiles::CopiedFrom(src) => {
            ensure!(
                src.join("tokenizer.json").is_file(),
                "--tokenizer-from {}: no tokenizer.json there",
                src.display()
            );
            for name in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ] {
                let p = src.join(name);
                if p.is_file() {
                    std::fs::copy(&p, folder.path().join(name))
                        .with_context(|| format!("copying {}", p.display()))?;
                }
            }
        }
    }
    folder.commit()
}
