//! Bad inputs: each must be a clear error naming the problem, exit code ≠ 0, and no output
//! folder left behind.

mod common;

use common::Synth;
use std::path::Path;
use std::process::{Command, Output};

fn bitsmith(args: &[&str], hf_home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(args)
        .env("HF_HOME", hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("BITSMITH_DATA_DIR")
        .output()
        .expect("run bitsmith")
}

/// Runs a `quantize` that must fail; checks the message and that nothing was written.
fn quantize_fails(model: &Path, extra: &[&str], expect: &str) {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let mut args = vec![
        "quantize",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let o = bitsmith(&args, work.path());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(
        stderr.contains(expect),
        "stderr for {args:?} lacks `{expect}`:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    Synth::default().write(dir.path(), 1, false);
    let f = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len - 100).unwrap();
    quantize_fails(dir.path(), &[], "truncated or corrupt");
}

#[test]
fn unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    Synth {
        arch: "GPT2LMHeadModel",
        ..Synth::default()
    }
    .write(dir.path(), 1, false);
    quantize_fails(
        dir.path(),
        &[],
        "unsupported architecture `GPT2LMHeadModel`",
    );
}

#[test]
fn wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let s = Synth::default();
    s.write(dir.path(), 1, false);
    // claim a wider model than the weights hold
    let mut c = s.config();
    c["intermediate_size"] = 128.into();
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    quantize_fails(dir.path(), &[], "model.layers.0.mlp.gate_proj.weight");
}

#[test]
fn unsupported_bits() {
    let dir = tempfile::tempdir().unwrap();
    Synth::default().write(dir.path(), 1, false);
    quantize_fails(dir.path(), &["--bits", "5"], "unsupported bit width 5");
}

#[test]
fn unknown_method_and_bad_group() {
    let dir = tempfile::tempdir().unwrap();
    Synth::default().write(dir.path(), 1, false);
    quantize_fails(dir.path(), &["--method", "magic"], "unknown method `magic`");
    quantize_fails(
        dir.path(),
        &["--group-size", "0"],
        "group size 0 is invalid",
    );
}

#[test]
fn missing_repo_offline() {
    let work = tempfile::tempdir().unwrap();
    let o = bitsmith(&["inspect", "no-such-org/no-such-model"], work.path());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("no-such-org/no-such-model") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
    quantize_fails(
        Path::new("no-such-org/no-such-model"),
        &[],
        "not in the Hugging Face cache",
    );
}

#[test]
fn missing_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    Synth::default().write(dir.path(), 1, false);
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "hello world").unwrap();
    let o = bitsmith(
        &[
            "ppl",
            dir.path().to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--quiet",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("has no tokenizer.json"), "{stderr}");
}

#[test]
fn missing_dataset_dir_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    Synth::default().write(dir.path(), 1, false);
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let o = bitsmith(
        &["ppl", dir.path().to_str().unwrap(), "--quiet"],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("--data-dir") && stderr.contains("BITSMITH_DATA_DIR"),
        "{stderr}"
    );
}

#[test]
fn existing_output_is_not_clobbered() {
    let dir = tempfile::tempdir().unwrap();
    Synth::default().write(dir.path(), 1, false);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), "x").unwrap();
    let o = bitsmith(
        &[
            "quantize",
            dir.path().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ],
        work.path(),
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    assert!(out.join("keep").exists());
    let o = bitsmith(
        &[
            "quantize",
            dir.path().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quiet",
            "--overwrite",
            "--group-size",
            "32",
        ],
        work.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").exists() && !out.join("keep").exists());
}

/// Option values with no meaning stop the command while parsing, before any model is
/// read (the model path here does not exist), with the valid range in the message.
#[test]
fn option_ranges_are_checked_at_parse_time() {
    let work = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["ppl", "no/model", "--limit", "0"], "1 or more"),
        (&["ppl", "no/model", "--seqlen", "1"], "2 or more"),
        (&["ppl", "no/model", "--batch", "0"], "1 or more"),
        (&["ppl", "no/model", "--limit", "-2"], "1 or more"),
        (
            &[
                "generate",
                "no/model",
                "--prompt",
                "x",
                "--temperature",
                "-1",
            ],
            "≥ 0",
        ),
        (
            &[
                "generate",
                "no/model",
                "--prompt",
                "x",
                "--temperature",
                "nan",
            ],
            "≥ 0",
        ),
        (
            &["generate", "no/model", "--prompt", "x", "--top-p", "0"],
            "greater than 0 and at most 1",
        ),
        (
            &["generate", "no/model", "--prompt", "x", "--top-p", "1.5"],
            "greater than 0 and at most 1",
        ),
        (
            &["generate", "no/model", "--prompt", "x", "--top-k", "0"],
            "1 or more",
        ),
        (
            &["generate", "no/model", "--prompt", "x", "--max-tokens", "0"],
            "1 or more",
        ),
        (
            &[
                "generate",
                "no/model",
                "--prompt",
                "x",
                "--repetition-penalty",
                "0",
            ],
            "> 0",
        ),
        (&["bench", "no/model", "--prompt-len", "0"], "1 or more"),
        (&["bench", "no/model", "--gen", "0"], "1 or more"),
        (&["bench", "no/model", "--batch", "0"], "1 or more"),
    ];
    for (args, range) in cases {
        let o = bitsmith(args, work.path());
        let stderr = String::from_utf8_lossy(&o.stderr);
        let option = args[args.len() - 2];
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: a usage error\n{stderr}"
        );
        assert!(
            stderr.contains(option) && stderr.contains(range),
            "{args:?}: stderr lacks `{option}` or `{range}`:\n{stderr}"
        );
        assert!(
            !stderr.contains("no/model"),
            "{args:?} read the model:\n{stderr}"
        );
    }
}

