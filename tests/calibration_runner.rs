//! The layer-by-layer runner on small synthetic models: its Hessians equal those captured
//! from a whole-model forward, GPTQ through it reloads exactly, and an interrupted run
//! resumes from its checkpoint with the same result.

mod common;

use anyhow::{bail, Result};
use bitsmith::calibration::{embed_segments, run_block, CalibrationSet, GroupInput, RunnerOptions};
use bitsmith::loader::{resolve_model, ModelConfig, WeightStore};
use bitsmith::model::CausalLm;
use bitsmith::quant::checkpoint::Checkpoint;
use bitsmith::quant::{
    quantize_model_calibrated, CalibratedOptions, Gptq, GptqOptions, GroupSize, LayerQuantizer,
    LayerResult, LayerToQuantize, UniformGrid,
};
use candle_core::{DType, Device, Tensor};
use common::Synth;
use serde_json::json;

fn setup(s: &Synth) -> (tempfile::TempDir, ModelConfig, WeightStore) {
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 21, false);
    let files = resolve_model(dir.path().to_str().unwrap(), None).unwrap();
    let config = ModelConfig::from_file(&files.config).unwrap();
    let store = WeightStore::open(&files.weights).unwrap();
    (dir, config, store)
}

fn calib(s: &Synth, n: usize, len: usize) -> CalibrationSet {
    let segments = (0..n)
        .map(|i| {
            (0..len)
                .map(|t| ((t * 31 + i * 17 + 5) % s.vocab) as u32)
                .collect()
        })
        .collect();
    CalibrationSet {
        segments,
        seqlen: len,
        description: "synthetic".into(),
    }
}

/// `2/N Σ xᵀx` in f64 over a list of `[1, seq, d]` activations.
fn gram(xs: &[Tensor]) -> Vec<f64> {
    let d = xs[0].dim(2).unwrap();
    let mut h = vec![0f64; d * d];
    let mut n = 0;
    for x in xs {
        let rows: Vec<Vec<f32>> = x.squeeze(0).unwrap().to_vec2().unwrap();
        n += rows.len();
        for r in &rows {
            for i in 0..d {
                for j in 0..d {
                    h[i * d + j] += r[i] as f64 * r[j] as f64;
                }
            }
        }
    }
    h.iter().map(|v| v * 2.0 / n as f64).collect()
}

#[test]
#[allow(clippy::needless_range_loop)]
fn runner_hessians_equal_whole_model_capture() {
    let s = Synth::default();
    let (_dir, config, store) = setup(&s);
    let cal = calib(&s, 3, 9);
    let model = CausalLm::load_dense(&config, &store, DType::F32, &Device::Cpu).unwrap();
    // capture every linear's input from the whole model, block after block
    let mut expected: Vec<Vec<Vec<f64>>> = vec![];
    let mut xs: Vec<Tensor> = cal
        .segments
        .iter()
        .map(|seg| {
            model
                .embed(&Tensor::from_slice(seg, (1, seg.len()), &Device::Cpu).unwrap())
                .unwrap()
        })
        .collect();
    let ctx = model.context(cal.seqlen).unwrap();
    for b in &model.blocks {
        let xn: Vec<Tensor> = xs
            .iter()
            .map(|x| b.input_layernorm.forward(x).unwrap())
            .collect();
        let a: Vec<Tensor> = xn
            .iter()
            .map(|x| b.self_attn.core(x, &ctx).unwrap())
            .collect();
        let h: Vec<Tensor> = xs
            .iter()
            .zip(&a)
            .map(|(x, a)| (x + b.self_attn.o_proj.forward(a).unwrap()).unwrap())
            .collect();
        let hn: Vec<Tensor> = h
            .iter()
            .map(|x| b.post_attention_layernorm.forward(x).unwrap())
            .collect();
        let act: Vec<Tensor> = hn.iter().map(|x| b.mlp.hidden(x).unwrap()).collect();
        expected.push(vec![gram(&xn), gram(&a), gram(&hn), gram(&act)]);
        xs = xs.iter().map(|x| b.forward(x, &ctx).unwrap()).collect();
    }
    for true_sequential in [true, false] {
        let mut inputs = embed_segments(&config, &store, &cal, &Device::Cpu).unwrap();
        for layer in 0..config.num_hidden_layers {
            let mut group = 0;
            let mut check = |g: &GroupInput| -> Result<Vec<Vec<f32>>> {
                let want = &expected[layer][group];
                let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (got, want) in g.hessian.iter().zip(want) {
                    if (*got as f64 - want).abs() > 1e-4 * scale {
                        bail!("block {layer} group {group}: H {got} vs {want}");
                    }
                }
                group += 1;
                Ok(g.weights.clone()) // identity "quantizer"
            };
            run_block(
                &config,
                &store,
                layer,
                &mut inputs,
                RunnerOptions { true_sequential },
                &mut check,
            )
            .unwrap();
            assert_eq!(group, 4);
        }
        // outputs of the last block equal the whole-model block stack
        for (got, want) in inputs.iter().zip(&xs) {
            let d = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-4, "block outputs differ by {d}");
        }
    }
}

