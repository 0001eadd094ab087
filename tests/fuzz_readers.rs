//! Seeded mutation fuzzing of what bitsmith reads from disk: the safetensors file of a
//! packed GPTQ model and of a mixed-width (BAQ) model (byte flips anywhere, flips inside
//! the header, planted f16/f32 NaN and infinity patterns, truncation), and config.json
//! (fields replaced by values of every JSON type, deleted, or the text cut). Every case
//! loads the model (packed kernels or dequantized, alternating) and measures perplexity,
//! inside `catch_unwind`; it must end in a clean `Err` or in a perplexity of a finite mean
//! loss — never a panic, never NaN returned as a result.
//!
//! The cases are fixed by a seed (`BITSMITH_FUZZ_SEED` replays or varies it) and bounded
//! (`BITSMITH_FUZZ_CASES` per target, default 300) so CI runs them in seconds. Inputs that
//! once crashed are kept in `tests/fuzz_corpus/` as edit lists against the same
//! deterministic models and replayed by `corpus_inputs_stay_fixed`.

mod common;

use bitsmith::eval::{perplexity, PplOptions};
use bitsmith::infer::Route;
use bitsmith::infer::{load_model_with, WeightMode};
use bitsmith::loader::resolve_model;
use candle_core::{DType, Device};
use common::{synthetic_text, write_tokenizer, Lcg, Synth};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;

/// xorshift64*: the mutation choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The two packed models every case starts from, written once per test process by the
/// CLI from the same synthetic source (deterministic: same bytes every run).
struct Models {
    _dir: tempfile::TempDir,
    gptq: PathBuf,
    mixed: PathBuf,
    ids: Vec<u32>,
}

fn models() -> Models {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let s = Synth::default();
    s.write(&src, 11, false);
    write_tokenizer(&src, s.vocab);
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, synthetic_text(s.vocab, 3000, 4)).unwrap();
    let quantize = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "quantize",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_bitsmith"))
            .args(&args)
            .env("HF_HOME", dir.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (gptq, mixed) = (dir.path().join("gptq"), dir.path().join("mixed"));
    quantize(&gptq, &["--bits", "4", "--group-size", "32"]);
    let calib = calib.to_str().unwrap();
    quantize(
        &mixed,
        &[
            "--method",
            "baq",
            "--bits",
            "3",
            "--allowed-bits",
            "0,2,3,4",
            "--calib",
            calib,
            "--nsamples",
            "4",
            "--seqlen",
            "32",
        ],
    );
    let mut r = Lcg::new(8);
    let ids = (0..64)
        .map(|_| ((r.next() * 0.5 + 0.5) * s.vocab as f32) as u32 % s.vocab as u32)
        .collect();
    Models {
        _dir: dir,
        gptq,
        mixed,
        ids,
    }
}

/// How a case ended when it did not panic.
#[derive(Debug)]
enum Outcome {
    /// A clean error, with its message.
    Rejected(String),
    /// Mean NLL and perplexity.
    Ppl(f64, f64),
}

/// Load `dir` and measure perplexity on `ids`; `Err` carries a panic's message.
fn run_case(dir: &Path, ids: &[u32], packed: bool) -> Result<Outcome, String> {
    let result = catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<(f64, f64)> {
        let files = resolve_model(dir.to_str().unwrap(), None)?;
        let mode = if packed {
            WeightMode::Packed(Route::Auto)
        } else {
            WeightMode::Dequantized
        };
        let model = load_model_with(&files, DType::F32, &Device::Cpu, mode)?;
        let r = perplexity(
            &model,
            ids,
            &PplOptions {
                seqlen: 16,
                batch: 2,
                limit: Some(2),
                progress: false,
            },
        )?;
        Ok((r.mean_nll, r.ppl))
    }));
    match result {
        Ok(Ok((nll, ppl))) => Ok(Outcome::Ppl(nll, ppl)),
        Ok(Err(e)) => Ok(Outcome::Rejected(format!("{e:#}"))),
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into())),
    }
}

/// One mutation of a safetensors file, as byte edits plus an optional truncation (the
/// form `tests/fuzz_corpus/` keeps).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Mutation {
    /// (offset, new byte)
    edits: Vec<(usize, u8)>,
    truncate: Option<usize>,
}

