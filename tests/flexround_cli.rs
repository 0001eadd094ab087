//! FlexRound through the real binary on a synthetic model: block-wise training resumed
//! after a kill writes the bytes an uninterrupted run writes (f32 and bf16 streams, and on
//! NUPES' power grid), and BAQ's widths rounded by FlexRound load and run.
#![cfg(unix)]

mod common;

use common::{safetensors_files, synthetic_text, CliModel, Synth};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn fixture() -> CliModel {
    let s = Synth {
        hidden: 128,
        intermediate: 256,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        ..Synth::default()
    };
    CliModel::new(&s, 4, 20_000, 2)
}

fn command(f: &CliModel, out: &Path, extra: &[&str]) -> Command {
    f.quantize(out, 16, 64, extra)
}

fn run(f: &CliModel, out: &Path, extra: &[&str]) -> Output {
    command(f, out, extra).output().expect("run bitsmith")
}

const BLOCKWISE: &[&str] = &[
    "--method",
    "flexround",
    "--bits",
    "3",
    "--group-size",
    "64",
    "--iters",
    "40",
];

#[test]
fn blockwise_resume_after_a_kill_gives_the_same_bytes() {
    resume_after_a_kill(BLOCKWISE);
}

/// The streams checkpointed in bf16 are read back exactly.
#[test]
fn blockwise_resume_with_bf16_streams_gives_the_same_bytes() {
    let args = [BLOCKWISE, &["--bf16-streams"]].concat();
    let prov = resume_after_a_kill(&args);
    assert_eq!(prov["recipe"]["rounding"]["bf16_streams"], true, "{prov}");
}

/// Runs `args` whole, then killed after its first checkpoint and resumed; the same bytes.
/// Returns the resumed run's provenance.
fn resume_after_a_kill(args: &[&str]) -> serde_json::Value {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let whole = work.path().join("whole");
    let o = run(&f, &whole, args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // the runs are `--quiet`: no per-block or per-layer log
    assert!(
        !stderr.contains("  block ") && !stderr.contains(" loss "),
        "--quiet still logged:\n{stderr}"
    );

    let out = work.path().join("out");
    let ck = work.path().join(".out.checkpoint");
    let mut a = command(&f, &out, args).spawn().unwrap();
    let t0 = Instant::now();
    while !ck.join("index.json").is_file() {
        assert!(
            a.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint; make it longer"
        );
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    a.kill().unwrap();
    a.wait().unwrap();
    let resumed = run(&f, &out, args);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from the checkpoint"), "{stderr}");
    assert_eq!(safetensors_files(&out), safetensors_files(&whole));
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bitsmith.json")).unwrap()).unwrap();
    assert_eq!(prov["recipe"]["rounding"]["kind"], "flexround", "{prov}");
    prov
}

/// NUPES' power grid rounded by block-wise FlexRound, with and without the learned
/// exponent: a codebook model, resumed exactly (a learned table is checkpointed with its
/// block).
#[test]
fn power_grid_rounded_by_blockwise_flexround_resumes_with_the_same_bytes() {
    for (rounding, method) in [
        ("flexround", "nupes+flexround"),
        ("learned", "nupes+learned"),
    ] {
        let args = [
            "--method",
            "nupes",
            "--bits",
            "3",
            "--group-size",
            "64",
            "--rounding",
            rounding,
            "--iters",
            "40",
        ];
        let prov = resume_after_a_kill(&args);
        assert_eq!(prov["method"], method, "{prov}");
        assert_eq!(
            prov["recipe"]["allocation"]["grid"]["kind"], "power",
            "{prov}"
        );
        let learned = prov["recipe"]["rounding"]["learn_exponent"].as_bool();
        assert_eq!(learned.unwrap_or(false), rounding == "learned", "{prov}");
    }
}

#[test]
fn baq_widths_rounded_by_layerwise_flexround_load_and_run() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("baq");
    let o = run(
        &f,
        &out,
        &[
            "--method",
            "baq",
            "--bits",
            "3.5",
            "--rounding",
            "flexround",
            "--reconstruct",
            "layer",
            "--init",
            "gptq",
            "--iters",
            "30",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["quantization_config"]["meta"]["method"],
        "baq+flexround"
    );
    let text = f.model.path().join("eval.txt");
    std::fs::write(&text, synthetic_text(61, 3_000, 9)).unwrap();
    let ppl = Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(["ppl", out.to_str().unwrap(), "--text"])
        .arg(&text)
        .args(["--seqlen", "64", "--json"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        ppl.status.success(),
        "{}",
        String::from_utf8_lossy(&ppl.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&ppl.stdout).unwrap();
    assert!(v["ppl"].as_f64().unwrap().is_finite(), "{v}");

    // --rounding is BAQ's; elsewhere it is an error that says so
    let bad = run(
        &f,
        &work.path().join("bad"),
        &["--method", "gptq", "--rounding", "rtn"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr)
        .contains("--rounding applies to --method baq and nupes"));
}
