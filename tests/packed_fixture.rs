//! The real fixture (SmolLM2-135M, see `fixture_smollm2.rs` for how it is found): a model
//! quantized with RTN w4g128 evaluates to the same perplexity with packed weights (bitsmith
//! kernels) as dequantized, on a bounded slice (2 windows of 512 tokens).

mod common;

use bitsmith::infer::{load_model_with, WeightMode};
use bitsmith::loader::resolve_model;
use bitsmith::model::{LinearWeight, LogitsFor};
use candle_core::{DType, Device, Tensor};
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
    // serving keeps the tied bf16 head in bf16 and decodes through the fused CPU step;
    // its logits follow the candle-ops step on real text
    assert!(
        matches!(model.lm_head.weights(), LinearWeight::Packed(k) if k.describe().starts_with("bf16")),
        "the exactly-bf16 head was not kept in bf16"
    );
    assert!(bitsmith::model::decode::eligible(&model, 1));
    let mut ops = model.clone();
    ops.set_fused_decode(false);
    let prompt: Vec<u32> = (0..24).map(|i| 1000 + 37 * i).collect();
    let (mut c1, mut c2) = (model.new_cache(64), ops.new_cache(64));
    let mut worst = 0f32;
    let mut next = Tensor::from_vec(prompt.clone(), (1, prompt.len()), &Device::Cpu).unwrap();
    for step in 0..8 {
        let a = model
            .forward_cached(&next, &mut c1, LogitsFor::Last)
            .unwrap();
        let b = ops.forward_cached(&next, &mut c2, LogitsFor::Last).unwrap();
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        worst = worst.max(diff);
        let token = b
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        assert!(step > 0 || c1.len() == prompt.len());
        next = Tensor::from_vec(vec![token], (1, 1), &Device::Cpu).unwrap();
    }
    assert!(
        worst < 1e-4,
        "fused vs candle-ops decode: max relative |Δlogit| {worst}"
    );
    drop((model, ops));

    let ppl = |extra: &[&str]| {
        let mut args = vec!["ppl", out_s, "--seqlen", "512", "--limit", "2", "--json"];
        args.extend_from_slice(extra);
        let v = bitsmith(&args);
        assert_eq!(v["windows"], 2, "{v}");
        v["ppl"].as_f64().expect("ppl in the JSON")
    };
    let (packed, dense) = (
        ppl(&["--weights", "packed"]),
        ppl(&["--weights", "dequantized"]),
    );
    let rel = (packed - dense).abs() / dense;
    assert!(
        rel <= 1e-3,
        "packed ppl {packed} vs dequantized {dense}: relative difference {rel:.2e} > 1e-3"
    );
    // int8 activations (llama.cpp's arithmetic) cost a little, and do run: the figure moves
    let int8 = ppl(&["--kernels", "int8"]);
    let rel = (int8 - dense).abs() / dense;
    assert!(
        int8 != packed && rel <= 1e-2,
        "int8-activation ppl {int8} vs exact {dense}: relative difference {rel:.2e}"
    );
}

/// NUPES (data-free, power grid w4g128) in the codebook format: the packed load runs the
/// lookup-table kernel, its perplexity equals the dequantized load's, and `inspect` shows
/// every layer's exponent within the searched range.
#[test]
fn codebook_packed_matches_dequantized_perplexity() {
    fixture_env();
    let work = tempfile::tempdir().expect("tempdir");
    let out = work.path().join("nupes-w4g128");
    let out_s = out.to_str().expect("utf-8 temp path");
    bitsmith(&[
        "quantize",
        REPO,
        "--method",
        "nupes",
        "--bits",
        "4",
        "--group-size",
        "128",
        "-o",
        out_s,
    ]);
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
        matches!(down.weights(), LinearWeight::Packed(k) if k.describe().starts_with("bitsmith lut")),
        "packed mode did not load down_proj on the lookup-table kernel"
    );
    // decoding one token at a time runs the lookup GEMV: its logits follow the dequantized
    // model's
    let dense = load_model_with(&files, DType::F32, &Device::Cpu, WeightMode::Dequantized)
        .expect("dequantized load");
    let prompt: Vec<u32> = (0..24).map(|i| 1000 + 37 * i).collect();
    let (mut c1, mut c2) = (model.new_cache(64), dense.new_cache(64));
    let mut next = Tensor::from_vec(prompt.clone(), (1, prompt.len()), &Device::Cpu).unwrap();
    let mut worst = 0f32;
    for _ in 0..8 {
        let a = model
            .forward_cached(&next, &mut c1, LogitsFor::Last)
            .unwrap();
        let b = dense
            .forward_cached(&next, &mut c2, LogitsFor::Last)
            .unwrap();
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        worst = worst.max(diff);
        let token = b
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        next = Tensor::from_vec(vec![token], (1, 1), &Device::Cpu).unwrap();
    }
    assert!(
        worst < 1e-4,
        "lookup-table decode vs dequantized: max relative |Δlogit| {worst}"
    );
    drop((model, dense));

    let inspect = std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(["inspect", out_s, "--summary"])
        .output()
        .expect("inspect runs");
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "{text}");
    let exponents: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split_once(" a ").map(|(_, r)| r))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(exponents.len(), 210, "{text}");
    assert!(
        exponents.iter().all(|&a| (0.2..=1.0).contains(&a)),
        "{exponents:?}"
    );

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
        "codebook packed ppl {packed} vs dequantized {dense}: relative difference {rel:.2e} > 1e-3"
    );
}
