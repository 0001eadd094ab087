//! A packed model with a corrupt value or a config that contradicts its tensors: `ppl`
//! stops with an error naming the tensor and the file (exit code ≠ 0, no panic) instead
//! of printing NaN with exit code 0; where the tensors settle the question (symmetric
//! config over asymmetric zero points) it warns and uses the tensors.

mod common;

use common::{rewrite_tensors, synthetic_text, write_tokenizer, Synth};
use safetensors::Dtype;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bitsmith(args: &[&str], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(args)
        .env("HF_HOME", home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run bitsmith")
}

/// A packed 4-bit, group-32 asymmetric RTN model of a synthetic Llama, and a text file.
struct Packed {
    dir: tempfile::TempDir,
    model: PathBuf,
    text: PathBuf,
}

fn packed() -> Packed {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let s = Synth::default();
    s.write(&src, 9, false);
    write_tokenizer(&src, s.vocab);
    let model = dir.path().join("packed");
    let o = bitsmith(
        &[
            "quantize",
            src.to_str().unwrap(),
            "-o",
            model.to_str().unwrap(),
            "--bits",
            "4",
            "--group-size",
            "32",
            "--quiet",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = dir.path().join("text.txt");
    std::fs::write(&text, synthetic_text(s.vocab, 600, 2)).unwrap();
    Packed { dir, model, text }
}

impl Packed {
    /// A copy of the packed model with `edit` applied to its tensors and `config` to its
    /// config.json.
    fn variant(
        &self,
        edit: impl FnMut(&str, Dtype, &mut Vec<u8>),
        config: impl FnOnce(&mut Value),
    ) -> tempfile::TempDir {
        let copy = tempfile::tempdir_in(self.dir.path()).unwrap();
        for e in std::fs::read_dir(&self.model).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
        }
        rewrite_tensors(&copy.path().join("model.safetensors"), edit);
        let cfg_path = copy.path().join("config.json");
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        config(&mut cfg);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        copy
    }

    fn ppl(&self, model: &Path) -> Output {
        bitsmith(
            &[
                "ppl",
                model.to_str().unwrap(),
                "--text",
                self.text.to_str().unwrap(),
                "--seqlen",
                "32",
                "--json",
            ],
            self.dir.path(),
        )
    }

    /// `ppl` on a variant (see [`Packed::variant`]).
    fn ppl_of_variant(
        &self,
        edit: impl FnMut(&str, Dtype, &mut Vec<u8>),
        config: impl FnOnce(&mut Value),
    ) -> Output {
        let v = self.variant(edit, config);
        self.ppl(v.path())
    }
}

/// The command failed cleanly, and its message holds every one of `want`.
fn fails_with(o: &Output, want: &[&str]) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a failure, got:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for w in want {
        assert!(stderr.contains(w), "stderr lacks `{w}`:\n{stderr}");
    }
}

/// Set f16 element `i` of a tensor named `name` to `bits`.
fn set_f16(name: &'static str, i: usize, bits: u16) -> impl FnMut(&str, Dtype, &mut Vec<u8>) {
    move |n, dtype, bytes| {
        if n == name {
            assert_eq!(dtype, Dtype::F16);
            bytes[2 * i..2 * i + 2].copy_from_slice(&bits.to_le_bytes());
        }
    }
}

const SCALES: &str = "model.layers.1.mlp.up_proj.scales";

#[test]
fn corrupt_values_are_errors_naming_tensor_and_file() {
    let p = packed();
    let keep = |_: &mut Value| {};
    // the intact model works: the failures below are the corruption's
    let o = p.ppl_of_variant(|_, _, _| {}, keep);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let nan = 0x7E00u16;
    let inf = 0x7C00u16;
    fails_with(
        &p.ppl_of_variant(set_f16(SCALES, 70, nan), keep),
        &[SCALES, "model.safetensors", "NaN at element 70"],
    );
    fails_with(
        &p.ppl_of_variant(set_f16(SCALES, 3, inf), keep),
        &[SCALES, "model.safetensors", "inf at element 3"],
    );
    fails_with(
        &p.ppl_of_variant(set_f16(SCALES, 100, 0), keep),
        &[
            "model.layers.1.mlp.up_proj",
            "model.safetensors",
            "scales[group 1, row 4] is 0 (zero)",
        ],
    );
    // a float tensor kept unquantized
    let embed = "model.embed_tokens.weight";
    fails_with(
        &p.ppl_of_variant(
            |n, _, bytes| {
                if n == embed {
                    bytes[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
                }
            },
            keep,
        ),
        &[embed, "NaN at element 10"],
    );
}

#[test]
fn config_that_contradicts_the_tensors_is_an_error_or_a_named_warning() {
    let p = packed();
    let none = |_: &str, _: Dtype, _: &mut Vec<u8>| {};
    let group_64 = p.variant(none, |c| c["quantization_config"]["group_size"] = 64.into());
    let said = [
        "model.layers.0.self_attn.q_proj.scales",
        "has 2 rows of scales",
        "group_size 64 means 1 groups",
    ];
    fails_with(&p.ppl(group_64.path()), &said);
    // `inspect` does not show a contradicted config as if it held
    fails_with(
        &bitsmith(
            &["inspect", group_64.path().to_str().unwrap(), "--summary"],
            p.dir.path(),
        ),
        &said,
    );
    fails_with(
        &p.ppl_of_variant(none, |c| c["quantization_config"]["bits"] = 2.into()),
        &[
            "model.layers.0.self_attn.q_proj.qweight",
            "quantization_config.bits 2",
            "fits 4-bit codes",
        ],
    );
    fails_with(
        &p.ppl_of_variant(none, |c| c["quantization_config"]["sym"] = "false".into()),
        &["quantization_config.sym must be true or false"],
    );
    // asymmetric zero points under `sym: true`: the stored zero points define the weights
    let want: Value = serde_json::from_slice(&p.ppl_of_variant(none, |_| {}).stdout).unwrap();
    let o = p.ppl_of_variant(none, |c| c["quantization_config"]["sym"] = true.into());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("quantization_config.sym is true")
            && stderr.contains("the stored zero points are used"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("warning:").count(),
        1,
        "one warning: {stderr}"
    );
    let got: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(got["ppl"], want["ppl"]);
}

/// Finite weights can still overflow (every input-norm weight 3e38): the forward's NaN is
/// an error in `ppl` and `generate`, not a number or text printed with exit code 0.
#[test]
fn overflow_in_the_forward_is_an_error_not_nan() {
    let p = packed();
    let norm = "model.layers.0.input_layernorm.weight";
    let v = p.variant(
        |n, _, bytes| {
            if n == norm {
                for c in bytes.chunks_exact_mut(4) {
                    c.copy_from_slice(&3e38f32.to_le_bytes());
                }
            }
        },
        |_| {},
    );
    fails_with(&p.ppl(v.path()), &["non-finite loss", "NaN or infinite"]);
    let generate = |weights: &str| {
        bitsmith(
            &[
                "generate",
                v.path().to_str().unwrap(),
                "--prompt",
                "w1 w2 w3",
                "--raw",
                "--max-tokens",
                "3",
                "--temperature",
                "0",
                "--weights",
                weights,
            ],
            p.dir.path(),
        )
    };
    fails_with(&generate("packed"), &["logits are not finite"]);
    fails_with(&generate("dequantized"), &["logits are not finite"]);
}