/// GPTQ that fails on a chosen block, to simulate a run killed mid-way.
struct FailingAt {
    inner: Gptq,
    block: Option<usize>,
}

impl LayerQuantizer for FailingAt {
    fn name(&self) -> &'static str {
        "gptq"
    }
    fn needs_hessian(&self) -> bool {
        true
    }
    fn quantize(&self, layer: &LayerToQuantize) -> Result<LayerResult> {
        if let Some(b) = self.block {
            if layer.name.starts_with(&format!("model.layers.{b}.")) {
                bail!("simulated interruption");
            }
        }
        self.inner.quantize(layer)
    }
}

/// The 3-bit g32 grid, GPTQ on it, and true-sequential options of the resume tests.
fn w3_grid() -> UniformGrid {
    UniformGrid::new(3, GroupSize::Columns(32), false).unwrap()
}

fn w3_gptq() -> Gptq {
    Gptq {
        options: GptqOptions::new(w3_grid()),
    }
}

fn w3_options(checkpoint: Option<Checkpoint>) -> CalibratedOptions {
    CalibratedOptions {
        runner: RunnerOptions {
            true_sequential: true,
        },
        grid: w3_grid(),
        progress: false,
        checkpoint,
    }
}

#[test]
fn interrupted_run_resumes_with_the_same_result() {
    let s = Synth {
        layers: 3,
        ..Synth::default()
    };
    let (_dir, config, store) = setup(&s);
    let cal = calib(&s, 2, 12);
    let gptq = w3_gptq;
    let ck_root = tempfile::tempdir().unwrap();
    let opts = w3_options;
    let key = json!({"test": 1});
    let ck = || Some(Checkpoint::new(ck_root.path().join("ck"), key.clone()));

    let full = quantize_model_calibrated(&config, &store, &cal, &gptq(), &opts(None)).unwrap();
    let err = quantize_model_calibrated(
        &config,
        &store,
        &cal,
        &FailingAt {
            inner: gptq(),
            block: Some(2),
        },
        &opts(ck()),
    );
    assert!(err.is_err());
    let resumed = quantize_model_calibrated(
        &config,
        &store,
        &cal,
        &FailingAt {
            inner: gptq(),
            block: None,
        },
        &opts(ck()),
    )
    .unwrap();
    assert_eq!(resumed.resumed_at, 2);
    assert_eq!(resumed.layers.len(), full.layers.len());
    for ((sa, a), (sb, b)) in full.layers.iter().zip(&resumed.layers) {
        assert_eq!(sa, sb);
        assert_eq!(a.codes, b.codes, "{}", sa.name);
        assert_eq!(a.column_loss, b.column_loss);
    }
    // every layer is in the log, the restored ones included (provenance across resumes)
    assert_eq!(resumed.log.len(), full.log.len());
    for (a, b) in full.log.iter().zip(&resumed.log) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.loss, b.loss, "{}", a.name);
    }
    // the finished run's checkpoint is still there (the CLI removes it after writing OUT);
    // a different key is an error naming what differs, and the checkpoint is kept
    let other = || {
        Some(Checkpoint::new(
            ck_root.path().join("ck"),
            json!({"test": 2}),
        ))
    };
    let err = quantize_model_calibrated(&config, &store, &cal, &gptq(), &opts(other()))
        .err()
        .expect("a checkpoint with another key must not be resumed");
    let msg = format!("{err:#}");
    assert!(msg.contains("test: 1 → 2"), "{msg}");
    assert!(msg.contains("--fresh"), "{msg}");
    assert!(ck_root.path().join("ck").join("key.json").is_file());
    // starting over (what --fresh does) runs from block 0
    other().unwrap().discard().unwrap();
    let fresh = quantize_model_calibrated(&config, &store, &cal, &gptq(), &opts(other())).unwrap();
    assert_eq!(fresh.resumed_at, 0);
}

