//! Shared helpers for integration tests: small synthetic models written as real HF folders.
#![allow(dead_code)]

use half::bf16;
use safetensors::{Dtype, View};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// Deterministic pseudo-random numbers in [-1, 1).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// A tiny model description.
#[derive(Clone)]
pub struct Synth {
    pub arch: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
    pub bf16: bool,
    pub sliding_window: Option<usize>,
}

impl Default for Synth {
    fn default() -> Self {
        Self {
            arch: "LlamaForCausalLM",
            hidden: 64,
            intermediate: 96,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 61,
            tied: true,
            bf16: false,
            sliding_window: None,
        }
    }
}

pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

struct Out {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Out {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The largest absolute difference between two logit tables, relative to the largest
/// magnitude in `b` (the reference).
pub fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let scale = b.iter().flatten().fold(0f64, |m, &v| m.max(v.abs() as f64));
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

impl Synth {
    /// Two different sequences of `n` tokens (batch 2) in this vocabulary.
    pub fn batch_ids(&self, n: usize) -> Vec<Vec<u32>> {
        (0..2)
            .map(|b| {
                (0..n)
                    .map(|i| ((i * (7 + 4 * b) + 3 + b) % self.vocab) as u32)
                    .collect()
            })
            .collect()
    }

    /// Twelve token ids spread over the vocabulary: the sequence the tests that compare two
    /// models' functions feed both.
    pub fn probe_ids(&self) -> Vec<u32> {
        (0..12).map(|i| ((i * 7 + 3) % self.vocab) as u32).collect()
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn qkv_bias(&self) -> bool {
        self.arch == "Qwen2ForCausalLM"
    }

    pub fn config(&self) -> Value {
        let mut c = json!({
            "architectures": [self.arch], "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
            "tie_word_embeddings": self.tied, "hidden_act": "silu", "torch_dtype": if self.bf16 { "bfloat16" } else { "float32" },
        });
        if let Some(w) = self.sliding_window {
            c["sliding_window"] = json!(w);
        }
        c
    }

    /// All tensors with HF names (values already rounded to bf16 when `bf16`).
    pub fn tensors(&self, seed: u64) -> BTreeMap<String, Tensor> {
        let mut r = Lcg::new(seed);
        let (h, i, hd) = (self.hidden, self.intermediate, self.head_dim());
        let (q, kv) = (self.heads * hd, self.kv_heads * hd);
        let mut t = BTreeMap::new();
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32, r: &mut Lcg| {
            let n = shape.iter().product();
            let mut data: Vec<f32> = r.vec(n, scale).into_iter().map(|x| x + offset).collect();
            if self.bf16 {
                data.iter_mut()
                    .for_each(|x| *x = bf16::from_f32(*x).to_f32());
            }
            t.insert(name, Tensor { shape, data });
        };
        put(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, h],
            1.0,
            0.0,
            &mut r,
        );
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            put(
                format!("{p}.input_layernorm.weight"),
                vec![h],
                0.2,
                1.0,
                &mut r,
            );
            put(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                0.2,
                1.0,
                &mut r,
            );
            let s = 1.0 / (h as f32).sqrt();
            for (name, out, inp) in [
                ("self_attn.q_proj", q, h),
                ("self_attn.k_proj", kv, h),
                ("self_attn.v_proj", kv, h),
                ("self_attn.o_proj", h, q),
                ("mlp.gate_proj", i, h),
                ("mlp.up_proj", i, h),
                ("mlp.down_proj", h, i),
            ] {
                put(
                    format!("{p}.{name}.weight"),
                    vec![out, inp],
                    2.0 * s,
                    0.0,
                    &mut r,
                );
                if self.qkv_bias() && name.starts_with("self_attn.") && name != "self_attn.o_proj" {
                    put(format!("{p}.{name}.bias"), vec![out], 0.1, 0.0, &mut r);
                }
            }
        }
        put("model.norm.weight".into(), vec![h], 0.2, 1.0, &mut r);
        if !self.tied {
            put(
                "lm_head.weight".into(),
                vec![self.vocab, h],
                0.3,
                0.0,
                &mut r,
            );
        }
        t
    }

