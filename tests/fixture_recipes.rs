//! Recipes on the real model: a rotated GPTQ run records its recipe, and that record given
//! back as `--recipe` reproduces the packed weights byte for byte.

mod common;

use common::run_cli;

const REPO: &str = "fixtures/SmolLM2-135M-Instruct-Q4_1-dequant";

#[test]
fn recorded_recipe_reproduces_a_rotated_gptq_run() {
    let work = tempfile::tempdir().unwrap();
    let first = work.path().join("first");
    run_cli(&[
        "quantize",
        REPO,
        "--method",
        "gptq",
        "--bits",
        "3",
        "--group-size",
        "128",
        "--transform",
        "hadamard",
        "--nsamples",
        "4",
        "--seqlen",
        "128",
        "-o",
        first.to_str().unwrap(),
        "--quiet",
    ]);
    let provenance: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("bitsmith.json")).unwrap())
            .unwrap();
    assert_eq!(provenance["recipe"]["transforms"][0]["kind"], "hadamard");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["tie_word_embeddings"], false,
        "the rotated head is untied"
    );

    let again = work.path().join("again");
    run_cli(&[
        "quantize",
        REPO,
        "--recipe",
        first.join("bitsmith.json").to_str().unwrap(),
        "-o",
        again.to_str().unwrap(),
        "--quiet",
    ]);
    let read = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        read(&first) == read(&again),
        "--recipe did not reproduce the run"
    );

    // the rotated, quantized model evaluates (packed kernels, untied f32 head)
    let p = run_cli(&[
        "ppl",
        first.to_str().unwrap(),
        "--seqlen",
        "512",
        "--limit",
        "1",
        "--json",
    ])["ppl"]
        .as_f64()
        .unwrap();
    assert!(p.is_finite() && p > 1.0, "ppl {p}");
}