/// A damaged checkpoint (a 0-byte block file, as a power loss can leave, or damaged
/// activations) is repaired: the damaged block and those after it are recomputed, and the
/// result equals an uninterrupted run's.
#[test]
fn damaged_checkpoint_is_recomputed_with_the_same_result() {
    let s = Synth {
        layers: 4,
        ..Synth::default()
    };
    let (_dir, config, store) = setup(&s);
    let cal = calib(&s, 2, 12);
    let gptq = w3_gptq;
    let opts = w3_options;
    let full = quantize_model_calibrated(&config, &store, &cal, &gptq(), &opts(None)).unwrap();
    let same = |q: &bitsmith::quant::CalibratedModel| {
        assert_eq!(q.layers.len(), full.layers.len());
        for ((sa, a), (sb, b)) in full.layers.iter().zip(&q.layers) {
            assert_eq!(sa, sb);
            assert_eq!(a.codes, b.codes, "{}", sa.name);
        }
        assert_eq!(q.log.len(), full.log.len());
    };
    // (file to damage, how, block the solver restarts at)
    for (victim, truncate, restart) in [
        ("block-00001.safetensors", true, 1),
        ("block-00000.safetensors", false, 0),
        ("inputs-00003.safetensors", true, 3),
    ] {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ck");
        let ck = || Some(Checkpoint::new(dir.clone(), json!({"test": 1})));
        let failing = FailingAt {
            inner: gptq(),
            block: Some(3),
        };
        assert!(quantize_model_calibrated(&config, &store, &cal, &failing, &opts(ck())).is_err());
        let path = dir.join(victim);
        assert!(path.is_file(), "{victim} missing");
        if truncate {
            std::fs::File::create(&path).unwrap(); // 0 bytes
        } else {
            let mut bytes = std::fs::read(&path).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x55; // a damaged byte inside the data
            std::fs::write(&path, bytes).unwrap();
        }
        std::fs::write(dir.join("block-00002.tmp"), b"half a write").unwrap();
        let resumed =
            quantize_model_calibrated(&config, &store, &cal, &gptq(), &opts(ck())).unwrap();
        assert_eq!(resumed.resumed_at, restart, "{victim}");
        same(&resumed);
        let tmp_left = std::fs::read_dir(&dir)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
        assert!(!tmp_left, "leftover .tmp files are removed");
    }
}

/// Checkpoints are written on their own thread while the next block computes: every one
/// has landed when the run returns (a rerun restores all blocks), and a writer's error is
/// the run's error.
#[test]
fn background_checkpoint_writes_land_before_the_run_returns_and_their_errors_surface() {
    let s = Synth {
        layers: 3,
        ..Synth::default()
    };
    let (_dir, config, store) = setup(&s);
    let cal = calib(&s, 2, 12);
    let gptq = w3_gptq();
    let opts = |ck: Checkpoint| w3_options(Some(ck));
    let root = tempfile::tempdir().unwrap();
    let ck = || Checkpoint::new(root.path().join("ck"), json!({"test": 1}));
    let full = quantize_model_calibrated(&config, &store, &cal, &gptq, &opts(ck())).unwrap();
    let again = quantize_model_calibrated(&config, &store, &cal, &gptq, &opts(ck())).unwrap();
    assert_eq!(
        again.resumed_at, s.layers,
        "the last block's checkpoint landed"
    );
    for ((sa, a), (sb, b)) in full.layers.iter().zip(&again.layers) {
        assert_eq!(sa, sb);
        assert_eq!(a.codes, b.codes, "{}", sa.name);
    }
    // a checkpoint folder that cannot be created (a file is in its way)
    let blocker = root.path().join("a-file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let bad = Checkpoint::new(blocker.join("ck"), json!({"test": 1}));
    let err = quantize_model_calibrated(&config, &store, &cal, &gptq, &opts(bad))
        .err()
        .expect("an unwritable checkpoint must fail the run");
    let msg = format!("{err:#}");
    assert!(msg.contains("a-file"), "{msg}");
}

#[test]
fn act_order_gptq_model_reloads_exactly() {
    use bitsmith::pack::{GptqConfig, ZeroConvention};
    let s = Synth::default();
    let (dir, config, store) = setup(&s);
    let files = resolve_model(dir.path().to_str().unwrap(), None).unwrap();
    let cal = calib(&s, 2, 16);
    let grid = UniformGrid::new(4, GroupSize::Columns(16), true).unwrap();
    let options = GptqOptions {
        act_order: true,
        ..GptqOptions::new(grid)
    };
    let opts = CalibratedOptions {
        runner: RunnerOptions {
            true_sequential: true,
        },
        grid,
        progress: false,
        checkpoint: None,
    };
    let q = quantize_model_calibrated(&config, &store, &cal, &Gptq { options }, &opts).unwrap();
    assert!(
        q.layers.iter().any(|(_, r)| r
            .codes
            .as_uniform()
            .unwrap()
            .g_idx
            .windows(2)
            .any(|p| p[0] > p[1])),
        "act-order g_idx expected"
    );
    let layers: Vec<_> = q
        .layers
        .iter()
        .map(|(s, r)| (s.clone(), r.codes.as_uniform().unwrap().clone()))
        .collect();
    let qcfg = GptqConfig {
        bits: 4,
        group_size: grid.group_size,
        sym: true,
        desc_act: true,
        lm_head: false,
        zeros: ZeroConvention::V1,
        meta: json!({}),
    };
    let (_root, path) = common::write_gptq_folder(&files, &config, &store, &layers, &qcfg, 1 << 30);
    let packed = bitsmith::load_model(
        &resolve_model(path.to_str().unwrap(), None).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut fake = CausalLm::load_dense(&config, &store, DType::F32, &Device::Cpu).unwrap();
    bitsmith::quant::apply_quantized(&mut fake, &layers).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 5 % s.vocab) as u32).collect();
    assert_eq!(common::logits(&packed, &ids), common::logits(&fake, &ids));
}