    /// Write `config.json` and `model.safetensors` into `dir` (sharded in two when `shards`).
    pub fn write(&self, dir: &Path, seed: u64, shards: bool) -> BTreeMap<String, Tensor> {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config()).unwrap(),
        )
        .unwrap();
        let tensors = self.tensors(seed);
        let outs: BTreeMap<String, Out> = tensors
            .iter()
            .map(|(n, t)| {
                let (dtype, bytes) = if self.bf16 {
                    (
                        Dtype::BF16,
                        t.data
                            .iter()
                            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                            .collect(),
                    )
                } else {
                    (
                        Dtype::F32,
                        t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    )
                };
                (
                    n.clone(),
                    Out {
                        dtype,
                        shape: t.shape.clone(),
                        bytes,
                    },
                )
            })
            .collect();
        let meta = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        if shards {
            let names: Vec<&String> = outs.keys().collect();
            let (a, b) = names.split_at(names.len() / 2);
            let mut map = serde_json::Map::new();
            for (file, part) in [
                ("model-00001-of-00002.safetensors", a),
                ("model-00002-of-00002.safetensors", b),
            ] {
                safetensors::serialize_to_file(
                    part.iter().map(|n| (n.as_str(), &outs[*n])),
                    meta.clone(),
                    &dir.join(file),
                )
                .unwrap();
                for n in part {
                    map.insert((*n).clone(), json!(file));
                }
            }
            std::fs::write(
                dir.join("model.safetensors.index.json"),
                json!({"metadata": {}, "weight_map": map}).to_string(),
            )
            .unwrap();
        } else {
            safetensors::serialize_to_file(
                outs.iter().map(|(n, o)| (n.as_str(), o)),
                meta,
                &dir.join("model.safetensors"),
            )
            .unwrap();
        }
        tensors
    }
}

/// Logits `[seq, vocab]` of one sequence.
pub fn logits(model: &bitsmith::model::CausalLm, ids: &[u32]) -> Vec<Vec<f32>> {
    let dev = model.device().clone();
    let t = candle_core::Tensor::from_slice(ids, (1, ids.len()), &dev).unwrap();
    model
        .forward(&t)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// The repository's reference outputs for the fixture tests (`tests/data/`).
pub fn test_data() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// Where `scripts/make-fixture.sh` put the fixture: `SMOLLM2_FIXTURE_DIR`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/bitsmith/fixtures/smollm2`.
pub fn fixture_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("SMOLLM2_FIXTURE_DIR") {
        return d.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache")
        });
    cache.join("bitsmith/fixtures/smollm2")
}

/// Point the hub client at the fixture's offline cache (built by `scripts/make-fixture.sh`)
/// and the dataset at the repository's `data/wikitext-2-raw` unless `BITSMITH_DATA_DIR` is
/// set. Fails, not skips, when the fixture is missing.
pub fn fixture_env() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let dir = fixture_dir();
        let hf_home = dir.join("hf-home");
        assert!(
            hf_home.join("hub").is_dir(),
            "fixture missing at {}: run `bash scripts/make-fixture.sh` first (or set SMOLLM2_FIXTURE_DIR)",
            dir.display()
        );
        std::env::set_var("HF_HOME", &hf_home);
        std::env::set_var("HF_HUB_OFFLINE", "1");
        if std::env::var_os("BITSMITH_DATA_DIR").is_none() {
            std::env::set_var(
                "BITSMITH_DATA_DIR",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("data/wikitext-2-raw"),
            );
        }
    });
}

