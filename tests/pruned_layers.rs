//! A BAQ model whose layers are fully pruned (every column width 0: `--allowed-bits 0`, the
//! only width allowed, with a budget that covers the 40 bits per column of permutation and
//! width; or a model-wide budget that gives a layer nothing) is a valid model: it is written, and
//! `ppl`, `generate`, `bench` and `inspect` run on it on every weight path. Each pruned
//! linear contributes exactly zero, so the packed and dequantized paths agree bit for bit
//! in what they multiply and their perplexities match.

mod common;

use common::{bitsmith_offline, synthetic_text, write_tokenizer, Synth};
use std::process::Output;

fn ok(o: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("panicked"), "{what} panicked:\n{stderr}");
    assert!(o.status.success(), "{what} failed:\n{stderr}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ppl_of(stdout: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    v["ppl"].as_f64().expect("ppl in the JSON")
}

#[test]
fn fully_pruned_baq_model_loads_and_runs_everywhere() {
    let work = tempfile::tempdir().unwrap();
    let (src, out) = (work.path().join("src"), work.path().join("out"));
    let s = Synth::default();
    s.write(&src, 3, false);
    write_tokenizer(&src, s.vocab);
    let text = work.path().join("text.txt");
    std::fs::write(&text, synthetic_text(s.vocab, 2000, 5)).unwrap();
    let (src_s, out_s, text_s) = (
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        text.to_str().unwrap(),
    );
    ok(
        &bitsmith_offline(
            &[
                "quantize",
                src_s,
                "-o",
                out_s,
                "--method",
                "baq",
                "--bits",
                "2",
                "--allowed-bits",
                "0",
                "--calib",
                text_s,
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--quiet",
            ],
            work.path(),
        ),
        "quantize",
    );
    // the model really is pruned: every quantized linear stores widths only, all 0
    let st = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let widths: Vec<_> = st
        .names()
        .into_iter()
        .filter(|n| n.ends_with(".col_widths"))
        .collect();
    assert_eq!(widths.len(), 7 * s.layers);
    for n in widths {
        assert!(st.tensor(n).unwrap().data().iter().all(|&b| b == 0), "{n}");
    }
    assert!(!st
        .names()
        .iter()
        .any(|n| n.contains(".w") && n.ends_with("qweight")));

    let ppl = |extra: &[&str]| -> Output {
        let mut args = vec!["ppl", out_s, "--text", text_s, "--seqlen", "32", "--json"];
        args.extend_from_slice(extra);
        bitsmith_offline(&args, work.path())
    };
    let packed = ppl_of(&ok(&ppl(&[]), "ppl (packed)"));
    let bitsmith_kernels = ppl_of(&ok(&ppl(&["--kernels", "bitsmith"]), "ppl (bitsmith)"));
    let dequantized = ppl_of(&ok(
        &ppl(&["--weights", "dequantized"]),
        "ppl (dequantized)",
    ));
    assert!(packed.is_finite() && packed > 1.0, "{packed}");
    assert_eq!(packed, bitsmith_kernels);
    // W = 0 in every quantized linear: the int8 route's products are exactly 0 too
    let int8 = ppl_of(&ok(&ppl(&["--kernels", "int8"]), "ppl (int8)"));
    assert_eq!(packed, int8);
    assert!(
        (packed - dequantized).abs() <= 1e-4 * dequantized,
        "packed {packed} vs dequantized {dequantized}"
    );
    // no GGML block type has a width per column: a clear error, not a panic
    let o = ppl(&["--kernels", "ggml"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(stderr.contains("no GGML block type"), "{stderr}");

    ok(
        &bitsmith_offline(
            &[
                "generate",
                out_s,
                "--prompt",
                "w1 w2 w3",
                "--raw",
                "--max-tokens",
                "4",
                "--temperature",
                "0",
            ],
            work.path(),
        ),
        "generate",
    );
    ok(
        &bitsmith_offline(
            &["bench", out_s, "--prompt-len", "8", "--gen", "2", "--json"],
            work.path(),
        ),
        "bench",
    );
    let shown = ok(
        &bitsmith_offline(&["inspect", out_s, "--summary"], work.path()),
        "inspect",
    );
    assert!(shown.contains("0b:64"), "{shown}");
}
