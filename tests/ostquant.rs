//! OSTQuant on synthetic models: the transformed float model computes what the original
//! does for any parameter values (Llama with a tied head, Qwen2 with biases, Mistral with
//! GQA and bf16 weights; with and without the online R4); the training step's gradients
//! equal finite differences of its loss; a packed model with the online op reloads to
//! what was computed in memory.

mod common;

use bitsmith::calibration::CalibrationSet;
use bitsmith::infer::{load_model_with, WeightMode};
use bitsmith::loader::{resolve_model, SourceDType};
use bitsmith::model::CausalLm;
use bitsmith::pack::{
    codes_refs, quantization_config, write_quantized_model, OutputFolder, ZeroConvention,
};
use bitsmith::quant::recipe::{
    AllocationSpec, CalibrationSpec, Recipe, RoundingSpec, TransformSpec,
};
use bitsmith::quant::transform::ostquant::optim::StiefelAdam;
use bitsmith::quant::transform::ostquant::params::{self, OstParams, Widths};
use bitsmith::quant::transform::ostquant::train::Trainer;
use bitsmith::quant::transform::{OstQuantSpec, TransformContext};
use bitsmith::quant::{quantize, GridSpec, GroupSize, RunOptions, SourceModel};
use candle_core::{DType, Device};
use common::{logits, max_rel_diff, synthetic_text, write_tokenizer, Lcg, Synth};
use serde_json::json;
use std::path::Path;

/// Parameters far from their initialisation: rotations moved by a few Cayley steps along
/// random directions, scalings drawn from [0.5, 1.5].
fn perturbed(w: Widths, seed: u64) -> OstParams {
    let mut p = OstParams::init(w, seed).unwrap();
    let mut rng = Lcg::new(seed + 1);
    let turn = |x: &mut [f32], n: usize, rng: &mut Lcg| {
        let mut opt = StiefelAdam::new(n);
        for _ in 0..3 {
            let g = rng.vec(n * n, 1.0);
            opt.step(x, &g, 0.2);
        }
    };
    turn(&mut p.r1, w.hidden, &mut rng);
    let hd2 = w.head_dim * w.head_dim;
    for l in &mut p.layers {
        for h in 0..w.kv_heads {
            turn(&mut l.r2[h * hd2..(h + 1) * hd2], w.head_dim, &mut rng);
        }
        for v in [
            &mut l.s_qkv,
            &mut l.s_ug,
            &mut l.s_qk,
            &mut l.s_ov,
            &mut l.s_ud,
        ] {
            v.iter_mut().for_each(|x| *x = 1.0 + 0.5 * rng.next());
        }
    }
    p
}

fn cases() -> [Synth; 3] {
    [
        // tied head, GQA
        Synth::default(),
        // Qwen2: q/k/v biases, untied head, 96 = 8·12 wide
        Synth {
            arch: "Qwen2ForCausalLM",
            hidden: 96,
            heads: 6,
            kv_heads: 2,
            tied: false,
            ..Synth::default()
        },
        // Mistral, sliding window, bf16 source weights
        Synth {
            arch: "MistralForCausalLM",
            sliding_window: Some(5),
            bf16: true,
            ..Synth::default()
        },
    ]
}

fn spec(transforms: &Path, r4: bool) -> OstQuantSpec {
    OstQuantSpec {
        transforms: Some(transforms.to_path_buf()),
        online_hadamard: r4,
        ..OstQuantSpec::default()
    }
}

/// How far a model whose rotated head and embedding are rounded to bf16 may move: bf16
/// keeps 8 significant bits (unit roundoff 2^-9 ≈ 2e-3) on the two tensors every logit
/// reads; a few roundoffs, far above f32's 1e-4 and far below a wrong transform.
const BF16_HEAD_BOUND: f64 = 1e-2;

