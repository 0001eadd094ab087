//! Hugging Face tokenizer files rebuilt from a GGUF vocabulary — the inverse of
//! [`super::tokenizer`]: `tokenizer.ggml.*` metadata (a `gpt2` byte-level BPE, or a
//! `llama` SentencePiece vocabulary: [`super::hf_tokenizer_spm`]) back to a
//! `tokenizer.json` (BPE model, merges, pre-tokenizer, added tokens, post-processor,
//! decoder), a `tokenizer_config.json` (special tokens, `add_bos_token`, the chat template)
//! and a `special_tokens_map.json`, so a model that only exists as a GGUF loads and
//! tokenizes as its original did.
//!
//! The byte-level pre-tokenizer is the one thing a GGUF names instead of describing:
//! llama.cpp picks a splitting regex by `tokenizer.ggml.pre`. Only names whose regex a
//! Hugging Face pre-tokenizer reproduces are accepted; any other is an error, because a
//! guessed split would tokenize differently without any sign.

use super::hf_tokenizer_spm as spm;
use super::tokenizer::{
    GgufVocab, VocabModel, CONTROL, LLAMA3_SPLIT, QWEN2_SPLIT, USER_DEFINED,
};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::Value as Meta;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// The three tokenizer files of a Hugging Face model folder.
#[derive(Debug, Clone)]
pub struct HfTokenizerFiles {
    pub tokenizer: Value,
    pub tokenizer_config: Value,
    pub special_tokens_map: Value,
}

fn strings(m: &HashMap<String, Meta>, key: &str) -> Result<Vec<String>> {
    let Some(v) = m.get(key) else {
        return Ok(Vec::new());
    };
    v.to_vec()
        .with_context(|| format!("`{key}` is not an array"))?
        .iter()
        .map(|s| s.to_string().cloned())
        .collect::<candle_core::Result<Vec<_>>>()
        .with_context(|| format!("`{key}` is not an array of strings"))
}

fn id(m: &HashMap<String, Meta>, key: &str) -> Result<Option<u32>> {
    m.get(key)
        .map(|v| {
            v.to_u32()
                .or_else(|_| v.to_i32().map(|x| x as u32))
                .with_context(|| format!("`{key}` is {v:?}, not a token id"))
        })
        .transpose()
}

fn flag(m: &HashMap<String, Meta>, key: &str) -> Result<Option<bool>> {
    m.get(key)
        .map(|v| {
            v.to_bool()
                .with_context(|| format!("`{key}` is not a bool"))
        })
        .transpose()
}

