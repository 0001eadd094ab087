//! Cached decoding equals the full forward (itself checked against a float64 reference in
//! `synthetic_model.rs`): prefill, one-token decode steps and chunks after a prefix, for
//! Llama (GQA), Qwen2 (q/k/v biases) and Mistral (a sliding window shorter than the text),
//! with batches of two different sequences; the fused step runs the online Hadamard
//! before down_proj (`bitsmith_online_hadamard`) as the full forward does.

mod common;

use bitsmith::loader::resolve_model;
use bitsmith::model::{CausalLm, KvCache, LogitsFor};
use candle_core::{DType, Device, Tensor};
use common::Synth;

fn load(dir: &std::path::Path, dtype: DType) -> CausalLm {
    let files = resolve_model(dir.to_str().unwrap(), None).unwrap();
    bitsmith::load_model(&files, dtype, &Device::Cpu).unwrap()
}

fn tensor(ids: &[Vec<u32>], from: usize, to: usize) -> Tensor {
    let flat: Vec<u32> = ids.iter().flat_map(|r| r[from..to].to_vec()).collect();
    Tensor::from_vec(flat, (ids.len(), to - from), &Device::Cpu).unwrap()
}

/// `[batch, seq, vocab]` as f32 rows.
fn rows(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
    t.to_dtype(DType::F32).unwrap().to_vec3().unwrap()
}

/// Run `ids` through the cache in the chunks `splits` (prefill, then whatever follows)
/// and return the logits of every position, `[batch][position][vocab]`.
fn cached_logits(
    m: &CausalLm,
    cache: &mut KvCache,
    ids: &[Vec<u32>],
    splits: &[usize],
) -> Vec<Vec<Vec<f32>>> {
    let mut out = vec![Vec::new(); ids.len()];
    let mut from = 0;
    for &to in splits.iter().chain([&ids[0].len()]) {
        let logits = m
            .forward_cached(&tensor(ids, from, to), cache, LogitsFor::All)
            .unwrap();
        assert_eq!(cache.len(), to);
        for (b, r) in rows(&logits).into_iter().enumerate() {
            out[b].extend(r);
        }
        from = to;
    }
    out
}

fn max_rel_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f64 {
    let scale = b
        .iter()
        .flatten()
        .flatten()
        .fold(1f64, |m, x| m.max(x.abs() as f64));
    a.iter()
        .flatten()
        .flatten()
        .zip(b.iter().flatten().flatten())
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

fn architectures() -> Vec<Synth> {
    vec![
        Synth::default(),
        Synth {
            arch: "Qwen2ForCausalLM",
            tied: false,
            ..Synth::default()
        },
        Synth {
            arch: "MistralForCausalLM",
            tied: false,
            sliding_window: Some(4),
            ..Synth::default()
        },
    ]
}

#[test]
fn prefill_then_decode_equals_full_forward() {
    for (i, s) in architectures().iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        s.write(dir.path(), 20 + i as u64, false);
        let m = load(dir.path(), DType::F32);
        let ids = s.batch_ids(14);
        let full = rows(&m.forward(&tensor(&ids, 0, 14)).unwrap());
        // prefill 5, decode 5 single tokens, a chunk of 3 after the history, decode 1
        let mut cache = m.new_cache(1);
        let got = cached_logits(&m, &mut cache, &ids, &[5, 6, 7, 8, 9, 10, 13]);
        let err = max_rel_diff(&got, &full);
        assert!(err < 1e-5, "{}: max relative |Δlogit| {err}", s.arch);
    }
}