impl Mutation {
    fn random(r: &mut Rng, bytes: &[u8]) -> Self {
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut edits = vec![];
        let mut truncate = None;
        match r.below(5) {
            // a few random bytes anywhere
            0 => {
                for _ in 0..1 + r.below(8) {
                    edits.push((r.below(bytes.len()), r.next() as u8));
                }
            }
            // inside the JSON header (names, dtypes, shapes, offsets)
            1 => {
                for _ in 0..1 + r.below(4) {
                    edits.push((r.below(header), r.next() as u8));
                }
            }
            // an f16 NaN/inf exponent or an f32 NaN pattern in the data
            2 => {
                let at = header + r.below(bytes.len() - header - 4);
                let pattern: &[u8] =
                    [&[0x00, 0x7C][..], &[0x00, 0x7E], &[0x00, 0x00, 0xC0, 0x7F]][r.below(3)];
                edits.extend(pattern.iter().enumerate().map(|(i, &b)| (at + i, b)));
            }
            // single bit flips in the data (a scale or code a little off)
            3 => {
                for _ in 0..1 + r.below(16) {
                    let at = header + r.below(bytes.len() - header);
                    edits.push((at, bytes[at] ^ (1 << r.below(8))));
                }
            }
            _ => truncate = Some(r.below(bytes.len())),
        }
        Self { edits, truncate }
    }

    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        for &(at, b) in &self.edits {
            if at < out.len() {
                out[at] = b;
            }
        }
        if let Some(n) = self.truncate {
            out.truncate(n);
        }
        out
    }
}

/// A scratch copy of `model` whose files can be replaced case by case.
fn scratch(model: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
    }
    d
}

fn check(outcome: Result<Outcome, String>, what: &str) {
    match outcome {
        Err(panic) => panic!("{what}: panicked: {panic}"),
        // a corrupt but finite weight (an f32 of 1e36) gives a finite, enormous mean NLL
        // whose exp is +inf: an honest figure; NaN or a non-finite loss is not
        Ok(Outcome::Ppl(nll, p)) => assert!(
            nll.is_finite() && !p.is_nan(),
            "{what}: mean NLL {nll}, perplexity {p} returned as a result"
        ),
        Ok(Outcome::Rejected(_)) => {}
    }
}

#[test]
fn mutated_safetensors_end_in_an_error_or_a_result() {
    let m = models();
    let seed = env_or("BITSMITH_FUZZ_SEED", 16);
    let cases = env_or("BITSMITH_FUZZ_CASES", 300) as usize;
    for (name, model) in [("gptq", &m.gptq), ("mixed", &m.mixed)] {
        let original = std::fs::read(model.join("model.safetensors")).unwrap();
        let work = scratch(model);
        let file = work.path().join("model.safetensors");
        let mut r = Rng((seed ^ (name.len() as u64 * 0x9E37_79B9)) | 1);
        let (mut rejected, mut ran) = (0, 0);
        for case in 0..cases {
            let mutation = Mutation::random(&mut r, &original);
            std::fs::write(&file, mutation.apply(&original)).unwrap();
            let outcome = run_case(work.path(), &m.ids, case % 2 == 0);
            if matches!(outcome, Ok(Outcome::Rejected(_))) {
                rejected += 1;
            } else {
                ran += 1;
            }
            check(
                outcome,
                &format!(
                    "{name} case {case} (BITSMITH_FUZZ_SEED={seed}): {}",
                    serde_json::to_string(&mutation).unwrap()
                ),
            );
        }
        eprintln!("{name}: {cases} mutations, {rejected} rejected cleanly, {ran} ran to a result");
        // both outcomes occur: the mutations reach past the header checks, and the
        // checks are not so strict that nothing loads
        assert!(
            rejected > 0 && ran > 0,
            "{name}: {rejected} rejected, {ran} ran"
        );
    }
}

/// Values of every JSON type, and numbers at the edges of what a config may hold.
fn random_value(r: &mut Rng) -> Value {
    let values = [
        json!(null),
        json!(0),
        json!(1),
        json!(-1),
        json!(3),
        json!(7),
        json!(1u64 << 40),
        json!(u64::MAX),
        json!(1.5),
        json!(-1e300),
        json!(1e-300),
        json!("x"),
        json!(true),
        json!([]),
        json!({}),
    ];
    values[r.below(values.len())].clone()
}