/// Run the bitsmith binary on the fixture (offline); fail with its stderr unless it
/// succeeds; the last stdout line parsed as JSON (`Null` when it is not JSON).
pub fn run_cli(args: &[&str]) -> Value {
    fixture_env();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(args)
        .output()
        .expect("run bitsmith");
    assert!(
        o.status.success(),
        "bitsmith {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or(Value::Null)
}

/// Write a word-level `tokenizer.json` for a synthetic model of `vocab` tokens: token 0 is
/// `[UNK]`, token `i` the word `w{i}`. Enough for the CLI's calibration, `ppl` and
/// `generate` on a synthetic folder.
pub fn write_tokenizer(dir: &Path, vocab: usize) {
    let words: serde_json::Map<String, Value> = (0..vocab)
        .map(|i| {
            let w = if i == 0 {
                "[UNK]".to_string()
            } else {
                format!("w{i}")
            };
            (w, json!(i))
        })
        .collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "[UNK]"},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

/// `words` random words of [`write_tokenizer`]'s vocabulary, space-separated.
pub fn synthetic_text(vocab: usize, words: usize, seed: u64) -> String {
    let mut r = Lcg::new(seed);
    (0..words)
        .map(|_| {
            let i = 1 + ((r.next() * 0.5 + 0.5) * (vocab - 1) as f32) as usize;
            format!("w{}", i.min(vocab - 1))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rewrite the safetensors file `path` with `edit(name, dtype, bytes)` applied to every
/// tensor (to plant a corrupt value where a test wants it).
pub fn rewrite_tensors(path: &Path, mut edit: impl FnMut(&str, Dtype, &mut Vec<u8>)) {
    let raw = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let outs: BTreeMap<String, Out> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let mut bytes = t.data().to_vec();
            edit(&name, t.dtype(), &mut bytes);
            let out = Out {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                bytes,
            };
            (name, out)
        })
        .collect();
    safetensors::serialize_to_file(outs.iter().map(|(n, o)| (n.as_str(), o)), None, path).unwrap();
}

/// A synthetic model folder (weights, tokenizer, a calibration text) for runs of the real
/// binary.
pub struct CliModel {
    pub model: tempfile::TempDir,
    pub calib: std::path::PathBuf,
    pub layers: usize,
}

impl CliModel {
    /// `s` written with weight seed `seed`, and `words` words of calibration text.
    pub fn new(s: &Synth, seed: u64, words: usize, text_seed: u64) -> Self {
        let model = tempfile::tempdir().unwrap();
        s.write(model.path(), seed, false);
        write_tokenizer(model.path(), s.vocab);
        let calib = model.path().join("calib.txt");
        std::fs::write(&calib, synthetic_text(s.vocab, words, text_seed)).unwrap();
        Self {
            model,
            calib,
            layers: s.layers,
        }
    }

    /// `bitsmith quantize MODEL -o OUT --calib TEXT --nsamples N --seqlen L --quiet EXTRA`,
    /// offline, stdout discarded, stderr piped.
    pub fn quantize(
        &self,
        out: &Path,
        nsamples: usize,
        seqlen: usize,
        extra: &[&str],
    ) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"));
        c.args(["quantize", self.model.path().to_str().unwrap(), "-o"])
            .arg(out)
            .arg("--calib")
            .arg(&self.calib)
            .args(["--nsamples", &nsamples.to_string()])
            .args(["--seqlen", &seqlen.to_string(), "--quiet"])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", self.model.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    }
}

/// The `.safetensors` files of a folder, by name, with their bytes.
pub fn safetensors_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Run the binary offline with `HF_HOME` at `home` and no `BITSMITH_DATA_DIR`.
pub fn bitsmith_offline(args: &[&str], home: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(args)
        .env("HF_HOME", home)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("BITSMITH_DATA_DIR")
        .output()
        .expect("run bitsmith")
}

/// Fail with the run's stderr unless it succeeded; its last stdout line parsed as JSON
/// (`Null` when it is not JSON).
pub fn succeeded(o: &std::process::Output, what: &str) -> Value {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{what} failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or(Value::Null)
}

/// Fail unless the run failed; its stderr.
pub fn failed(o: &std::process::Output, what: &str) -> String {
    assert!(!o.status.success(), "{what} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every tensor of a GGUF as candle decodes it: (type, HF-order shape, values).
pub fn candle_tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<f32>)> {
    let mut f = std::fs::File::open(path).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let names: Vec<String> = c.tensor_infos.keys().cloned().collect();
    names
        .into_iter()
        .map(|n| {
            let q = c.tensor(&mut f, &n, &candle_core::Device::Cpu).unwrap();
            let ty = format!("{:?}", q.dtype());
            let t = q.dequantize(&candle_core::Device::Cpu).unwrap();
            let shape = t.dims().to_vec();
            (n, (ty, shape, t.flatten_all().unwrap().to_vec1().unwrap()))
        })
        .collect()
}

/// `layers` written in the GPTQ layout to `<temp>/packed` and committed (empty provenance):
/// the temporary root (removed on drop) and the folder.
pub fn write_gptq_folder(
    files: &bitsmith::loader::ModelFiles,
    config: &bitsmith::loader::ModelConfig,
    store: &bitsmith::loader::WeightStore,
    layers: &[(
        bitsmith::model::LinearSpec,
        bitsmith::quant::QuantizedLinear,
    )],
    qcfg: &bitsmith::pack::GptqConfig,
    max_shard_bytes: u64,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let out = bitsmith::pack::OutputFolder::create(&root.path().join("packed"), false).unwrap();
    bitsmith::pack::write_gptq_model(
        &out,
        files,
        config,
        store,
        layers,
        qcfg,
        json!({}),
        max_shard_bytes,
    )
    .unwrap();
    let path = out.commit().unwrap();
    (root, path)
}

/// A synthetic model (weights of seed 7) quantized by RTN on `bits`/`group`/`sym` and
/// written as a GPTQ-layout folder: the source's pieces, the codes and the packed folder.
pub struct RtnPacked {
    pub _source: tempfile::TempDir,
    pub config: bitsmith::loader::ModelConfig,
    pub store: bitsmith::loader::WeightStore,
    pub layers: Vec<(
        bitsmith::model::LinearSpec,
        bitsmith::quant::QuantizedLinear,
    )>,
    pub _root: tempfile::TempDir,
    pub packed: std::path::PathBuf,
}

pub fn rtn_packed(
    s: &Synth,
    bits: u8,
    group: bitsmith::quant::GroupSize,
    sym: bool,
    zeros: bitsmith::pack::ZeroConvention,
    lm_head: bool,
) -> RtnPacked {
    let src = tempfile::tempdir().unwrap();
    s.write(src.path(), 7, false);
    let files = bitsmith::loader::resolve_model(src.path().to_str().unwrap(), None).unwrap();
    let config = bitsmith::loader::ModelConfig::from_file(&files.config).unwrap();
    let store = bitsmith::loader::WeightStore::open(&files.weights).unwrap();
    let grid = bitsmith::quant::UniformGrid::new(bits, group, sym).unwrap();
    let q = bitsmith::quant::quantize_model(
        &config,
        &store,
        &bitsmith::quant::Rtn { grid },
        &bitsmith::quant::QuantizeOptions {
            include_lm_head: lm_head,
            progress: false,
        },
    )
    .unwrap();
    let qcfg = bitsmith::pack::GptqConfig {
        bits,
        group_size: group,
        sym,
        desc_act: false,
        lm_head,
        zeros,
        meta: json!({}),
    };
    let (root, packed) = write_gptq_folder(&files, &config, &store, &q.layers, &qcfg, 1 << 14);
    RtnPacked {
        _source: src,
        config,
        store,
        layers: q.layers,
        _root: root,
        packed,
    }
}

/// The first CUDA device, or `None` with a `SKIPPED` message (GPU tests on a machine
/// without one).
#[cfg(feature = "cuda")]
pub fn cuda_or_skip() -> Option<candle_core::Device> {
    match candle_core::Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device could be opened ({e}); nothing was run");
            None
        }
    }
}
