//! GGUF vocabularies rebuilt as `tokenizer.json` on import, checked against llama.cpp's own
//! tokenizer tests: the vocab-only GGUFs of Llama 2 and Phi-3 (SentencePiece,
//! `tokenizer.ggml.model = "llama"`) and of Llama 3, Qwen2, GPT-2 and StarCoder (byte-level
//! BPE) with the inputs and the token ids llama.cpp gives them
//! (`models/ggml-vocab-*.gguf{,.inp,.out}` of the llama-cpp-python 0.3.36 sources;
//! `scripts/make-fixture.sh` puts them in the fixture's `vocab/`). The rebuilt
//! `tokenizer.json` must give the same ids for every input and decode them back to it, and
//! export must name the pre-tokenizer it was rebuilt from.

mod common;

use bitsmith::pack::gguf::hf_tokenizer::{hf_tokenizer_files, vocab_from_metadata};
use bitsmith::pack::gguf::tokenizer::{read_vocab, GgufVocab, VocabModel};
use bitsmith::pack::gguf::{GgmlType, GgufWriter, MetaValue, TensorInfo};
use candle_core::quantized::gguf_file;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

fn vocab_file(name: &str) -> PathBuf {
    let p = common::fixture_dir().join("vocab").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/make-fixture.sh",
        p.display()
    );
    p
}

/// The `(input, ids)` cases of llama.cpp's `.inp`/`.out` pair.
fn cases(gguf: &str) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| std::fs::read_to_string(vocab_file(&format!("{gguf}{ext}"))).unwrap();
    let inputs: Vec<String> = read(".inp")
        .split("\n__ggml_vocab_test__\n")
        .map(str::to_string)
        .collect();
    let outputs: Vec<Vec<u32>> = read(".out")
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    // the .inp file ends with a separator line and an empty case after it
    let inputs = &inputs[..outputs.len()];
    inputs.iter().cloned().zip(outputs).collect()
}

fn vocab(gguf: &str) -> GgufVocab {
    let mut f = std::fs::File::open(vocab_file(gguf)).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    vocab_from_metadata(&content.metadata).unwrap()
}

fn rebuilt(gguf: &str) -> (Tokenizer, serde_json::Value) {
    let v = vocab(gguf);
    let files = hf_tokenizer_files(&v, 4096).unwrap();
    let tk = Tokenizer::from_bytes(files.tokenizer.to_string().as_bytes()).unwrap();
    // export reads the rebuilt files back to the same vocabulary and pre-tokenizer
    let dir = tempfile::tempdir().unwrap();
    let (tj, tc) = (
        dir.path().join("tokenizer.json"),
        dir.path().join("tokenizer_config.json"),
    );
    std::fs::write(&tj, files.tokenizer.to_string()).unwrap();
    std::fs::write(&tc, files.tokenizer_config.to_string()).unwrap();
    let back = read_vocab(
        &tj,
        Some(&tc),
        None,
        &serde_json::json!({}),
        v.tokens.len(),
        None,
    )
    .unwrap();
    assert_eq!(back.tokens, v.tokens, "{gguf}");
    assert_eq!(back.model.name(), v.model.name(), "{gguf}");
    if v.model == VocabModel::ByteLevelBpe {
        fn same(p: &str) -> &str {
            match p {
                "starcoder" => "smollm",
                "llama3" | "llama-v3" => "llama-bpe",
                p => p,
            }
        }
        assert_eq!(same(&back.pre), same(&v.pre), "{gguf}");
        assert_eq!(back.merges, v.merges, "{gguf}");
    }
    (tk, files.tokenizer_config)
}

/// Every input of the vocabulary's test gives llama.cpp's ids and decodes back to itself.
fn check(gguf: &str) -> (Tokenizer, serde_json::Value) {
    let (tk, config) = rebuilt(gguf);
    let cases = cases(gguf);
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut wrong = Vec::new();
    for (text, want) in &cases {
        let got = tk.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        if &got != want {
            wrong.push(format!("{text:?}: llama.cpp {want:?}, rebuilt {got:?}"));
            continue;
        }
        let back = tk.decode(&got, false).unwrap();
        if &back != text {
            wrong.push(format!("{text:?} decodes to {back:?}"));
        }
    }
    assert!(wrong.is_empty(), "{gguf}:\n{}", wrong.join("\n"));
    (tk, config)
}

/// A SentencePiece vocabulary: the prefix space on, and BOS first when special tokens are
/// asked for, as the GGUF's add_bos_token says.
fn check_spm(gguf: &str) -> (Tokenizer, serde_json::Value) {
    let v = vocab(gguf);
    assert!(matches!(v.model, VocabModel::SentencePiece { .. }));
    assert!(v.add_space_prefix, "llama.cpp's default for SentencePiece");
    let (tk, config) = check(gguf);
    let with_bos = tk.encode("Hello world", true).unwrap().get_ids().to_vec();
    assert_eq!(with_bos, [1, 15043, 3186]);
    assert_eq!(config["add_bos_token"], true);
    assert_eq!(config["bos_token"], "<s>");
    (tk, config)
}

#[test]
fn llama_spm_vocabulary_tokenizes_as_llama_cpp() {
    check_spm("ggml-vocab-llama-spm.gguf");
}

#[test]
fn byte_level_vocabularies_tokenize_as_llama_cpp() {
    for gguf in [
        "ggml-vocab-llama-bpe.gguf",
        "ggml-vocab-qwen2.gguf",
        "ggml-vocab-gpt-2.gguf",
        "ggml-vocab-starcoder.gguf",
    ] {
        assert_eq!(vocab(gguf).model, VocabModel::ByteLevelBpe);
        check(gguf);
    }
}