#[test]
fn transformed_float_model_computes_the_same_function() {
    for s in cases() {
        let dir = tempfile::tempdir().unwrap();
        s.write(dir.path(), 11, false);
        let source = SourceModel::open(dir.path().to_str().unwrap(), None).unwrap();
        let original =
            CausalLm::load_dense(&source.config, &source.store, DType::F32, &Device::Cpu).unwrap();
        let file = dir.path().join("t.safetensors");
        // a bf16 source keeps its head in bf16 unless asked for f32; an f32 one is f32 both ways
        let heads: &[bool] = if s.bf16 { &[true, false] } else { &[false] };
        for r4 in [false, true] {
            params::save(&file, &perturbed(Widths::of(&source.config), 3), r4, None).unwrap();
            for &f32_head in heads {
                let apply = OstQuantSpec {
                    f32_head,
                    ..spec(&file, r4)
                };
                let t = TransformSpec::Ostquant(apply)
                    .build()
                    .apply(&source.config, &source.store, &TransformContext::none())
                    .unwrap();
                assert_eq!(t.config.online_hadamard_down, r4);
                assert!(!t.config.tie_word_embeddings);
                let rounded = s.bf16 && !f32_head;
                for name in ["lm_head.weight", "model.embed_tokens.weight"] {
                    let (dtype, _, _) = t.store.read_raw(name).unwrap();
                    let want = if rounded {
                        SourceDType::BF16
                    } else {
                        SourceDType::F32
                    };
                    assert_eq!(dtype, want, "{} `{name}`", s.arch);
                }
                let model =
                    CausalLm::load_dense(&t.config, &t.store, DType::F32, &Device::Cpu).unwrap();
                let rel = max_rel_diff(
                    &logits(&model, &s.probe_ids()),
                    &logits(&original, &s.probe_ids()),
                );
                let bound = if rounded { BF16_HEAD_BOUND } else { 1e-4 };
                assert!(
                    rel < bound,
                    "{} R4 {r4}, f32 head {f32_head}: logits differ by {rel:e} (relative), bound {bound:e}",
                    s.arch
                );
                // what the model computes with is what a written model holds
                let name = "lm_head.weight";
                let (_, _, bytes) = t.store.read_raw(name).unwrap();
                let values = t.store.f32_vec(name, &[s.vocab, s.hidden]).unwrap();
                let decoded: Vec<f32> = if rounded {
                    bytes
                        .chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect()
                } else {
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                };
                assert_eq!(decoded, values, "{}", s.arch);
            }
            // transforms trained with R4 make no sense without it, and the reverse
            let e = TransformSpec::Ostquant(spec(&file, !r4))
                .build()
                .apply(&source.config, &source.store, &TransformContext::none())
                .err()
                .expect("a mismatched R4 is refused");
            assert!(format!("{e:#}").contains("R4"), "{e:#}");
            let t = TransformSpec::Ostquant(spec(&file, r4))
                .build()
                .apply(&source.config, &source.store, &TransformContext::none())
                .unwrap();
            // the weights did change
            let name = "model.layers.1.mlp.down_proj.weight";
            let shape = [s.hidden, s.intermediate];
            assert_ne!(
                t.store.f32_vec(name, &shape).unwrap(),
                source.store.f32_vec(name, &shape).unwrap()
            );
        }
    }
}

#[test]
fn the_float_student_of_its_own_teacher_has_zero_loss() {
    let s = Synth::default();
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 5, false);
    let source = SourceModel::open(dir.path().to_str().unwrap(), None).unwrap();
    let p = perturbed(Widths::of(&source.config), 9);
    for r4 in [false, true] {
        let trainer = Trainer::new(&source.config, &source.store, r4).unwrap();
        let (loss, _, _) = trainer.step(&p, &[s.probe_ids(), s.probe_ids()]).unwrap();
        assert!(loss.abs() < 1e-6, "R4 {r4}: {loss}");
    }
}

