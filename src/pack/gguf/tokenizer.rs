//! The `tokenizer.*` metadata of a GGUF file from a Hugging Face byte-level BPE tokenizer
//! (`tokenizer.json`, and `tokenizer_config.json` for the special tokens, `add_bos_token`
//! and the chat template), laid out as llama.cpp's `convert_hf_to_gguf.py` lays it out for
//! a `gpt2`-model vocabulary: one token per id up to the model's `vocab_size` (ids the
//! tokenizer lacks become `[PAD{id}]`, unused), token types (normal, control for special
//! added tokens, user-defined for other added tokens), merges as `"left right"` strings,
//! and the pre-tokenizer name llama.cpp selects its splitting regex by. A BPE converted from
//! SentencePiece becomes a `llama`-model vocabulary instead ([`super::tokenizer_spm`]).

use super::container::MetaValue;
use super::tokenizer_spm as spm;
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// The splitting regex of Llama 3's `tokenizer.json` (a `Split` before a regex-free
/// byte-level step), which llama.cpp names `llama-bpe` (also `llama3`, `llama-v3`).
pub const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama 3's with digits one at a time; llama.cpp's `qwen2`.
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`llama_token_type`).
pub const NORMAL: i32 = 1;
pub const CONTROL: i32 = 3;
pub const USER_DEFINED: i32 = 4;
pub const UNUSED: i32 = 5;

/// Which of llama.cpp's tokenizer models (`tokenizer.ggml.model`) a vocabulary is.
#[derive(Debug, Clone, PartialEq)]
pub enum VocabModel {
    /// `gpt2`: byte-level BPE, its merges and a named pre-tokenizer.
    ByteLevelBpe,
    /// `llama`: SentencePiece BPE, one score per piece (a higher score merges first), `▁`
    /// for spaces and `<0xXX>` pieces for bytes no piece covers.
    SentencePiece { scores: Vec<f32> },
}

impl VocabModel {
    /// The `tokenizer.ggml.model` name.
    pub fn name(&self) -> &'static str {
        match self {
            VocabModel::ByteLevelBpe => "gpt2",
            VocabModel::SentencePiece { .. } => "llama",
        }
    }
}

/// What the tokenizer files say, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    pub model: VocabModel,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// Byte-level BPE's merges as `"left right"`; empty for SentencePiece.
    pub merges: Vec<String>,
    /// llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`).
    pub pre: String,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: bool,
    pub chat_template: Option<String>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The pre-tokenizer llama.cpp needs for this `tokenizer.json`, recognised by structure:
/// a byte-level split alone is GPT-2's; individual digits before it is the split of
/// SmolLM (and StarCoder), which llama.cpp's converter names `smollm` for SmolLM models;
/// Llama 3's or Qwen2's regex before a regex-free byte-level step is `llama-bpe` or `qwen2`.
/// Anything else needs the name given explicitly (`--tokenizer-pre`): writing a wrong one
/// would tokenize differently without any error.
fn detect_pre(tok: &Value) -> Result<String> {
    let pre = &tok["pre_tokenizer"];
    let byte_level =
        |p: &Value| p["type"] == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true);
    let found = match pre["type"].as_str() {
        Some("ByteLevel") if byte_level(pre) => Some("gpt-2"),
        Some("Sequence") => match pre["pretokenizers"].as_array().map(Vec::as_slice) {
            Some([d, b])
                if d["type"] == "Digits" && d["individual_digits"] == true && byte_level(b) =>
            {
                Some("smollm")
            }
            Some([s, b])
                if s["type"] == "Split"
                    && s["behavior"] == "Isolated"
                    && s["invert"] == false
                    && b["type"] == "ByteLevel"
                    && b["use_regex"] == false =>
            {
                match s["pattern"]["Regex"].as_str() {
                    Some(LLAMA3_SPLIT) => Some("llama-bpe"),
                    Some(QWEN2_SPLIT) => Some("qwen2"),
                    _ => None,
                }
            }
            _ => None,
        },
        _ => None,
    };
    found.map(str::to_string).ok_or_else(|| {
        anyhow!(
            "the pre-tokenizer of this tokenizer.json ({}) is not one bitsmith recognises; \
             name llama.cpp's pre-tokenizer for it with --tokenizer-pre (as llama.cpp's \
             convert_hf_to_gguf.py names it, e.g. `llama-bpe`, `qwen2`, `gpt-2`)",
            serde_json::to_string(pre).unwrap_or_default()
        )
    })
}

