//! The library's typed errors through the crate-root API on a synthetic model: each kind
//! of caller mistake (a model that does not resolve or load, an unreadable input, an
//! option out of range, an output that cannot be written) is its own `ErrorKind` and a
//! caller error, none of them panics, and a failed write leaves nothing behind.

mod common;

use bitsmith::recipe::{
    AllocationSpec, CalibrationSpec, GptqSpec, GridSpec, GroupSize, RangeFit, RoundingSpec,
};
use bitsmith::{
    load_model, load_tokenizer, parse_device, parse_dtype, perplexity, quantize_to, resolve_model,
    ErrorKind, ModelFiles, PplOptions, Recipe, SourceModel, WriteOptions,
};
use candle_core::{DType, Device, Tensor};
use common::{write_tokenizer, Synth};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The kind of a call's error; every kind but `Internal` must count as the caller's.
fn kind<T>(r: bitsmith::Result<T>) -> ErrorKind {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            assert_eq!(e.is_caller_error(), e.kind() != ErrorKind::Internal, "{e}");
            assert!(!e.to_string().is_empty());
            e.kind()
        }
    }
}

fn model_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    let s = Synth::default();
    s.write(&dir, 3, false);
    write_tokenizer(&dir, s.vocab);
    dir
}

fn files(dir: &Path) -> ModelFiles {
    resolve_model(dir.to_str().unwrap(), None).unwrap()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(path, c.to_string()).unwrap();
}

fn rtn_recipe(bits: u8) -> Recipe {
    Recipe {
        transforms: vec![],
        allocation: AllocationSpec::Uniform {
            grid: GridSpec::Uniform {
                bits,
                group_size: GroupSize::Columns(32),
                sym: false,
                range: RangeFit::MinMax,
            },
        },
        rounding: RoundingSpec::Rtn,
        calibration: CalibrationSpec::default(),
        lm_head: false,
    }
}

/// Quiet perplexity over every whole window of `seqlen` tokens, one per forward.
fn windows_of(seqlen: usize) -> PplOptions {
    PplOptions {
        seqlen,
        batch: 1,
        limit: None,
        progress: false,
    }
}

fn load(dir: &Path) -> bitsmith::Result<bitsmith::CausalLm> {
    load_model(
        &resolve_model(dir.to_str().unwrap(), None)?,
        DType::F32,
        &Device::Cpu,
    )
}

#[test]
fn models_that_do_not_resolve_or_load_say_which() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let absent = r.join("absent");
    assert_eq!(
        kind(resolve_model(absent.to_str().unwrap(), None)),
        ErrorKind::ModelNotFound
    );
    assert_eq!(
        kind(resolve_model("not a repo id", None)),
        ErrorKind::ModelNotFound
    );
    std::fs::create_dir(r.join("empty")).unwrap();
    assert_eq!(
        kind(resolve_model(r.join("empty").to_str().unwrap(), None)),
        ErrorKind::InvalidModel
    );
    let good = model_dir(r, "good");
    assert_eq!(
        kind(resolve_model(good.to_str().unwrap(), Some("main"))),
        ErrorKind::InvalidOption
    );
    load(&good).expect("the untouched model loads");

    let arch = model_dir(r, "arch");
    edit_config(&arch, |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    assert_eq!(kind(load(&arch)), ErrorKind::InvalidModel);

    let truncated = model_dir(r, "truncated");
    let weights = truncated.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();
    assert_eq!(kind(load(&truncated)), ErrorKind::InvalidModel);

    // the config promises a third block whose tensors are not in the file
    let missing = model_dir(r, "missing");
    edit_config(&missing, |c| c["num_hidden_layers"] = 3.into());
    assert_eq!(kind(load(&missing)), ErrorKind::InvalidModel);

    let unknown_format = model_dir(r, "awq");
    edit_config(&unknown_format, |c| {
        c["quantization_config"] = serde_json::json!({"quant_method": "awq", "bits": 4})
    });
    assert_eq!(kind(load(&unknown_format)), ErrorKind::InvalidModel);
    assert_eq!(
        kind(SourceModel::open(unknown_format.to_str().unwrap(), None)),
        ErrorKind::InvalidModel,
        "an already quantized model is no source"
    );

    std::fs::remove_file(good.join("tokenizer.json")).unwrap();
    assert_eq!(kind(load_tokenizer(&files(&good))), ErrorKind::InvalidModel);
}

#[test]
fn a_repo_id_missing_from_the_offline_cache_is_not_found() {
    let home = tempfile::tempdir().unwrap();
    // this binary's other tests read no hub variable
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let e = resolve_model("nobody/no-such-model", None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ModelNotFound);
    assert!(e.to_string().contains("HF_HUB_OFFLINE"), "{e}");
}

