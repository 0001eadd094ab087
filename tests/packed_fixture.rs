//! The real fixture (SmolLM2-135M, see `fixture_smollm2.rs` for how it is found): a model
//! quantized with RTN w4g128 evaluates to the same perplexity with packed weights (bitsmith
//! kernels) as dequantized, on a bounded slice (2 windows of 512 tokens).

mod common;

use bitsmith::loader::resolve_model;
use bitsmith::model::{load_model_with, LinearWeight, WeightMode};
use candle_core::{DType, Device};
use common::{fixture_env, run_cli as bitsmith};

const REPO: &str = "fixtures/SmolLM2-135M-Instruct-Q4_1-dequant";

#[test]
fn packed_weights_match_dequantized_perplexity() {
    fixture_env();
    let work = tempfile::tempdir().expect("tempdir");
    let out = work.path().join("w4g128");
    let out_s = out.to_str().expect("utf-8 temp path");
    bitsmith(&[
        "quantize",
        REPO,
        "--bits",
        "4",
        "--group-size",
        "128",
        "-o",
        out_s,
    ]);

    // the packed load really holds packed layers
    let files = resolve_model(out_s, None).expect("resolve");
    let mut model = load_model_with(
        &files,
        DType::F32,
        &Device::Cpu,
        WeightMode::Packed(Default::default()),
    )
    .expect("packed load");
    let down = model
        .linear_mut("model.layers.0.mlp.down_proj")
        .expect("down_proj");
    assert!(
        matches!(down.weights(), LinearWeight::Packed(_)),
        "packed mode left down_proj dense"
    );
    drop(model);

    let ppl = |weights: &str| {
        let v = bitsmith(&[
            "ppl",
            out_s,
            "--seqlen",
            "512",
            "--limit",
            "2",
            "--weights",
            weights,
            "--json",
        ]);
        assert_eq!(v["windows"], 2, "{v}");
        v["ppl"].as_f64().expect("ppl in the JSON")
    };
    let (packed, dense) = (ppl("packed"), ppl("dequantized"));
    let rel = (packed - dense).abs() / dense;
    assert!(
        rel <= 1e-3,
        "packed ppl {packed} vs dequantized {dense}: relative difference {rel:.2e} > 1e-3"
    );
}