/// llama.cpp's converter treats added tokens that look like `<|...|>` as control tokens
/// even when not flagged special.
fn looks_special(t: &str) -> bool {
    (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
}

/// Read the vocabulary for a model of `vocab_size` token ids. `pre` overrides the
/// detected pre-tokenizer name; `config` is the model's `config.json` (fallback ids).
pub fn read_vocab(
    tokenizer_json: &Path,
    tokenizer_config: Option<&Path>,
    chat_template_file: Option<&Path>,
    config: &Value,
    vocab_size: usize,
    pre: Option<&str>,
) -> Result<GgufVocab> {
    let where_ = || tokenizer_json.display().to_string();
    let tok = read_json(tokenizer_json)?;
    let model = &tok["model"];
    ensure!(
        model["type"] == "BPE",
        "{}: GGUF export writes BPE vocabularies (byte-level, or converted from SentencePiece); this tokenizer's model is {}",
        where_(),
        model["type"]
    );
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| anyhow!("{}: model.vocab is not an object", where_()))?;
    let mut by_id: HashMap<u32, String> = HashMap::new();
    let id_of = |v: &Value, what: &str| -> Result<u32> {
        v.as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| anyhow!("{}: {what} has id {v}, not a token id", where_()))
    };
    for (t, id) in vocab {
        by_id.insert(id_of(id, t)?, t.clone());
    }
    // added tokens: (special?) by id; they may also sit in the BPE vocabulary
    let mut added: HashMap<u32, bool> = HashMap::new();
    let mut content_id: HashMap<String, u32> = HashMap::new();
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let content = a["content"]
            .as_str()
            .ok_or_else(|| anyhow!("{}: an added token has no content", where_()))?;
        let id = id_of(&a["id"], content)?;
        by_id.insert(id, content.to_string());
        added.insert(id, a["special"].as_bool().unwrap_or(false));
        content_id.insert(content.to_string(), id);
    }
    if let Some(max) = by_id.keys().max() {
        ensure!(
            (*max as usize) < vocab_size,
            "{}: token id {max} is outside the model's vocab_size {vocab_size}",
            where_()
        );
    }
    let (mut tokens, mut token_types) = (
        Vec::with_capacity(vocab_size),
        Vec::with_capacity(vocab_size),
    );
    for id in 0..vocab_size as u32 {
        match by_id.get(&id) {
            None => {
                tokens.push(format!("[PAD{id}]"));
                token_types.push(UNUSED);
            }
            Some(t) => {
                tokens.push(t.clone());
                token_types.push(match added.get(&id) {
                    None => NORMAL,
                    Some(&special) if special || looks_special(t) => CONTROL,
                    Some(_) => USER_DEFINED,
                });
            }
        }
    }
    let merges = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::String(s) => match s.split_once(' ') {
                Some((a, b)) => Ok([a.to_string(), b.to_string()]),
                None => Err(anyhow!("{}: merge {m} is not two tokens", where_())),
            },
            Value::Array(p) => match p.as_slice() {
                [Value::String(a), Value::String(b)] => Ok([a.clone(), b.clone()]),
                _ => Err(anyhow!("{}: merge {m} is not a pair of strings", where_())),
            },
            _ => Err(anyhow!("{}: merge {m} is not a string or a pair", where_())),
        })
        .collect::<Result<Vec<_>>>()?;
    // a BPE converted from SentencePiece is written as llama.cpp's `llama` vocabulary
    let sentencepiece = spm::sentencepiece_prefix(&tok);
    if let (Some(_), Some(p)) = (sentencepiece, pre) {
        bail!(
            "{}: --tokenizer-pre {p} names a byte-level pre-tokenizer, but this tokenizer is \
             SentencePiece-style (byte fallback, `▁` for spaces) and is written as llama.cpp's \
             `llama` vocabulary, which has none",
            where_()
        );
    }
    let (model, merges, pre) = match sentencepiece {
        Some(_) => (
            VocabModel::SentencePiece {
                scores: spm::scores_from_merges(&tokens, &merges),
            },
            Vec::new(),
            "default".to_string(),
        ),
        None => (
            VocabModel::ByteLevelBpe,
            merges.iter().map(|[a, b]| format!("{a} {b}")).collect(),
            match pre {
                Some(p) => p.to_string(),
                None => detect_pre(&tok).with_context(where_)?,
            },
        ),
    };

    let tc = match tokenizer_config {
        Some(p) => read_json(p)?,
        None => Value::Null,
    };
    // a special token named in tokenizer_config.json (a string or {"content": ...}), else
    // the id config.json gives
    let special = |kind: &str| -> Option<u32> {
        let named = &tc[format!("{kind}_token")];
        let content = named.as_str().or_else(|| named["content"].as_str());
        content
            .and_then(|c| {
                content_id
                    .get(c)
                    .copied()
                    .or_else(|| vocab.get(c).and_then(|v| v.as_u64()).map(|v| v as u32))
            })
            .or_else(|| {
                config[format!("{kind}_token_id")]
                    .as_u64()
                    .map(|v| v as u32)
            })
    };
    let chat_template = match chat_template_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => tc["chat_template"].as_str().map(str::to_string),
    };
    if tc["chat_template"].is_array() && chat_template.is_none() {
        bail!("tokenizer_config.json holds several named chat templates; GGUF export writes one (not done yet)");
    }
    let add_space_prefix =
        sentencepiece.unwrap_or_else(|| tc["add_prefix_space"].as_bool().unwrap_or(false));
    let unk = special("unk");
    if matches!(model, VocabModel::SentencePiece { .. }) {
        // the types llama.cpp's SentencePiece tokenizer looks for: its byte-fallback
        // pieces, and the unknown token
        for (i, (t, ty)) in tokens.iter().zip(token_types.iter_mut()).enumerate() {
            if *ty == NORMAL && spm::is_byte_piece(t) {
                *ty = spm::BYTE;
            } else if unk == Some(i as u32) {
                *ty = spm::UNKNOWN;
            }
        }
    }
    Ok(GgufVocab {
        model,
        tokens,
        token_types,
        merges,
        pre,
        bos: special("bos"),
        eos: special("eos"),
        unk,
        pad: special("pad"),
        add_bos: tc["add_bos_token"].as_bool(),
        add_eos: tc["add_eos_token"].as_bool(),
        add_space_prefix,
        chat_template,
    })
}