#[test]
fn options_out_of_range_are_invalid_options() {
    assert_eq!(kind(rtn_recipe(9).validate()), ErrorKind::InvalidOption);
    assert_eq!(kind(parse_device("tpu")), ErrorKind::InvalidOption);
    assert_eq!(kind(parse_device("cuda:x")), ErrorKind::InvalidOption);
    assert_eq!(kind(parse_dtype("f8")), ErrorKind::InvalidOption);

    let root = tempfile::tempdir().unwrap();
    let dir = model_dir(root.path(), "m");
    let source = SourceModel::open(dir.to_str().unwrap(), None).unwrap();
    let out = root.path().join("out");
    let gguf_only = WriteOptions {
        gguf_no_vocab: true,
        ..WriteOptions::default()
    };
    assert_eq!(
        kind(quantize_to(&out, &source, &rtn_recipe(4), &gguf_only)),
        ErrorKind::InvalidOption
    );
    let model = load(&dir).unwrap();
    let ids: Vec<u32> = (0..64).map(|i| 1 + i % 50).collect();
    let window_of_one = windows_of(1);
    assert_eq!(
        kind(perplexity(&model, &ids, &window_of_one)),
        ErrorKind::InvalidOption
    );
    assert_eq!(
        std::fs::read_dir(root.path()).unwrap().count(),
        1,
        "only the model"
    );
}

#[test]
fn unreadable_inputs_are_invalid_inputs() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    assert_eq!(
        kind(Recipe::from_file(&r.join("absent.json"))),
        ErrorKind::InvalidInput
    );
    std::fs::write(r.join("broken.json"), "{ not json").unwrap();
    assert_eq!(
        kind(Recipe::from_file(&r.join("broken.json"))),
        ErrorKind::InvalidInput
    );
    std::fs::write(
        r.join("nine.json"),
        serde_json::to_string(&rtn_recipe(9)).unwrap(),
    )
    .unwrap();
    assert_eq!(
        kind(Recipe::from_file(&r.join("nine.json"))),
        ErrorKind::InvalidOption,
        "a well-formed recipe with a value out of range"
    );

    let dir = model_dir(r, "m");
    let source = SourceModel::open(dir.to_str().unwrap(), None).unwrap();
    let mut gptq = rtn_recipe(4);
    gptq.rounding = RoundingSpec::Gptq(GptqSpec::default());
    gptq.calibration = CalibrationSpec {
        text: Some(r.join("no-such-text.txt")),
        nsamples: 2,
        seqlen: 16,
        ..CalibrationSpec::default()
    };
    let out = r.join("out");
    assert_eq!(
        kind(quantize_to(&out, &source, &gptq, &WriteOptions::default())),
        ErrorKind::InvalidInput
    );
    let left: Vec<_> = std::fs::read_dir(r)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out"))
        .collect();
    assert!(left.is_empty(), "a failed run left {left:?}");

    let model = load(&dir).unwrap();
    let vocab = model.config.vocab_size as u32;
    let opts = windows_of(16);
    let short: Vec<u32> = (1..10).collect();
    assert_eq!(
        kind(perplexity(&model, &short, &opts)),
        ErrorKind::InvalidInput
    );
    let mut outside: Vec<u32> = (0..32).map(|i| 1 + i % 50).collect();
    outside[20] = vocab;
    assert_eq!(
        kind(perplexity(&model, &outside, &opts)),
        ErrorKind::InvalidInput
    );

    // the model's own forward: a shape, type or id the caller got wrong
    let dev = Device::Cpu;
    let flat = Tensor::from_slice(&[1u32, 2, 3], 3, &dev).unwrap();
    let floats = Tensor::from_slice(&[1f32, 2.0], (1, 2), &dev).unwrap();
    let beyond = Tensor::from_slice(&[1u32, vocab + 3], (1, 2), &dev).unwrap();
    for ids in [flat, floats, beyond] {
        assert_eq!(kind(model.forward(&ids)), ErrorKind::InvalidInput);
    }
    let ok = Tensor::from_slice(&[1u32, 2, 3], (1, 3), &dev).unwrap();
    model
        .forward(&ok)
        .expect("a good forward after the bad ones");
}

#[test]
fn an_existing_output_is_an_output_error_and_stays_as_it_was() {
    let root = tempfile::tempdir().unwrap();
    let dir = model_dir(root.path(), "m");
    let source = SourceModel::open(dir.to_str().unwrap(), None).unwrap();
    let out = root.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = quantize_to(&out, &source, &rtn_recipe(4), &WriteOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Output);
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );

    let replace = WriteOptions {
        overwrite: true,
        ..WriteOptions::default()
    };
    let w = quantize_to(&out, &source, &rtn_recipe(4), &replace).unwrap();
    assert_eq!((w.path.as_path(), w.method), (out.as_path(), "rtn"));
    assert!(!out.join("keep.txt").exists());
    let packed = load(&out).unwrap();
    let ids: Vec<u32> = (0..32).map(|i| 1 + i % 50).collect();
    let opts = windows_of(16);
    assert!(perplexity(&packed, &ids, &opts).unwrap().ppl.is_finite());
}