/// Recipe checks run before the model is even looked for (`no/model` does not exist): a
/// NaN damp, and a BAQ budget below the narrowest allowed width (which used to fail only
/// after the whole first pass).
#[test]
fn impossible_recipes_fail_before_loading() {
    let work = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--method", "gptq", "--damp", "nan"], "damp NaN"),
        (
            &["--method", "baq", "--bits", "1.0"],
            "BAQ budget 1 bits is impossible: the narrowest allowed width is 2",
        ),
        (
            &[
                "--method",
                "baq",
                "--bits",
                "2.5",
                "--allowed-bits",
                "3,4",
                "--code-bits",
            ],
            "narrowest allowed width is 3",
        ),
        // BAQ's power codebooks: BAQ only, no --sym, no 1-bit width, no FlexRound yet
        (
            &["--method", "gptq", "--codebook", "power"],
            "--codebook puts BAQ's widths on power codebooks",
        ),
        (
            &[
                "--method",
                "baq",
                "--bits",
                "3",
                "--codebook",
                "power",
                "--sym",
            ],
            "symmetric around zero by construction",
        ),
        (
            &[
                "--method",
                "baq",
                "--bits",
                "3",
                "--codebook",
                "power",
                "--allowed-bits",
                "1,2,3,4",
            ],
            "a power codebook has 2 to 8 bits",
        ),
        (
            &[
                "--method",
                "baq",
                "--bits",
                "3",
                "--codebook",
                "power",
                "--rounding",
                "flexround",
            ],
            "FlexRound does not run on BAQ's power codebooks",
        ),
    ];
    // a recipe without a GGML grid cannot be written as GGUF, nor take GGUF's --type
    let recipe = work.path().join("uniform.json");
    std::fs::write(
        &recipe,
        r#"{"allocation": {"kind": "uniform", "grid": {"kind": "uniform", "bits": 4, "group_size": 128}},
            "rounding": {"kind": "rtn"}}"#,
    )
    .unwrap();
    let recipe = recipe.to_str().unwrap();
    let gguf_of_uniform = ["--recipe", recipe, "--format", "gguf"];
    let type_with_recipe = ["--recipe", recipe, "--type", "Q4_0"];
    let recipe_cases: &[(&[&str], &str)] = &[
        (&gguf_of_uniform, "--format gguf writes GGML block types"),
        (&type_with_recipe, "cannot be used with"),
    ];
    for (extra, expect) in cases.iter().chain(recipe_cases) {
        let out = work.path().join("out");
        let mut args = vec!["quantize", "no/model", "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = bitsmith(&args, work.path());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(expect),
            "{args:?}: lacks `{expect}`:\n{stderr}"
        );
        assert!(
            !stderr.contains("no/model"),
            "{args:?} looked for the model:\n{stderr}"
        );
    }
}

#[test]
fn bad_or_unbuilt_devices_are_named() {
    let dir = tempfile::tempdir().unwrap();
    Synth::default().write(dir.path(), 1, false);
    common::write_tokenizer(dir.path(), Synth::default().vocab);
    let model = dir.path().to_str().unwrap();
    let mut cases = vec![
        (
            "tpu",
            "unknown device `tpu` (use cpu, cuda, cuda:N, metal or metal:N)",
        ),
        ("cuda:x", "device `cuda:x`: `x` is not a device number"),
        ("cpu:1", "unknown device `cpu:1`"),
    ];
    if !cfg!(feature = "cuda") {
        cases.push(("cuda", "built without the `cuda` feature"));
    }
    if !cfg!(feature = "metal") {
        cases.push(("metal:0", "built without the `metal` feature"));
    }
    for (device, expect) in cases {
        for args in [
            vec!["bench"],
            vec!["ppl"],
            vec!["generate", "--prompt", "a"],
        ] {
            let cmd = args[0];
            let args = [&args[..], &[model, "--device", device]].concat();
            let o = bitsmith(&args, dir.path());
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{cmd} --device {device} succeeded");
            assert!(stderr.contains(expect), "{cmd} --device {device}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

/// FlexRound's own switches with another method are errors, not silently ignored.
#[test]
fn flexround_switches_need_flexround() {
    let dir = tempfile::tempdir().unwrap();
    Synth::default().write(dir.path(), 1, false);
    for (method, flag) in [("gptq", "--bf16-streams"), ("rtn", "--s4")] {
        quantize_fails(dir.path(), &["--method", method, flag], "FlexRound options");
    }
}

/// A `.gguf` MODEL that is not a GGUF, or with a revision: named errors, and nothing left
/// in the cache the decode would have filled.
#[test]
fn bad_gguf_models_are_named() {
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("bad.gguf");
    std::fs::write(&bad, b"not a gguf at all").unwrap();
    let cache = work.path().join("cache");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_bitsmith"))
            .args(args)
            .env("HF_HOME", work.path())
            .env("HF_HUB_OFFLINE", "1")
            .env("BITSMITH_CACHE", &cache)
            .output()
            .expect("run bitsmith");
        assert!(!o.status.success(), "expected failure for {args:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let b = bad.to_str().unwrap();
    let e = run(&["ppl", b, "--text", b]);
    assert!(
        e.contains("bad.gguf") && e.contains("not a GGUF file"),
        "{e}"
    );
    let e = run(&["inspect", b]);
    assert!(e.contains("not a GGUF file"), "{e}");
    let out = work.path().join("out");
    let e = run(&[
        "quantize",
        b,
        "--revision",
        "main",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--revision") && e.contains("GGUF file"), "{e}");
    assert!(!out.exists());
    let cached: Vec<_> = std::fs::read_dir(cache.join("gguf"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(cached.is_empty(), "left in the cache: {cached:?}");
}
