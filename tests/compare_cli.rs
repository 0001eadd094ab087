//! `ppl --kl-base`, `--save-logits` and `compare` end to end on the fixture (short windows):
//! the CLI wiring, the JSON keys, a saved base against the direct computation, and the
//! report's files.

mod common;

use common::run_cli;
use serde_json::Value;

const REPO: &str = "fixtures/SmolLM2-135M-Instruct-Q4_1-dequant";
const WINDOW: [&str; 4] = ["--seqlen", "64", "--limit", "3"];

fn f(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or_else(|| panic!("no number at {path:?} in {v}"))
}

#[test]
fn kl_base_save_logits_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let rtn = p("rtn");
    run_cli(&["quantize", REPO, "--bits", "4", "-o", &rtn, "--quiet"]);
    let with = |args: &[&str]| {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(WINDOW);
        a.extend(["--json", "--quiet"]);
        run_cli(&a)
    };
    let direct = with(&["ppl", &rtn, "--kl-base", REPO]);
    let kl = f(&direct, &["kl_divergence", "mean"]);
    assert!(kl > 0.0 && kl < 5.0, "{direct}");
    assert!(f(&direct, &["kl_divergence", "p99"]) <= f(&direct, &["kl_divergence", "max"]));
    let agree = f(&direct, &["top1_agreement"]);
    assert!(agree > 0.3 && agree < 1.0, "{direct}");
    assert!(f(&direct, &["rms_delta_p"]) > 0.0);
    assert!(f(&direct, &["ppl_base"]) < f(&direct, &["ppl"]));
    // the base's perplexity is plain `ppl`'s
    let plain = with(&["ppl", REPO]);
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    assert!(rel(f(&plain, &["ppl"]), f(&direct, &["ppl_base"])) < 1e-6);

    let logits = p("fp.logits");
    let saved = with(&["ppl", REPO, "--save-logits", &logits, "--top-k", "50"]);
    assert_eq!(saved["saved_logits"].as_str(), Some(logits.as_str()));
    let from_file = with(&["ppl", &rtn, "--kl-base", &logits]);
    // exact from a file: top-1, Δp, both perplexities; KL a lower bound
    assert_eq!(from_file["top1_agreement"], direct["top1_agreement"]);
    assert!(rel(f(&from_file, &["ppl_base"]), f(&direct, &["ppl_base"])) < 1e-9);
    assert!(
        rel(
            f(&from_file, &["rms_delta_p"]),
            f(&direct, &["rms_delta_p"])
        ) < 1e-9
    );
    let lower = f(&from_file, &["kl_divergence", "mean"]);
    assert!(lower <= kl + 1e-12 && lower > 0.5 * kl, "{lower} vs {kl}");
    assert!(f(&from_file, &["base_tail_mass", "mean"]) > 0.0);

    let out = p("report");
    let mut a = vec!["compare", &rtn, "--kl-base", REPO, "-o", &out, "--quiet"];
    a.extend(WINDOW);
    run_cli(&a);
    let md = std::fs::read_to_string(dir.path().join("report/compare.md")).unwrap();
    assert!(md.contains("| rtn w4g128 | 4.214 |"), "{md}");
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("report/compare.json")).unwrap(),
    )
    .unwrap();
    let m = &json["models"][0];
    assert!(rel(f(m, &["kl_divergence", "mean"]), kl) < 1e-12);
    assert!(f(&json, &["base", "stored_bits_per_weight"]) == 16.0);
    let png = std::fs::read(dir.path().join("report/pareto.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn a_logits_file_from_other_windows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let logits = dir.path().join("fp.logits");
    let l = logits.to_str().unwrap();
    run_cli(&[
        "ppl",
        REPO,
        "--seqlen",
        "32",
        "--limit",
        "2",
        "--save-logits",
        l,
        "--quiet",
    ]);
    common::fixture_env();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args([
            "ppl", REPO, "--seqlen", "32", "--limit", "2", "--split", "valid",
        ])
        .args(["--kl-base", l, "--quiet"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("was saved from other tokens: window 0 position"),
        "{err}"
    );
}