#[test]
fn mutated_configs_end_in_an_error_or_a_result() {
    let m = models();
    let seed = env_or("BITSMITH_FUZZ_SEED", 16);
    let cases = env_or("BITSMITH_FUZZ_CASES", 300) as usize;
    for (name, model) in [("gptq", &m.gptq), ("mixed", &m.mixed)] {
        let text = std::fs::read_to_string(model.join("config.json")).unwrap();
        let original: Value = serde_json::from_str(&text).unwrap();
        let work = scratch(model);
        let mut r = Rng(seed.wrapping_add(name.len() as u64) | 1);
        for case in 0..cases {
            let mut cfg = original.clone();
            let mutated = if r.below(6) == 0 {
                // cut text: the JSON parser's errors
                text[..r.below(text.len())].to_string()
            } else {
                for _ in 0..1 + r.below(3) {
                    let in_quant = r.below(3) == 0;
                    let obj = if in_quant {
                        cfg["quantization_config"].as_object_mut()
                    } else {
                        cfg.as_object_mut()
                    };
                    let Some(obj) = obj else { continue };
                    let keys: Vec<String> = obj.keys().cloned().collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let key = keys[r.below(keys.len())].clone();
                    if r.below(5) == 0 {
                        obj.remove(&key);
                    } else {
                        obj.insert(key, random_value(&mut r));
                    }
                }
                cfg.to_string()
            };
            std::fs::write(work.path().join("config.json"), &mutated).unwrap();
            check(
                run_case(work.path(), &m.ids, case % 2 == 0),
                &format!("{name} config case {case} (BITSMITH_FUZZ_SEED={seed}): {mutated}"),
            );
        }
    }
}

/// Apply a corpus entry's `tensor_edits` (`[{"tensor", "at", "bytes"}]`: bytes written
/// at `at` within a tensor's data) to a safetensors file's bytes.
fn edit_tensors(bytes: &mut [u8], edits: &[Value]) {
    let (header, meta) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let tensors = meta.tensors();
    for e in edits {
        let name = e["tensor"].as_str().unwrap();
        let info = tensors
            .get(name)
            .unwrap_or_else(|| panic!("no tensor `{name}`"));
        let start = 8 + header + info.data_offsets.0 + e["at"].as_u64().unwrap() as usize;
        for (i, b) in e["bytes"].as_array().unwrap().iter().enumerate() {
            bytes[start + i] = b.as_u64().unwrap() as u8;
        }
    }
}

/// Inputs that once crashed a reader or came back as NaN (`tests/fuzz_corpus/README.md`
/// has the entry format); an entry with `expect_error` must be rejected with a message
/// holding it, on both weight paths.
#[test]
fn corpus_inputs_stay_fixed() {
    let m = models();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let mut entries: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "the corpus is empty");
    for path in &entries {
        let what = path.display().to_string();
        let entry: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let model = match entry["model"].as_str() {
            Some("gptq") => &m.gptq,
            Some("mixed") => &m.mixed,
            other => panic!("{what}: unknown model {other:?}"),
        };
        let work = scratch(model);
        let mut bytes = std::fs::read(model.join("model.safetensors")).unwrap();
        if let Some(mutation) = entry.get("safetensors") {
            let mutation: Mutation = serde_json::from_value(mutation.clone()).unwrap();
            bytes = mutation.apply(&bytes);
        }
        if let Some(edits) = entry.get("tensor_edits") {
            edit_tensors(&mut bytes, edits.as_array().unwrap());
        }
        std::fs::write(work.path().join("model.safetensors"), bytes).unwrap();
        let cfg_path = work.path().join("config.json");
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        if let Some(set) = entry.get("config_set").and_then(|v| v.as_object()) {
            for (dotted, v) in set {
                let mut at = &mut cfg;
                for key in dotted.split('.') {
                    at = &mut at[key];
                }
                *at = v.clone();
            }
        }
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        for packed in [true, false] {
            let outcome = run_case(work.path(), &m.ids, packed);
            if let Some(want) = entry.get("expect_error").and_then(|v| v.as_str()) {
                match &outcome {
                    Ok(Outcome::Rejected(e)) => {
                        assert!(e.contains(want), "{what}: `{e}` lacks `{want}`")
                    }
                    other => panic!("{what} (packed {packed}): expected an error, got {other:?}"),
                }
            }
            check(outcome, &what);
        }
    }
    eprintln!("replayed {} corpus inputs", entries.len());
}