#[test]
fn phi3_vocabulary_tokenizes_as_llama_cpp() {
    // Phi-3's chat markers are added tokens, matched whole
    let (tk, config) = check_spm("ggml-vocab-phi-3.gguf");
    let ids = tk.encode("<|user|>\nHi<|end|>", false).unwrap();
    let toks = ids.get_tokens();
    assert!(toks.contains(&"<|user|>".to_string()), "{toks:?}");
    assert!(toks.contains(&"<|end|>".to_string()), "{toks:?}");
    assert!(config["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|user|>"));
}

/// A one-block Llama with random f32 weights and `v` as its vocabulary.
fn write_tiny_llama(path: &Path, v: &GgufVocab) {
    let (h, ffn, n_vocab) = (16usize, 32usize, v.tokens.len());
    let mut meta: Vec<(String, MetaValue)> = vec![
        (
            "general.architecture".into(),
            MetaValue::String("llama".into()),
        ),
        ("llama.block_count".into(), MetaValue::U32(1)),
        ("llama.context_length".into(), MetaValue::U32(64)),
        ("llama.embedding_length".into(), MetaValue::U32(h as u32)),
        (
            "llama.feed_forward_length".into(),
            MetaValue::U32(ffn as u32),
        ),
        ("llama.attention.head_count".into(), MetaValue::U32(2)),
        ("llama.attention.head_count_kv".into(), MetaValue::U32(2)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            MetaValue::F32(1e-5),
        ),
        ("llama.vocab_size".into(), MetaValue::U32(n_vocab as u32)),
    ];
    meta.extend(v.metadata());
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![n_vocab, h]),
        ("blk.0.attn_norm.weight".into(), vec![h]),
        ("blk.0.ffn_norm.weight".into(), vec![h]),
        ("output_norm.weight".into(), vec![h]),
        ("blk.0.ffn_gate.weight".into(), vec![ffn, h]),
        ("blk.0.ffn_up.weight".into(), vec![ffn, h]),
        ("blk.0.ffn_down.weight".into(), vec![h, ffn]),
    ];
    for p in ["q", "k", "v", "output"] {
        shapes.push((format!("blk.0.attn_{p}.weight"), vec![h, h]));
    }
    let infos = shapes
        .iter()
        .map(|(n, s)| TensorInfo {
            name: n.clone(),
            shape: s.clone(),
            ty: GgmlType::F32,
        })
        .collect();
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut w = GgufWriter::begin(file, &meta, infos).unwrap();
    let mut rng = common::Lcg::new(7);
    for (n, s) in &shapes {
        let len: usize = s.iter().product();
        let vals = if s.len() == 1 {
            vec![1.0; len]
        } else {
            rng.vec(len, 0.1)
        };
        let bytes: Vec<u8> = vals.iter().flat_map(|x: &f32| x.to_le_bytes()).collect();
        w.write_tensor(n, &bytes).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn a_sentencepiece_gguf_converts_and_generates() {
    let v = vocab("ggml-vocab-llama-spm.gguf");
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny-spm.gguf");
    write_tiny_llama(&gguf, &v);
    // the vocabulary survives bitsmith's own GGUF writer
    let mut f = std::fs::File::open(&gguf).unwrap();
    let back = vocab_from_metadata(&gguf_file::Content::read(&mut f).unwrap().metadata).unwrap();
    assert_eq!(back, v);

    let out = dir.path().join("tiny-spm");
    let bin = env!("CARGO_BIN_EXE_bitsmith");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(bin).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "bitsmith {args:?}: {err}");
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    run(&[
        "convert",
        gguf.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let tk = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(
        tk.encode(" Hello world", true).unwrap().get_ids(),
        [1, 29871, 15043, 3186]
    );
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (gen["bos_token_id"].as_u64(), gen["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );
    // the folder loads and generates (random weights: any text)
    run(&[
        "generate",
        out.to_str().unwrap(),
        "--prompt",
        "Hello world",
        "--raw",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
    ]);

    // and exports back to a `llama` vocabulary: the pieces and types llama.cpp's converter
    // wrote, scores from the merges' ranks, and the same tokenization
    let again = dir.path().join("again.gguf");
    run(&[
        "export",
        out.to_str().unwrap(),
        "--type",
        "F32",
        "-o",
        again.to_str().unwrap(),
    ]);
    let mut f = std::fs::File::open(&again).unwrap();
    let w = vocab_from_metadata(&gguf_file::Content::read(&mut f).unwrap().metadata).unwrap();
    assert_eq!(w.tokens, v.tokens);
    assert_eq!(w.token_types, v.token_types);
    assert_eq!(
        (w.bos, w.eos, w.unk, w.add_bos, w.add_space_prefix),
        (v.bos, v.eos, v.unk, v.add_bos, true)
    );
    assert!(matches!(w.model, VocabModel::SentencePiece { .. }));
    let files = hf_tokenizer_files(&w, 64).unwrap();
    let tk = Tokenizer::from_bytes(files.tokenizer.to_string().as_bytes()).unwrap();
    for (text, want) in cases("ggml-vocab-llama-spm.gguf") {
        assert_eq!(
            tk.encode(text.as_str(), false).unwrap().get_ids(),
            want,
            "{text:?}"
        );
    }
}