#[test]
fn fused_decode_step_equals_the_tensor_path() {
    for (i, s) in architectures().iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        s.write(dir.path(), 40 + i as u64, false);
        let fused = load(dir.path(), DType::F32);
        assert!(
            bitsmith::model::decode::eligible(&fused, 2),
            "{}: the fused step should take this model",
            s.arch
        );
        let mut ops = fused.clone();
        ops.set_fused_decode(false);
        let ids = s.batch_ids(12);
        // same prefill, then single-token steps through each path (the sliding window
        // of the Mistral case drops keys from step 4 on)
        let splits = [4, 5, 6, 7, 8, 9, 10, 11];
        let (mut c1, mut c2) = (fused.new_cache(1), ops.new_cache(1));
        let a = cached_logits(&fused, &mut c1, &ids, &splits);
        let b = cached_logits(&ops, &mut c2, &ids, &splits);
        let err = max_rel_diff(&a, &b);
        assert!(err < 1e-5, "{}: max relative |Δlogit| {err}", s.arch);
    }
}

#[test]
fn fused_decode_step_of_a_bf16_model_follows_its_f32_twin() {
    // bf16 weights: the f32 model holds exactly the same values, so the fused bf16 step
    // (f32 activations, bf16 KV cache) differs from it only by the cache's bf16 rounding —
    // much closer than candle's bf16 ops, which round every intermediate
    let s = Synth {
        bf16: true,
        ..Synth::default()
    };
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 11, false);
    let half = load(dir.path(), DType::BF16);
    let full = load(dir.path(), DType::F32);
    assert!(bitsmith::model::decode::eligible(&half, 2));
    let ids = s.batch_ids(10);
    let splits = [4, 5, 6, 7, 8, 9];
    let (mut c1, mut c2) = (half.new_cache(16), full.new_cache(16));
    let a = cached_logits(&half, &mut c1, &ids, &splits);
    let b = cached_logits(&full, &mut c2, &ids, &splits);
    // the prefill (first 4 positions) runs candle's bf16 ops; compare the fused steps
    let steps =
        |l: &[Vec<Vec<f32>>]| -> Vec<Vec<Vec<f32>>> { l.iter().map(|r| r[4..].to_vec()).collect() };
    let err = max_rel_diff(&steps(&a), &steps(&b));
    assert!(err < 1e-2, "max relative |Δlogit| {err}");
    let mut ops = half.clone();
    ops.set_fused_decode(false);
    let mut c3 = ops.new_cache(16);
    let c = cached_logits(&ops, &mut c3, &ids, &splits);
    let err_ops = max_rel_diff(&steps(&c), &steps(&b));
    eprintln!("bf16 fused vs f32: {err:.2e}; candle bf16 ops vs f32: {err_ops:.2e}");
}

#[test]
fn last_position_logits_and_growth_past_the_reservation() {
    let s = Synth {
        arch: "MistralForCausalLM",
        tied: false,
        sliding_window: Some(24),
        ..Synth::default()
    };
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 31, false);
    let m = load(dir.path(), DType::F32);
    let n = 270; // beyond one chunk of the cache buffers
    let ids = s.batch_ids(n);
    let full = rows(&m.forward(&tensor(&ids, 0, n)).unwrap());
    let mut cache = m.new_cache(1);
    let first = cache_capacity(&mut cache, &m, &ids, 250);
    let mut err = 0f64;
    for t in 250..n {
        let last = m
            .forward_cached(&tensor(&ids, t, t + 1), &mut cache, LogitsFor::Last)
            .unwrap();
        let want: Vec<Vec<Vec<f32>>> = full.iter().map(|r| vec![r[t].clone()]).collect();
        err = err.max(max_rel_diff(&rows(&last), &want));
    }
    assert!(err < 1e-5, "max relative |Δlogit| {err}");
    let grown = cache.layers_mut()[0].capacity();
    assert!(first < n && grown >= n, "capacity {first} → {grown}");
}

/// Prefill `ids[..to]` and return the cache capacity afterwards.
fn cache_capacity(cache: &mut KvCache, m: &CausalLm, ids: &[Vec<u32>], to: usize) -> usize {
    m.forward_cached(&tensor(ids, 0, to), cache, LogitsFor::Last)
        .unwrap();
    cache.layers_mut()[0].capacity()
}