/// The vocabulary a GGUF's `tokenizer.*` metadata describes.
pub fn vocab_from_metadata(m: &HashMap<String, Meta>) -> Result<GgufVocab> {
    let model = m
        .get("tokenizer.ggml.model")
        .map(|v| v.to_string().cloned())
        .transpose()
        .context("`tokenizer.ggml.model` is not a string")?
        .ok_or_else(|| anyhow!("the GGUF has no vocabulary (`tokenizer.ggml.model` is missing)"))?;
    let tokens = strings(m, "tokenizer.ggml.tokens")?;
    let model = match model.as_str() {
        "gpt2" => VocabModel::ByteLevelBpe,
        "llama" => {
            let scores = m
                .get("tokenizer.ggml.scores")
                .ok_or_else(|| anyhow!("the SentencePiece vocabulary has no `tokenizer.ggml.scores`"))?
                .to_vec()
                .context("`tokenizer.ggml.scores` is not an array")?
                .iter()
                .map(|v| v.to_f32())
                .collect::<candle_core::Result<Vec<_>>>()
                .context("`tokenizer.ggml.scores` is not an array of f32")?;
            ensure!(
                scores.len() == tokens.len(),
                "the GGUF has {} tokens but {} scores",
                tokens.len(),
                scores.len()
            );
            VocabModel::SentencePiece { scores }
        }
        other => bail!(
            "the GGUF's vocabulary is `{other}`; rebuilding tokenizer.json reads byte-level BPE \
             (`gpt2`) and SentencePiece (`llama`) vocabularies (pass --tokenizer-from with \
             the original model's folder)"
        ),
    };
    ensure!(
        !tokens.is_empty(),
        "the GGUF's `tokenizer.ggml.tokens` is empty"
    );
    let token_types = match m.get("tokenizer.ggml.token_type") {
        None => vec![super::tokenizer::NORMAL; tokens.len()],
        Some(v) => v
            .to_vec()
            .context("`tokenizer.ggml.token_type` is not an array")?
            .iter()
            .map(|t| t.to_i32())
            .collect::<candle_core::Result<Vec<_>>>()
            .context("`tokenizer.ggml.token_type` is not an array of i32")?,
    };
    ensure!(
        token_types.len() == tokens.len(),
        "the GGUF has {} tokens but {} token types",
        tokens.len(),
        token_types.len()
    );
    let text = |key: &str| -> Result<Option<String>> {
        m.get(key)
            .map(|v| v.to_string().cloned())
            .transpose()
            .with_context(|| format!("`{key}` is not a string"))
    };
    // llama.cpp puts a space in front of SentencePiece text unless told not to
    let space_prefix_default = matches!(model, VocabModel::SentencePiece { .. });
    Ok(GgufVocab {
        model,
        tokens,
        token_types,
        merges: strings(m, "tokenizer.ggml.merges")?,
        pre: text("tokenizer.ggml.pre")?.unwrap_or_else(|| "default".to_string()),
        bos: id(m, "tokenizer.ggml.bos_token_id")?,
        eos: id(m, "tokenizer.ggml.eos_token_id")?,
        unk: id(m, "tokenizer.ggml.unknown_token_id")?,
        pad: id(m, "tokenizer.ggml.padding_token_id")?,
        add_bos: flag(m, "tokenizer.ggml.add_bos_token")?,
        add_eos: flag(m, "tokenizer.ggml.add_eos_token")?,
        add_space_prefix: flag(m, "tokenizer.ggml.add_space_prefix")?
            .unwrap_or(space_prefix_default),
        chat_template: text("tokenizer.chat_template")?,
    })
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space,
           "trim_offsets": trim_offsets, "use_regex": true})
}

/// The Hugging Face pre-tokenizer that splits as llama.cpp's regex for `pre` does.
fn pre_tokenizer(pre: &str) -> Result<Value> {
    let split = byte_level(false, true);
    Ok(match pre {
        // llama.cpp: `\p{N}` alone first, then GPT-2's regex
        "smollm" | "starcoder" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, split]}),
        "gpt-2" | "gpt2" | "default" => split,
        "llama-bpe" | "llama3" | "llama-v3" => regex_then_bytes(LLAMA3_SPLIT),
        "qwen2" => regex_then_bytes(QWEN2_SPLIT),
        other => bail!(
            "the GGUF's pre-tokenizer `{other}` has no Hugging Face equivalent bitsmith \
             writes (it rebuilds `smollm`, `starcoder`, `gpt-2`, `llama-bpe` and `qwen2`); \
             pass --tokenizer-from with the original model's folder"
        ),
    })
}

/// A regex split, then byte-level BPE without GPT-2's regex (Llama 3's and Qwen2's form).
fn regex_then_bytes(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
}

/// llama.cpp takes a pre-token that is itself a token whole, before any merge, for the
/// Llama 3 family (`ignore_merges`); Llama 3's `tokenizer.json` says the same.
fn ignores_merges(pre: &str) -> bool {
    matches!(pre, "llama-bpe" | "llama3" | "llama-v3")
}

/// `{"SpecialToken": …}` / `{"Sequence": …}` pieces of a template.
fn template(bos: Option<&str>, eos: Option<&str>, seq: &str, type_id: u32) -> Vec<Value> {
    let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let mut out = Vec::new();
    out.extend(bos.map(special));
    out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
    out.extend(eos.map(special));
    out
}