#[test]
fn baq_two_passes_hit_the_budget_and_resume() {
    use bitsmith::quant::baq::layer::LayerBudget;
    use bitsmith::quant::baq::quantizer::{measure, Allocation, Baq};
    use bitsmith::quant::LayerCodes;
    let s = Synth {
        layers: 2,
        ..Synth::default()
    };
    let (_dir, config, store) = setup(&s);
    let cal = calib(&s, 2, 16);
    let runner = RunnerOptions {
        true_sequential: true,
    };
    let pass1 = measure(&config, &store, &cal, 3, runner, false).unwrap();
    assert_eq!(pass1.len(), 14);
    let baq = || Baq {
        pass1: pass1.clone(),
        // range groups of 16 columns: the checkpoint must carry them too
        allocation: Allocation::PerLayer(LayerBudget {
            kind: bitsmith::quant::baq::layer::BudgetKind::Codes,
            bits: 2.5,
            allowed: (2..=8).collect(),
            theta: 1.95,
            group_size: Some(16),
            codebook: false,
        }),
        group_size: Some(16),
        sym: false,
        damp: 0.01,
        block_size: 128,
    };
    let grid = UniformGrid::new(3, GroupSize::PerChannel, false).unwrap();
    let ck_root = tempfile::tempdir().unwrap();
    let ck = || {
        Some(Checkpoint::new(
            ck_root.path().join("ck"),
            json!({"baq": 1}),
        ))
    };
    let opts = |c| CalibratedOptions {
        runner,
        grid,
        progress: false,
        checkpoint: c,
    };
    let full = quantize_model_calibrated(&config, &store, &cal, &baq(), &opts(None)).unwrap();
    for (spec, r) in &full.layers {
        let LayerCodes::Mixed(m) = &r.codes else {
            panic!("BAQ yields mixed layers")
        };
        let total: u64 = m.widths.iter().map(|&b| b as u64).sum();
        assert_eq!(
            total,
            (2.5 * spec.in_features as f64).round() as u64,
            "{}",
            spec.name
        );
        assert!(
            m.widths.iter().any(|&b| b != m.widths[0]),
            "{}: widths should vary",
            spec.name
        );
    }
    // interrupted in block 1, resumed: identical (mixed layers survive the checkpoint)
    struct Stop<'a>(&'a Baq);
    impl LayerQuantizer for Stop<'_> {
        fn name(&self) -> &'static str {
            "baq"
        }
        fn needs_hessian(&self) -> bool {
            true
        }
        fn quantize(&self, l: &LayerToQuantize) -> Result<LayerResult> {
            if l.name.starts_with("model.layers.1.") {
                bail!("simulated interruption");
            }
            self.0.quantize(l)
        }
    }
    let b = baq();
    assert!(quantize_model_calibrated(&config, &store, &cal, &Stop(&b), &opts(ck())).is_err());
    let resumed = quantize_model_calibrated(&config, &store, &cal, &baq(), &opts(ck())).unwrap();
    assert_eq!(resumed.resumed_at, 1);
    for ((sa, a), (_, b)) in full.layers.iter().zip(&resumed.layers) {
        assert_eq!(a.codes, b.codes, "{}", sa.name);
    }
    // the mixed layers run in the model
    let mut model = CausalLm::load_dense(&config, &store, DType::F32, &Device::Cpu).unwrap();
    for (spec, r) in &full.layers {
        model
            .set_linear_weights(&spec.name, r.codes.dequantize())
            .unwrap();
    }
    let out = common::logits(&model, &[1, 2, 3]);
    assert!(out.iter().flatten().all(|x| x.is_finite()));
}
