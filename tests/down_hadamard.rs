//! The online Hadamard before down_proj (`--transform down-hadamard`): the transformed
//! float model computes what the original does — alone and with the residual rotation in
//! either order — on Llama, Qwen2 (q/k/v biases) and Mistral (GQA, tied embeddings, a
//! sliding window); without the online op the same weights compute something else; a
//! GPTQ run on the transformed model is written with the op declared and reloads (dense
//! and packed) as computed in memory; `bitsmith quantize --transform down-hadamard` warns
//! that foreign GPTQ loaders ignore the op, and the exports for them refuse the model.

mod common;

use bitsmith::calibration::CalibrationSet;
use bitsmith::infer::{load_model_with, WeightMode};
use bitsmith::loader::config::ONLINE_HADAMARD_KEY;
use bitsmith::loader::{resolve_model, ModelConfig, WeightStore};
use bitsmith::model::CausalLm;
use bitsmith::pack::{
    codes_refs, quantization_config, write_quantized_model, OutputFolder, ZeroConvention,
};
use bitsmith::quant::grid::RangeFit;
use bitsmith::quant::recipe::{
    AllocationSpec, CalibrationSpec, GptqSpec, Recipe, RoundingSpec, TransformSpec,
};
use bitsmith::quant::transform::{DownProjHadamard, HadamardRotation, Transform, TransformContext};
use bitsmith::quant::{quantize, GridSpec, GroupSize, RunOptions, SourceModel};
use candle_core::{DType, Device};
use common::{logits, max_rel_diff, Synth};
use serde_json::json;

fn cases() -> Vec<Synth> {
    vec![
        // d_ff 96 = 8·12 (a Paley factor), GQA 4/2, tied head
        Synth::default(),
        // d_ff 64 (a power of two), q/k/v biases, untied head
        Synth {
            arch: "Qwen2ForCausalLM",
            hidden: 96,
            heads: 6,
            kv_heads: 2,
            intermediate: 64,
            tied: false,
            ..Synth::default()
        },
        // d_ff 80 = 4·20, GQA 4/1, tied head, sliding window, bf16 weights
        Synth {
            arch: "MistralForCausalLM",
            intermediate: 80,
            kv_heads: 1,
            sliding_window: Some(5),
            bf16: true,
            ..Synth::default()
        },
    ]
}

fn load(config: &ModelConfig, store: &WeightStore) -> CausalLm {
    CausalLm::load_dense(config, store, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn down_hadamard_float_model_computes_the_same_function() {
    for (i, s) in cases().into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        s.write(dir.path(), 30 + i as u64, false);
        let source = SourceModel::open(dir.path().to_str().unwrap(), None).unwrap();
        let want = logits(&load(&source.config, &source.store), &s.probe_ids());
        let t = DownProjHadamard
            .apply(&source.config, &source.store, &TransformContext::none())
            .unwrap();
        assert!(t.config.online_hadamard_down, "{}", s.arch);
        assert_eq!(t.config.raw[ONLINE_HADAMARD_KEY], json!(["mlp.down_proj"]));
        let model = load(&t.config, &t.store);
        assert!(model.blocks.iter().all(|b| b.mlp.down_input.is_some()));
        let rel = max_rel_diff(&logits(&model, &s.probe_ids()), &want);
        assert!(
            rel < 1e-4,
            "{}: logits differ by {rel:e} (relative)",
            s.arch
        );

        // the config written out parses back to a model with the op
        let reparsed = dir.path().join("rewritten.json");
        std::fs::write(&reparsed, t.config.raw.to_string()).unwrap();
        assert!(
            ModelConfig::from_file(&reparsed)
                .unwrap()
                .online_hadamard_down
        );

        // the rotated weights without the online op: another function
        let mut bare = t.config.clone();
        bare.online_hadamard_down = false;
        let rel = max_rel_diff(&logits(&load(&bare, &t.store), &s.probe_ids()), &want);
        assert!(
            rel > 1e-2,
            "{}: the rotation changed nothing ({rel:e})",
            s.arch
        );

        // and a second application is refused: the model has one online op
        let again = DownProjHadamard.apply(&t.config, &t.store, &TransformContext::none());
        let e = format!("{:#}", again.err().expect("a second down_hadamard"));
        assert!(e.contains(ONLINE_HADAMARD_KEY), "{e}");
    }
}

#[test]
fn down_hadamard_composes_with_the_residual_rotation_in_either_order() {
    for (i, s) in cases().into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        s.write(dir.path(), 50 + i as u64, false);
        let source = SourceModel::open(dir.path().to_str().unwrap(), None).unwrap();
        let want = logits(&load(&source.config, &source.store), &s.probe_ids());
        let residual = HadamardRotation {
            seed: 9,
            f32_head: true,
        };
        let orders: [[&dyn Transform; 2]; 2] = [
            [&residual, &DownProjHadamard],
            [&DownProjHadamard, &residual],
        ];
        let mut downs = vec![];
        for order in orders {
            let (mut config, mut store) = (source.config.clone(), source.store.clone());
            for t in order {
                let out = t.apply(&config, &store, &TransformContext::none()).unwrap();
                (config, store) = (out.config, out.store);
            }
            assert!(config.online_hadamard_down && !config.tie_word_embeddings);
            let rel = max_rel_diff(&logits(&load(&config, &store), &s.probe_ids()), &want);
            let names: Vec<_> = order.iter().map(|t| t.name()).collect();
            assert!(
                rel < 1e-4,
                "{} {names:?}: logits differ by {rel:e} (relative)",
                s.arch
            );
            let down = "model.layers.1.mlp.down_proj.weight";
            downs.push(store.f32_vec(down, &[s.hidden, s.intermediate]).unwrap());
        }
        // the two rotations act on different sides of down_proj's weight: they commute
        let diff = downs[0]
            .iter()
            .zip(&downs[1])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-5, "{}: orders differ by {diff}", s.arch);
    }
}

