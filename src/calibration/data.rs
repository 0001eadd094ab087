//! Calibration text → token segments: random windows of the tokenized text (methods.md
//! §1.1), reproducible from a seed.

use crate::util::{read_text_file, wikitext_joined, SplitMix64};
use crate::error::fail;
use anyhow::{anyhow, Result};
use std::path::PathBuf;
use tokenizers::Tokenizer;

/// The embedded default: the WikiText-2 validation split (see `calibration/README.md`).
pub const DEFAULT_TEXT: &str = include_str!("../../calibration/wikitext2-valid.raw");

/// Where calibration text comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum CalibrationSource {
    /// The embedded WikiText-2 validation split.
    Default,
    /// Plain text, or JSONL with a `text` field per line (`.jsonl` or a first line that is a
    /// JSON object).
    File(PathBuf),
}

impl CalibrationSource {
    pub fn describe(&self) -> String {
        match self {
            Self::Default => "wikitext2-valid (embedded)".into(),
            Self::File(p) => p.display().to_string(),
        }
    }

    /// The text to tokenize.
    pub fn text(&self) -> Result<String> {
        match self {
            Self::Default => Ok(wikitext_joined(DEFAULT_TEXT)),
            Self::File(p) => read_text_file(p),
        }
    }
}

/// Token segments for calibration.
#[derive(Debug, Clone)]
pub struct CalibrationSet {
    pub segments: Vec<Vec<u32>>,
    pub seqlen: usize,
    /// Source, counts and seed, for logs and checkpoint keys.
    pub description: String,
}

impl CalibrationSet {
    pub fn tokens(&self) -> usize {
        self.segments.len() * self.seqlen
    }
}

/// Tokenize `source` once and draw `nsamples` windows of `seqlen` tokens at uniformly random
/// start positions (seeded).
pub fn sample_segments(
    tokenizer: &Tokenizer,
    source: &CalibrationSource,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<CalibrationSet> {
    if nsamples == 0 || seqlen == 0 {
        fail!(
            InvalidOption,
            "--nsamples and the calibration --seqlen must be positive"
        );
    }
    let text = source.text()?;
    let ids = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow!("tokenizing calibration text: {e}"))?
        .get_ids()
        .to_vec();
    if ids.len() < seqlen {
        fail!(
            InvalidInput,
            "calibration text {} has {} tokens, fewer than one window of {seqlen}; use more text or a shorter --seqlen",
            source.describe(),
            ids.len()
        );
    }
    let mut rng = SplitMix64::new(seed);
    let span = (ids.len() - seqlen + 1) as u64;
    let segments = (0..nsamples)
        .map(|_| {
            let start = rng.below(span) as usize;
            ids[start..start + seqlen].to_vec()
        })
        .collect();
    Ok(CalibrationSet {
        segments,
        seqlen,
        description: format!(
            "{} ({} tokens): {nsamples} x {seqlen} tokens, seed {seed}",
            source.describe(),
            ids.len()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_text_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(&p, "{\"text\": \"a b\"}\n\n{\"text\": \"c\"}\n").unwrap();
        assert_eq!(
            CalibrationSource::File(p.clone()).text().unwrap(),
            "a b\n\nc"
        );
        std::fs::write(&p, "{\"txt\": 1}\n").unwrap();
        assert!(CalibrationSource::File(p)
            .text()
            .unwrap_err()
            .to_string()
            .contains("`text`"));
    }

    #[test]
    fn default_text_is_the_validation_split() {
        assert_eq!(DEFAULT_TEXT.len(), 1_146_846);
        assert!(DEFAULT_TEXT.starts_with(" \n = Homarus gammarus = \n"));
    }
}