impl GgufVocab {
    /// The `tokenizer.*` metadata entries.
    pub fn metadata(&self) -> Vec<(String, MetaValue)> {
        let mut m = vec![
            (
                "tokenizer.ggml.model".to_string(),
                MetaValue::String(self.model.name().into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                MetaValue::String(self.pre.clone()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                MetaValue::strings(self.tokens.iter().cloned()),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                MetaValue::i32s(self.token_types.iter().copied()),
            ),
            (
                "tokenizer.ggml.add_space_prefix".to_string(),
                MetaValue::Bool(self.add_space_prefix),
            ),
        ];
        m.push(match &self.model {
            VocabModel::ByteLevelBpe => (
                "tokenizer.ggml.merges".to_string(),
                MetaValue::strings(self.merges.iter().cloned()),
            ),
            VocabModel::SentencePiece { scores } => (
                "tokenizer.ggml.scores".to_string(),
                MetaValue::f32s(scores.iter().copied()),
            ),
        });
        for (key, id) in [
            ("bos_token_id", self.bos),
            ("eos_token_id", self.eos),
            ("unknown_token_id", self.unk),
            ("padding_token_id", self.pad),
        ] {
            if let Some(id) = id {
                m.push((format!("tokenizer.ggml.{key}"), MetaValue::U32(id)));
            }
        }
        for (key, flag) in [
            ("add_bos_token", self.add_bos),
            ("add_eos_token", self.add_eos),
        ] {
            if let Some(f) = flag {
                m.push((format!("tokenizer.ggml.{key}"), MetaValue::Bool(f)));
            }
        }
        if let Some(t) = &self.chat_template {
            m.push((
                "tokenizer.chat_template".to_string(),
                MetaValue::String(t.clone()),
            ));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn layout_of_a_small_vocabulary() {
        let dir = std::env::temp_dir().join(format!("bitsmith-gguf-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok = json!({
            "added_tokens": [
                {"id": 0, "content": "<|endoftext|>", "special": true},
                {"id": 1, "content": "<|im_start|>", "special": false},
                {"id": 5, "content": "<custom>", "special": false},
            ],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
            "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "a": 2, "b": 3, "ab": 4},
                      "merges": [["a", "b"]]},
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            json!({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>",
                   "add_bos_token": true, "chat_template": "{{x}}"})
            .to_string(),
        )
        .unwrap();
        let v = read_vocab(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
            None,
            &json!({"pad_token_id": 4}),
            8,
            None,
        )
        .unwrap();
        assert_eq!(
            v.tokens,
            [
                "<|endoftext|>",
                "<|im_start|>",
                "a",
                "b",
                "ab",
                "<custom>",
                "[PAD6]",
                "[PAD7]"
            ]
        );
        assert_eq!(
            v.token_types,
            [
                CONTROL,
                CONTROL,
                NORMAL,
                NORMAL,
                NORMAL,
                USER_DEFINED,
                UNUSED,
                UNUSED
            ]
        );
        assert_eq!(v.merges, ["a b"]);
        assert_eq!(v.pre, "gpt-2");
        assert_eq!(
            (v.bos, v.eos, v.unk, v.pad),
            (Some(1), Some(0), None, Some(4))
        );
        assert_eq!(v.add_bos, Some(true));
        assert_eq!(v.chat_template.as_deref(), Some("{{x}}"));
        // an id beyond vocab_size, and an unknown pre-tokenizer, are errors
        assert!(read_vocab(&dir.join("tokenizer.json"), None, None, &json!({}), 5, None).is_err());
        let mut odd = tok.clone();
        odd["pre_tokenizer"] = json!({"type": "Metaspace"});
        std::fs::write(dir.join("odd.json"), odd.to_string()).unwrap();
        let e = read_vocab(&dir.join("odd.json"), None, None, &json!({}), 8, None).unwrap_err();
        assert!(format!("{e:#}").contains("--tokenizer-pre"), "{e:#}");
        assert_eq!(
            read_vocab(&dir.join("odd.json"), None, None, &json!({}), 8, Some("x"))
                .unwrap()
                .pre,
            "x"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