#[test]
fn step_gradients_equal_finite_differences() {
    // a float student distilled from a different teacher: the loss is smooth in every
    // parameter, so central differences check the checkpointed backward end to end
    let s = Synth {
        arch: "Qwen2ForCausalLM",
        hidden: 96,
        heads: 6,
        kv_heads: 2,
        tied: false,
        ..Synth::default()
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    s.write(a.path(), 21, false);
    s.write(b.path(), 22, false);
    let student = SourceModel::open(a.path().to_str().unwrap(), None).unwrap();
    let teacher = SourceModel::open(b.path().to_str().unwrap(), None).unwrap();
    let mut trainer =
        Trainer::with_teacher(&student.config, &student.store, &teacher.store, true).unwrap();
    trainer.top_k = 20;
    let p = perturbed(Widths::of(&student.config), 4);
    let seqs = vec![
        s.probe_ids(),
        s.probe_ids()
            .iter()
            .map(|t| (t * 5 + 1) % s.vocab as u32)
            .collect(),
    ];
    let (loss, g, _) = trainer.step(&p, &seqs).unwrap();
    assert!(loss > 1e-3, "{loss}");
    type Pick = fn(&mut OstParams) -> &mut f32;
    let h = 1e-2f32;
    let fd = |at: Pick| {
        let (mut up, mut dn) = (p.clone(), p.clone());
        *at(&mut up) += h;
        *at(&mut dn) -= h;
        (trainer.step(&up, &seqs).unwrap().0 - trainer.step(&dn, &seqs).unwrap().0)
            / (2.0 * h as f64)
    };
    // rotations: an entry moved alone leaves the orthogonal group, and the loss moves
    let rotations: [(&str, Pick); 3] = [
        ("r1[3]", |p| &mut p.r1[3]),
        ("r1[500]", |p| &mut p.r1[500]),
        ("r2 layer 1 [10]", |p| &mut p.layers[1].r2[10]),
    ];
    for (name, at) in rotations {
        let (want, got) = (fd(at), *at(&mut g.clone()) as f64);
        assert!(want.abs() > 1e-3, "{name}: {want:e}");
        assert!(
            (got - want).abs() <= 0.01 * want.abs(),
            "{name}: autograd {got:e}, finite differences {want:e}"
        );
    }
    // scalings: an exact identity of the float model whatever their values, so their
    // gradient is zero — the sum of two opposite paths (s and 1/s) that cancel only
    // when both reach the parameter
    let scalings: [(&str, Pick); 5] = [
        ("s_qkv layer 0 [7]", |p| &mut p.layers[0].s_qkv[7]),
        ("s_ug layer 1 [1]", |p| &mut p.layers[1].s_ug[1]),
        ("s_qk layer 1 [2]", |p| &mut p.layers[1].s_qk[2]),
        ("s_ov layer 0 [3]", |p| &mut p.layers[0].s_ov[3]),
        ("s_ud layer 0 [5]", |p| &mut p.layers[0].s_ud[5]),
    ];
    for (name, at) in scalings {
        let got = *at(&mut g.clone()) as f64;
        assert!(got.abs() < 1e-6 && fd(at).abs() < 1e-4, "{name}: {got:e}");
    }
    // with the weights fake-quantized the scalings matter, and get a gradient
    trainer.quant = Some(bitsmith::quant::transform::ostquant::fake_quant::FakeQuant::new(3, 0));
    let (_, gq, _) = trainer.step(&p, &seqs).unwrap();
    for (name, at) in scalings {
        assert!(
            (*at(&mut gq.clone())).abs() > 1e-6,
            "{name}: no gradient through the quantizer"
        );
    }
}

#[test]
fn packed_model_with_the_online_hadamard_reloads_as_computed() {
    let s = Synth::default();
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 3, false);
    let source = SourceModel::open(dir.path().to_str().unwrap(), None).unwrap();
    let file = dir.path().join("t.safetensors");
    params::save(&file, &perturbed(Widths::of(&source.config), 3), true, None).unwrap();
    let r = Recipe {
        transforms: vec![TransformSpec::Ostquant(spec(&file, true))],
        allocation: AllocationSpec::Uniform {
            grid: GridSpec::Uniform {
                bits: 4,
                group_size: GroupSize::PerChannel,
                sym: true,
                range: bitsmith::quant::grid::RangeFit::MinMax,
            },
        },
        rounding: RoundingSpec::Rtn,
        calibration: CalibrationSpec::default(),
        lm_head: false,
    };
    let q = quantize(&source, &r, None::<&CalibrationSet>, &RunOptions::default()).unwrap();
    let mut mem = CausalLm::load_dense(&q.config, &q.store, DType::F32, &Device::Cpu).unwrap();
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
        ZeroConvention::V2,
        &quantization_config(&r, ZeroConvention::V2).unwrap(),
        json!({ "recipe": r }),
        1 << 20,
    )
    .unwrap();
    out.commit().unwrap();
    let files = resolve_model(target.to_str().unwrap(), None).unwrap();
    for mode in [
        WeightMode::Dequantized,
        WeightMode::Packed(Default::default()),
    ] {
        let m = load_model_with(&files, DType::F32, &Device::Cpu, mode).unwrap();
        assert!(
            m.config.online_hadamard_down,
            "the online op is recorded in config.json"
        );
        let rel = max_rel_diff(&logits(&m, &s.probe_ids()), &want);
        assert!(rel < 1e-4, "reloaded differs by {rel:e}");
    }
}