#[test]
fn gptq_on_the_transformed_model_is_written_with_the_op_and_reloads_as_computed() {
    let s = Synth::default();
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 7, false);
    let source = SourceModel::open(dir.path().to_str().unwrap(), None).unwrap();
    let recipe = Recipe {
        transforms: vec![
            TransformSpec::Hadamard {
                seed: 2,
                f32_head: false,
            },
            TransformSpec::DownHadamard,
        ],
        allocation: AllocationSpec::Uniform {
            grid: GridSpec::Uniform {
                bits: 4,
                group_size: GroupSize::Columns(32),
                sym: true,
                range: RangeFit::MinMax,
            },
        },
        rounding: RoundingSpec::Gptq(GptqSpec::default()),
        calibration: CalibrationSpec::default(),
        lm_head: false,
    };
    let segments = (0..6)
        .map(|i| {
            (0..24)
                .map(|t| ((t * 31 + i * 17 + 5) % s.vocab) as u32)
                .collect()
        })
        .collect();
    let cal = CalibrationSet {
        segments,
        seqlen: 24,
        description: "synthetic".into(),
    };
    let q = quantize(&source, &recipe, Some(&cal), &RunOptions::default()).unwrap();
    assert!(q.config.online_hadamard_down);
    let mut mem = load(&q.config, &q.store);
    for (spec, codes) in &q.layers {
        mem.set_linear_weights(&spec.name, codes.dequantize())
            .unwrap();
    }
    let want = logits(&mem, &s.probe_ids());

    let out_root = tempfile::tempdir().unwrap();
    let target = out_root.path().join("packed");
    let out = OutputFolder::create(&target, false).unwrap();
    let refs = codes_refs(&q.layers).unwrap();
    write_quantized_model(
        &out,
        &source.files,
        &q.config,
        &q.store,
        &refs,
        ZeroConvention::V1,
        &quantization_config(&recipe, ZeroConvention::V1).unwrap(),
        json!({ "recipe": recipe }),
        1 << 20,
    )
    .unwrap();
    out.commit().unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(target.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(written[ONLINE_HADAMARD_KEY], json!(["mlp.down_proj"]));
    let files = resolve_model(target.to_str().unwrap(), None).unwrap();
    for mode in [
        WeightMode::Dequantized,
        WeightMode::Packed(Default::default()),
    ] {
        let m = load_model_with(&files, DType::F32, &Device::Cpu, mode).unwrap();
        assert!(m.blocks.iter().all(|b| b.mlp.down_input.is_some()));
        let rel = max_rel_diff(&logits(&m, &s.probe_ids()), &want);
        assert!(rel < 1e-4, "reloaded model differs by {rel:e}");
    }
}

/// `bitsmith ARGS` offline; its output.
fn bitsmith(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run bitsmith")
}

#[test]
fn quantize_warns_and_foreign_exports_refuse_the_online_op() {
    let s = Synth::default();
    let root = tempfile::tempdir().unwrap();
    let (model, packed) = (root.path().join("float"), root.path().join("packed"));
    s.write(&model, 4, false);
    common::write_tokenizer(&model, s.vocab);
    let o = bitsmith(&[
        "quantize",
        model.to_str().unwrap(),
        "-o",
        packed.to_str().unwrap(),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--sym",
        "--transform",
        "down-hadamard",
        "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "quantize failed: {stderr}");
    assert!(
        stderr.contains(ONLINE_HADAMARD_KEY) && stderr.contains("transformers, vLLM and GPTQModel"),
        "no warning about the online op: {stderr}"
    );
    for (format, out) in [("gguf", "m.gguf"), ("compressed-tensors", "ct")] {
        let out = root.path().join(out);
        let o = bitsmith(&[
            "export",
            packed.to_str().unwrap(),
            "--format",
            format,
            "-o",
            out.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "{format}: exported a model with the op"
        );
        assert!(
            stderr.contains(ONLINE_HADAMARD_KEY) && stderr.contains("--no-online-hadamard"),
            "{format}: {stderr}"
        );
        assert!(!out.exists(), "{format}: wrote {}", out.display());
    }
    // the same model without the op exports: the refusal is the op's, not the model's
    let plain = root.path().join("plain");
    let o = bitsmith(&[
        "quantize",
        model.to_str().unwrap(),
        "-o",
        plain.to_str().unwrap(),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--sym",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!String::from_utf8_lossy(&o.stderr).contains(ONLINE_HADAMARD_KEY));
    let out = root.path().join("plain.gguf");
    let o = bitsmith(&[
        "export",
        plain.to_str().unwrap(),
        "--no-vocab",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