/// The Hugging Face files for `v`; `context_length` is the model's (`model_max_length`).
pub fn hf_tokenizer_files(v: &GgufVocab, context_length: usize) -> Result<HfTokenizerFiles> {
    let name = |id: Option<u32>, what: &str| -> Result<Option<&str>> {
        id.map(|i| {
            v.tokens.get(i as usize).map(String::as_str).ok_or_else(|| {
                anyhow!(
                    "the {what} token id {i} is outside the {}-token vocabulary",
                    v.tokens.len()
                )
            })
        })
        .transpose()
    };
    let (bos, eos) = (name(v.bos, "BOS")?, name(v.eos, "EOS")?);
    let (unk, pad) = (name(v.unk, "unknown")?, name(v.pad, "padding")?);

    let mut vocab = Map::new();
    for (i, t) in v.tokens.iter().enumerate() {
        if vocab.insert(t.clone(), json!(i)).is_some() {
            bail!("the GGUF's vocabulary holds the token {t:?} twice (the second at id {i})");
        }
    }
    for m in &v.merges {
        ensure!(
            m.split(' ').count() == 2,
            "the GGUF's merge {m:?} is not two tokens separated by one space"
        );
    }
    // control and user-defined tokens are matched before BPE, as llama.cpp matches them;
    // SentencePiece's unknown token is special too (transformers' LlamaConverter adds it so)
    let spm_unk = |i: usize| {
        matches!(v.model, VocabModel::SentencePiece { .. }) && v.unk == Some(i as u32)
    };
    let added: Vec<(usize, &str, bool)> = v
        .tokens
        .iter()
        .zip(&v.token_types)
        .enumerate()
        .filter(|&(i, (_, &ty))| ty == CONTROL || ty == USER_DEFINED || spm_unk(i))
        .map(|(i, (t, &ty))| (i, t.as_str(), ty != USER_DEFINED))
        .collect();
    let added_tokens: Vec<Value> = added
        .iter()
        .map(|&(i, t, special)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": special})
        })
        .collect();

    let add_bos = v.add_bos.unwrap_or(false);
    let add_eos = v.add_eos.unwrap_or(false);
    ensure!(
        !add_bos || bos.is_some(),
        "the GGUF asks for a BOS token but names none"
    );
    ensure!(
        !add_eos || eos.is_some(),
        "the GGUF asks for an EOS token but names none"
    );
    let spm_scores = match &v.model {
        VocabModel::SentencePiece { scores } => Some(scores),
        VocabModel::ByteLevelBpe => None,
    };
    // byte-level BPE maps offsets back through its byte alphabet; SentencePiece needs nothing
    let mut post = match spm_scores {
        None => byte_level(true, false),
        Some(_) => Value::Null,
    };
    if add_bos || add_eos {
        let (b, e) = (bos.filter(|_| add_bos), eos.filter(|_| add_eos));
        let mut special_tokens = Map::new();
        for (t, i) in [(b, v.bos), (e, v.eos)] {
            if let (Some(t), Some(i)) = (t, i) {
                special_tokens.insert(t.into(), json!({"id": t, "ids": [i], "tokens": [t]}));
            }
        }
        let mut pair = template(b, e, "A", 0);
        pair.extend(template(b, e, "B", 1));
        let templated = json!({
            "type": "TemplateProcessing", "single": template(b, e, "A", 0), "pair": pair,
            "special_tokens": special_tokens});
        post = match post {
            Value::Null => templated,
            byte_level => json!({"type": "Sequence", "processors": [byte_level, templated]}),
        };
    }
    let (normalizer, pre_tokenizer, decoder, model) = match spm_scores {
        None => (
            Value::Null,
            pre_tokenizer(&v.pre)?,
            byte_level(true, true),
            json!({"type": "BPE", "dropout": null, "unk_token": null,
                   "continuing_subword_prefix": null, "end_of_word_suffix": null,
                   "fuse_unk": false, "byte_fallback": false,
                   "ignore_merges": ignores_merges(&v.pre), "vocab": vocab, "merges": v.merges}),
        ),
        Some(scores) => (
            spm::normalizer(v.add_space_prefix),
            Value::Null,
            spm::decoder(v.add_space_prefix),
            spm::model(vocab, &v.tokens, scores, unk)?,
        ),
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": decoder,
        "model": model,
    });

    let decoder: Map<String, Value> = added
        .iter()
        .map(|&(i, t, special)| {
            (
                i.to_string(),
                json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": special}),
            )
        })
        .collect();
    let mut config = json!({
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": v.add_space_prefix,
        "added_tokens_decoder": decoder,
        "clean_up_tokenization_spaces": false,
        "model_max_length": context_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let mut special_tokens_map = Map::new();
    for (key, t) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("pad_token", pad),
        ("unk_token", unk),
    ] {
        if let Some(t) = t {
            config[key] = json!(t);
            special_tokens_map.insert(key.into(), json!(t));
        }
    }
    if let Some(t) = &v.chat_template {
        config["chat_template"] = json!(t);
    }
    Ok(HfTokenizerFiles {
        tokenizer,
        tokenizer_config: config,
        special_tokens_map: Value::Object(special_tokens_map),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tokenizer::{read_vocab, NORMAL};
    use super::*;
    use tokenizers::Tokenizer;

    fn small(add_bos: bool) -> GgufVocab {
        let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<x>"]
            .map(String::from)
            .to_vec();
        // a few byte-level symbols and two merges' results
        for t in ["a", "b", "c", "1", "2", "Ġ", "ab", "Ġab"] {
            tokens.push(t.to_string());
        }
        let mut token_types = vec![CONTROL, CONTROL, USER_DEFINED];
        token_types.resize(tokens.len(), NORMAL);
        GgufVocab {
            model: VocabModel::ByteLevelBpe,
            tokens,
            token_types,
            merges: vec!["a b".into(), "Ġ ab".into()],
            pre: "smollm".into(),
            bos: Some(1),
            eos: Some(0),
            unk: Some(0),
            pad: None,
            add_bos: Some(add_bos),
            add_eos: Some(false),
            add_space_prefix: false,
            chat_template: Some("{{x}}".into()),
        }
    }

    fn load(files: &HfTokenizerFiles) -> Tokenizer {
        Tokenizer::from_bytes(files.tokenizer.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn rebuilt_tokenizer_loads_and_tokenizes() {
        let v = small(false);
        let files = hf_tokenizer_files(&v, 64).unwrap();
        let tk = load(&files);
        let ids = |s: &str, special: bool| tk.encode(s, special).unwrap().get_ids().to_vec();
        // BPE merges, digits one by one, added tokens matched whole
        assert_eq!(ids("ab ab12", true), [9, 10, 6, 7]);
        assert_eq!(ids("<|im_start|>ab<x>", true), [1, 9, 2]);
        assert_eq!(tk.decode(&[9, 10], false).unwrap(), "ab ab");
        assert_eq!(files.tokenizer_config["bos_token"], "<|im_start|>");
        assert_eq!(files.tokenizer_config["chat_template"], "{{x}}");
        assert_eq!(
            files.tokenizer_config["added_tokens_decoder"]["2"]["special"],
            false
        );
        assert_eq!(files.special_tokens_map["unk_token"], "<|endoftext|>");
        assert!(files.special_tokens_map.get("pad_token").is_none());
        // with add_bos the post-processor puts BOS first when special tokens are asked for
        let tk = load(&hf_tokenizer_files(&small(true), 64).unwrap());
        assert_eq!(tk.encode("ab", true).unwrap().get_ids(), [1, 9]);
        assert_eq!(tk.encode("ab", false).unwrap().get_ids(), [9]);
    }

    #[test]
    fn gguf_vocabulary_survives_hf_and_back() {
        let dir = std::env::temp_dir().join(format!("bitsmith-hf-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v = small(true);
        let files = hf_tokenizer_files(&v, 64).unwrap();
        std::fs::write(dir.join("tokenizer.json"), files.tokenizer.to_string()).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            files.tokenizer_config.to_string(),
        )
        .unwrap();
        let back = read_vocab(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
            None,
            &json!({}),
            v.tokens.len(),
            None,
        )
        .unwrap();
        assert_eq!(back, v);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_what_it_cannot_rebuild() {
        let mut v = small(false);
        v.pre = "deepseek-llm".into();
        let e = hf_tokenizer_files(&v, 64).unwrap_err();
        assert!(format!("{e:#}").contains("--tokenizer-from"), "{e:#}");
        let mut v = small(false);
        v.tokens[4] = "a".into();
        let e = hf_tokenizer_files(&v, 64).unwrap_err();
        assert!(format!("{e:#}").contains("twice"), "{e:#}");
        let mut v = small(false);
        v.bos = Some(999);
        assert!(hf_tokenizer_files(&v, 64).is_err());
    }
}