/// A synthetic model with a tokenizer and a calibration text to train on (the folder
/// lives as long as the returned guard).
fn trainable_model(seed: u64) -> (tempfile::TempDir, std::path::PathBuf, SourceModel) {
    let s = Synth::default();
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), seed, false);
    write_tokenizer(dir.path(), s.vocab);
    let text = dir.path().join("calib.txt");
    std::fs::write(&text, synthetic_text(s.vocab, 5_000, 2)).unwrap();
    let source = SourceModel::open(dir.path().to_str().unwrap(), None).unwrap();
    (dir, text, source)
}

#[test]
fn training_lowers_the_loss_saves_its_state_and_resumes_it() {
    let (_dir, text, source) = trainable_model(7);
    let ost = OstQuantSpec {
        steps: 6,
        batch: 2,
        seqlen: 16,
        bits: 3,
        save_every: 2,
        top_k: 20,
        ..OstQuantSpec::default()
    };
    let recipe = |ost: &OstQuantSpec| Recipe {
        transforms: vec![TransformSpec::Ostquant(ost.clone())],
        allocation: AllocationSpec::Uniform {
            grid: GridSpec::Uniform {
                bits: 3,
                group_size: GroupSize::PerChannel,
                sym: true,
                range: bitsmith::quant::grid::RangeFit::MinMax,
            },
        },
        rounding: RoundingSpec::Rtn,
        calibration: CalibrationSpec {
            text: Some(text.clone()),
            ..CalibrationSpec::default()
        },
        lm_head: false,
    };
    let ckpt = tempfile::tempdir().unwrap();
    let options = RunOptions {
        checkpoint: Some(ckpt.path().to_path_buf()),
        ..RunOptions::default()
    };
    let first = quantize(&source, &recipe(&ost), None::<&CalibrationSet>, &options).unwrap();
    let state = ckpt
        .path()
        .join(bitsmith::quant::transform::ostquant::STATE_FILE);
    let saved = params::load(&state, Widths::of(&source.config)).unwrap();
    assert_eq!(
        saved.progress.as_ref().map(|p| p.1),
        Some(6),
        "the last save is at the end"
    );
    assert!(saved.online_hadamard);
    assert_ne!(
        saved.params,
        OstParams::init(Widths::of(&source.config), 0).unwrap(),
        "trained"
    );

    // the KL-Top loss of the trained transforms is below the initial one
    let mut trainer = Trainer::new(&source.config, &source.store, true).unwrap();
    trainer.quant = Some(bitsmith::quant::transform::ostquant::fake_quant::FakeQuant::new(3, 0));
    trainer.top_k = 20;
    // on the sequences it trained on
    let tok = bitsmith::loader::load_tokenizer(&source.files).unwrap();
    let seqs = bitsmith::calibration::sample_segments(
        &tok,
        &bitsmith::calibration::CalibrationSource::File(text.clone()),
        12,
        16,
        0,
    )
    .unwrap()
    .segments;
    let before = trainer
        .step(
            &OstParams::init(Widths::of(&source.config), 0).unwrap(),
            &seqs,
        )
        .unwrap()
        .0;
    let after = trainer.step(&saved.params, &seqs).unwrap().0;
    assert!(after < before, "loss {before} → {after}");

    // the same settings resume (at the end: nothing left to train) and give the same model
    let again = quantize(&source, &recipe(&ost), None::<&CalibrationSet>, &options).unwrap();
    for ((a, ca), (b, cb)) in first.layers.iter().zip(&again.layers) {
        assert_eq!(a.name, b.name);
        assert_eq!(ca.dequantize(), cb.dequantize(), "{}", a.name);
    }
    // other settings are refused, naming the way out
    let other = OstQuantSpec { steps: 7, ..ost };
    let e = quantize(&source, &recipe(&other), None::<&CalibrationSet>, &options)
        .err()
        .expect("a state made with other settings is refused");
    assert!(format!("{e:#}").contains("--fresh"), "{e:#}");
}