#[test]
fn bf16_cached_decode_follows_the_bf16_forward() {
    let s = Synth {
        bf16: true,
        ..Synth::default()
    };
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 7, false);
    let m = load(dir.path(), DType::BF16);
    let ids = s.batch_ids(10);
    let full = rows(&m.forward(&tensor(&ids, 0, 10)).unwrap());
    let mut cache = m.new_cache(16);
    let got = cached_logits(&m, &mut cache, &ids, &[4, 5, 6, 7, 8, 9]);
    // bf16 rounds every intermediate; the two paths order their sums differently
    let err = max_rel_diff(&got, &full);
    assert!(err < 2e-2, "max relative |Δlogit| {err}");
}

#[test]
fn mismatched_batch_and_stale_cache_are_errors() {
    let s = Synth::default();
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 9, false);
    let m = load(dir.path(), DType::F32);
    let ids = s.batch_ids(4);
    let mut cache = m.new_cache(8);
    m.forward_cached(&tensor(&ids, 0, 3), &mut cache, LogitsFor::Last)
        .unwrap();
    let one = Tensor::from_vec(vec![1u32], (1, 1), &Device::Cpu).unwrap();
    let e = m
        .forward_cached(&one, &mut cache, LogitsFor::Last)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 sequences") && e.contains("has 1"), "{e}");
    cache.clear();
    assert!(cache.is_empty());
    m.forward_cached(&one, &mut cache, LogitsFor::Last).unwrap();
    assert_eq!(cache.len(), 1);
}

#[test]
fn loaded_models_take_the_fused_step_and_bare_ones_do_not() {
    // the fused step's dense GEMV comes from `infer`: its loader attaches it, so the
    // comparisons above really run the fused step; a model built bare decodes through ops
    let dir = tempfile::tempdir().unwrap();
    let s = Synth::default();
    s.write(dir.path(), 3, false);
    let m = load(dir.path(), DType::F32);
    assert!(bitsmith::model::decode::eligible(&m, 1));
    let files = resolve_model(dir.path().to_str().unwrap(), None).unwrap();
    let config = bitsmith::loader::ModelConfig::from_file(&files.config).unwrap();
    let store = bitsmith::loader::WeightStore::open(&files.weights).unwrap();
    let bare = CausalLm::load_dense(&config, &store, DType::F32, &Device::Cpu).unwrap();
    assert!(!bitsmith::model::decode::eligible(&bare, 1));
}

#[test]
fn fused_decode_step_runs_the_online_hadamard_before_down_proj() {
    for (i, s) in architectures().iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        s.write(dir.path(), 60 + i as u64, false);
        let plain = load(dir.path(), DType::F32);
        // the same weights, declared to rotate down_proj's input (d_ff 96 = 8·12)
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["bitsmith_online_hadamard"] = serde_json::json!(["mlp.down_proj"]);
        std::fs::write(&path, config.to_string()).unwrap();
        let fused = load(dir.path(), DType::F32);
        assert!(fused.blocks.iter().all(|b| b.mlp.down_input.is_some()));
        assert!(
            bitsmith::model::decode::eligible(&fused, 2),
            "{}: the fused step should take a model with the online op",
            s.arch
        );
        let ids = s.batch_ids(12);
        let full = rows(&fused.forward(&tensor(&ids, 0, 12)).unwrap());
        let splits = [4, 5, 6, 7, 8, 9, 10, 11];
        let mut cache = fused.new_cache(1);
        let got = cached_logits(&fused, &mut cache, &ids, &splits);
        let err = max_rel_diff(&got, &full);
        assert!(err < 1e-5, "{}: fused vs full forward {err}", s.arch);
        let mut ops = fused.clone();
        ops.set_fused_decode(false);
        let mut cache = ops.new_cache(1);
        let err = max_rel_diff(&got, &cached_logits(&ops, &mut cache, &ids, &splits));
        assert!(err < 1e-5, "{}: fused vs tensor path {err}", s.arch);
        // the op is not a no-op here: without it the same weights decode otherwise
        let mut cache = plain.new_cache(1);
        let off = max_rel_diff(&cached_logits(&plain, &mut cache, &ids, &splits), &full);
        assert!(
            off > 1e-2,
            "{}: the online op changed nothing ({off})",
            s.arch
        );
    }
}
