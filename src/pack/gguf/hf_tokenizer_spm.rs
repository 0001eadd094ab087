//! The parts of a Hugging Face `tokenizer.json` that differ for a SentencePiece vocabulary
//! (`tokenizer.ggml.model = "llama"`: Llama 1/2, Mistral v0.1, TinyLlama, Phi-3…), as
//! transformers' `LlamaConverter` writes them from a `tokenizer.model`:
//!
//! - a BPE model with `byte_fallback` (pieces `<0x00>`…`<0xFF>` for bytes no piece covers)
//!   and `fuse_unk`, whose merges are made from the pieces' scores: every split of a piece
//!   into two pieces of the vocabulary is a merge, ranked by the piece's score, highest
//!   first. That is the order llama.cpp's SentencePiece tokenizer merges in (the adjacent
//!   pair whose concatenation has the highest score, leftmost on a tie);
//! - a normalizer that turns spaces into `▁` (and puts one in front of the text when
//!   `tokenizer.ggml.add_space_prefix`, llama.cpp's default for this model), no
//!   pre-tokenizer;
//! - a decoder that undoes both (`▁` → space, bytes fused, the leading space stripped).

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use std::collections::HashMap;

const SPACE: &str = "\u{2581}";

/// The BPE merges of a SentencePiece vocabulary, as `[left, right]` pairs, highest score
/// first. Pieces are split between characters (not bytes); a piece's splits keep the
/// order of their halves' ids, and equal scores keep the order of the pieces' ids (a
/// stable sort), as transformers' `SentencePieceExtractor` orders them.
pub fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Result<Vec<[String; 2]>> {
    ensure!(
        tokens.len() == scores.len(),
        "the GGUF has {} tokens but {} scores",
        tokens.len(),
        scores.len()
    );
    let id: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let start = merges.len();
        for (cut, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (id.get(&piece[..cut]), id.get(&piece[cut..])) {
                merges.push((score, l, r));
            }
        }
        merges[start..].sort_by_key(|&(_, l, r)| (l, r));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(merges
        .into_iter()
        .map(|(_, l, r)| [tokens[l].clone(), tokens[r].clone()])
        .collect())
}

/// `model` of the `tokenizer.json`: the BPE over `vocab` (piece → id) with byte fallback.
pub fn model(
    vocab: serde_json::Map<String, Value>,
    tokens: &[String],
    scores: &[f32],
    unk: Option<&str>,
) -> Result<Value> {
    Ok(json!({"type": "BPE", "dropout": null, "unk_token": unk,
              "continuing_subword_prefix": null, "end_of_word_suffix": null,
              "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
              "vocab": vocab, "merges": merges_from_scores(tokens, scores)?}))
}

/// `normalizer`: spaces to `▁`, and a `▁` in front of the text with the space prefix.
pub fn normalizer(add_space_prefix: bool) -> Value {
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE});
    if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE}, replace]})
    } else {
        replace
    }
}

/// `decoder`: `▁` back to spaces, byte pieces to text, the prefix space dropped.
pub fn decoder(add_space_prefix: bool) -> Value {
    let mut steps = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        steps.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({"type": "Sequence", "decoders": steps})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn merges_rank_by_the_merged_piece_score() {
        let tokens = s(&["a", "b", "c", "ab", "bc", "abc", "▁", "▁a"]);
        let scores = [0.0, 0.0, 0.0, -3.0, -1.0, -2.0, 0.0, -0.5];
        let m = merges_from_scores(&tokens, &scores).unwrap();
        let pairs: Vec<String> = m.iter().map(|[l, r]| format!("{l} {r}")).collect();
        // ▁a (-0.5), bc (-1), abc's two splits in id order (-2), ab (-3)
        assert_eq!(pairs, ["▁ a", "b c", "a bc", "ab c", "a b"]);
    }

    #[test]
    fn merges_split_between_characters_not_bytes() {
        let tokens = s(&["é", "x", "éx"]);
        let m = merges_from_scores(&tokens, &[0.0, 0.0, -1.0]).unwrap();
        assert_eq!(m, [["é".to_string(), "x".to_string()]]);
        assert!(merges_from_scores(&tokens, &[0.0]).is_err());
    }
}