/// `--ost-init klt`: `R1`'s basis is orthogonal and diagonalises the covariance of every
/// q/k/v/gate/up row with its norm folded in, computed here in f64 from the raw tensors,
/// largest variance first; the spec reads `"init": "klt"`.
#[test]
fn klt_basis_diagonalises_the_readers_covariance() {
    use bitsmith::quant::transform::ostquant::klt::weight_klt;
    use bitsmith::quant::transform::R1Init;
    let s = Synth::default();
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 5, false);
    let source = SourceModel::open(dir.path().to_str().unwrap(), None).unwrap();
    let (h, f) = (s.hidden, s.intermediate);
    let kv = s.kv_heads * (s.hidden / s.heads);
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let norm = |n: &str| {
            source
                .store
                .f32_vec(&format!("{p}.{n}.weight"), &[h])
                .unwrap()
        };
        for (name, out, gamma) in [
            ("self_attn.q_proj", h, norm("input_layernorm")),
            ("self_attn.k_proj", kv, norm("input_layernorm")),
            ("self_attn.v_proj", kv, norm("input_layernorm")),
            ("mlp.gate_proj", f, norm("post_attention_layernorm")),
            ("mlp.up_proj", f, norm("post_attention_layernorm")),
        ] {
            let w = source
                .store
                .f32_vec(&format!("{p}.{name}.weight"), &[out, h])
                .unwrap();
            rows.extend(
                w.chunks(h)
                    .map(|r| r.iter().zip(&gamma).map(|(x, g)| (x * g) as f64).collect()),
            );
        }
    }
    let n = rows.len() as f64;
    let mean: Vec<f64> = (0..h)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n)
        .collect();
    let cov: Vec<f64> = (0..h * h)
        .map(|ij| {
            let (i, j) = (ij / h, ij % h);
            rows.iter()
                .map(|r| (r[i] - mean[i]) * (r[j] - mean[j]))
                .sum::<f64>()
        })
        .collect();
    let e = weight_klt(&source.config, &source.store).unwrap();
    let e = |i: usize, j: usize| e[i * h + j] as f64;
    // D = Eᵀ C E
    let d = |a: usize, b: usize| -> f64 {
        (0..h)
            .map(|i| e(i, a) * (0..h).map(|j| cov[i * h + j] * e(j, b)).sum::<f64>())
            .sum()
    };
    let scale = (0..h).map(|i| cov[i * h + i]).sum::<f64>() / h as f64;
    let diag: Vec<f64> = (0..h).map(|a| d(a, a)).collect();
    for a in 0..h {
        for b in 0..h {
            let ete: f64 = (0..h).map(|i| e(i, a) * e(i, b)).sum();
            let want = if a == b { 1.0 } else { 0.0 };
            assert!((ete - want).abs() < 1e-5, "EᵀE at ({a}, {b}): {ete}");
            if a != b && (a + b) % 7 == 0 {
                assert!(
                    d(a, b).abs() < 1e-4 * scale,
                    "EᵀCE off the diagonal at ({a}, {b})"
                );
            }
        }
    }
    assert!(
        diag.windows(2).all(|p| p[0] >= p[1] - 1e-6 * scale),
        "{diag:?}"
    );
    assert!(diag[0] > 1.5 * diag[h - 1], "a spread spectrum: {diag:?}");
    let spec: OstQuantSpec = serde_json::from_value(json!({"init": "klt"})).unwrap();
    assert_eq!(spec.init, R1Init::Klt);
    // the default start is the KLT; a recipe that names `hadamard` keeps it
    assert_eq!(OstQuantSpec::default().init, R1Init::Klt);
    let spec: OstQuantSpec = serde_json::from_value(json!({"init": "hadamard"})).unwrap();
    assert_eq!(spec.init, R1Init::Hadamard);
}

