//! GGUF SentencePiece (`tokenizer.ggml.model = "llama"`) metadata from a Hugging Face
//! `tokenizer.json` that transformers converted from a SentencePiece model (Llama 1/2,
//! Mistral v0.1, TinyLlama…) — the inverse of [`super::hf_tokenizer_spm`].
//!
//! Such a `tokenizer.json` is a BPE with byte fallback whose spaces are `▁` (a `Replace`
//! normalizer, or a non-splitting `Metaspace` pre-tokenizer). It keeps no piece scores,
//! only merges; llama.cpp merges the adjacent pair whose concatenation has the highest
//! score. A piece's score is therefore minus the rank of the first merge that makes it, so
//! llama.cpp merges in the order of the merges. Pieces no merge makes (characters, bytes,
//! added tokens) score below every merge.

use serde_json::Value;
use std::collections::HashMap;

/// llama.cpp's token types for SentencePiece (`llama_token_type`).
pub const UNKNOWN: i32 = 2;
pub const BYTE: i32 = 6;

const SPACE: &str = "\u{2581}";

/// `Some(add_space_prefix)` when `tok` is a SentencePiece-style BPE (byte fallback, spaces
/// as `▁`, nothing splitting the text), else `None`.
pub fn sentencepiece_prefix(tok: &Value) -> Option<bool> {
    if tok["model"]["byte_fallback"] != true {
        return None;
    }
    let replaces_spaces =
        |n: &Value| n["type"] == "Replace" && n["pattern"]["String"] == " " && n["content"] == SPACE;
    let prepends = |n: &Value| n["type"] == "Prepend" && n["prepend"] == SPACE;
    let (norm, pre) = (&tok["normalizer"], &tok["pre_tokenizer"]);
    match (norm["type"].as_str(), pre["type"].as_str()) {
        // transformers' legacy Llama conversion: Prepend("▁") + Replace(" ", "▁")
        (Some("Sequence"), None) => match norm["normalizers"].as_array()?.as_slice() {
            [p, r] if prepends(p) && replaces_spaces(r) => Some(true),
            [r] if replaces_spaces(r) => Some(false),
            _ => None,
        },
        (Some("Replace"), None) if replaces_spaces(norm) => Some(false),
        // the newer one: a Metaspace pre-tokenizer that does not split on spaces
        (None, Some("Metaspace")) if pre["replacement"] == SPACE && pre["split"] == false => {
            Some(match pre["prepend_scheme"].as_str() {
                Some(scheme) => scheme != "never",
                None => pre["add_prefix_space"].as_bool().unwrap_or(true),
            })
        }
        _ => None,
    }
}

/// A `<0xXX>` byte-fallback piece.
pub fn is_byte_piece(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// One score per token: minus the rank of the first merge making it, or minus the number
/// of merges, less one, for tokens no merge makes.
pub fn scores_from_merges(tokens: &[String], merges: &[[String; 2]]) -> Vec<f32> {
    let unmade = -(merges.len() as f32) - 1.0;
    let id: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut scores = vec![unmade; tokens.len()];
    for (rank, [l, r]) in merges.iter().enumerate() {
        if let Some(&i) = id.get(format!("{l}{r}").as_str()) {
            if scores[i] == unmade {
                scores[i] = -(rank as f32);
            }
        }
    }
    scores
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recognises_both_llama_conversions() {
        let bpe = json!({"type": "BPE", "byte_fallback": true});
        let legacy = json!({"model": bpe, "pre_tokenizer": null, "normalizer": {"type": "Sequence",
            "normalizers": [{"type": "Prepend", "prepend": "▁"},
                            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}});
        assert_eq!(sentencepiece_prefix(&legacy), Some(true));
        let meta = json!({"model": bpe, "normalizer": null, "pre_tokenizer": {"type": "Metaspace",
            "replacement": "▁", "prepend_scheme": "first", "split": false}});
        assert_eq!(sentencepiece_prefix(&meta), Some(true));
        let mut never = meta.clone();
        never["pre_tokenizer"]["prepend_scheme"] = json!("never");
        assert_eq!(sentencepiece_prefix(&never), Some(false));
        // splitting on spaces, or no byte fallback, is not SentencePiece's tokenization
        let mut split = meta.clone();
        split["pre_tokenizer"]["split"] = json!(true);
        assert_eq!(sentencepiece_prefix(&split), None);
        let mut no_fallback = legacy.clone();
        no_fallback["model"]["byte_fallback"] = json!(false);
        assert_eq!(sentencepiece_prefix(&no_fallback), None);
    }

    #[test]
    fn scores_follow_the_first_merge_making_a_piece() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let tokens = t(&["a", "b", "c", "ab", "abc", "<0x0A>"]);
        let m = |l: &str, r: &str| [l.to_string(), r.to_string()];
        let merges = [m("a", "b"), m("ab", "c"), m("a", "bc")];
        assert_eq!(
            scores_from_merges(&tokens, &merges),
            [-4.0, -4.0, -4.0, 0.0, -1.0, -4.0]
        );
        assert!(is_byte_piece("<0x0A>") && is_byte_piece("<0xff>"));
        assert!(!is_byte_piece("<0x0G>") && !is_byte_piece("<s>"));
    }
}