/// GPTQ's block looper shares the checkpoint folder with OSTQuant's training state: it
/// must leave that state in place (the CLI copies it to the output folder for
/// `--ost-transforms`), and `fresh` must discard it before training, so that a run with
/// other settings that was told to pass `--fresh` does start over.
#[test]
fn gptq_after_training_keeps_the_state_and_fresh_discards_it_first() {
    use bitsmith::quant::recipe::GptqSpec;
    let (_dir, text, source) = trainable_model(9);
    let recipe = |steps: usize| Recipe {
        transforms: vec![TransformSpec::Ostquant(OstQuantSpec {
            steps,
            batch: 1,
            seqlen: 16,
            top_k: 20,
            ..OstQuantSpec::default()
        })],
        allocation: AllocationSpec::Uniform {
            grid: GridSpec::Uniform {
                bits: 4,
                group_size: GroupSize::PerChannel,
                sym: true,
                range: bitsmith::quant::grid::RangeFit::MinMax,
            },
        },
        rounding: RoundingSpec::Gptq(GptqSpec::default()),
        calibration: CalibrationSpec {
            text: Some(text.clone()),
            nsamples: 4,
            seqlen: 16,
            ..CalibrationSpec::default()
        },
        lm_head: false,
    };
    let ckpt = tempfile::tempdir().unwrap();
    let state = ckpt
        .path()
        .join(bitsmith::quant::transform::ostquant::STATE_FILE);
    let mut options = RunOptions {
        checkpoint: Some(ckpt.path().to_path_buf()),
        ..RunOptions::default()
    };
    quantize(&source, &recipe(2), None::<&CalibrationSet>, &options).unwrap();
    let saved = params::load(&state, Widths::of(&source.config)).unwrap();
    assert_eq!(
        saved.progress.map(|p| p.1),
        Some(2),
        "the state survives GPTQ"
    );
    // other settings: refused without fresh, trained anew with it
    let e = quantize(&source, &recipe(3), None::<&CalibrationSet>, &options)
        .err()
        .expect("a state made with other settings is refused");
    assert!(format!("{e:#}").contains("--fresh"), "{e:#}");
    options.fresh = true;
    quantize(&source, &recipe(3), None::<&CalibrationSet>, &options).unwrap();
    let saved = params::load(&state, Widths::of(&source.config)).unwrap();
    assert_eq!(saved.progress.map(|p| p.1), Some(3), "fresh retrained");
}
