//! Corpus text helpers shared by calibration and evaluation.

use crate::error::{ErrorKind, ResultExt};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// The Hugging Face rows of a `wiki.*.raw` file joined with `"\n\n"` (the GPTQ protocol):
/// one row per line; whitespace-only lines become `""`, others keep their `"\n"`.
pub fn wikitext_joined(raw: &str) -> String {
    let rows: Vec<&str> = raw
        .split_inclusive('\n')
        .map(|line| if line.trim().is_empty() { "" } else { line })
        .collect();
    rows.join("\n\n")
}

/// A text or JSONL file's text; an error that names the file when it is empty, not UTF-8
/// text, or JSONL without `text` fields.
///
/// Every failure is [`ErrorKind::InvalidInput`].
pub fn read_text_file(path: &Path) -> Result<String> {
    read_text(path).kind(ErrorKind::InvalidInput)
}

fn read_text(path: &Path) -> Result<String> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading text file {}", path.display()))?;
    let raw = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => bail!(
            "{} is not text: invalid UTF-8 at byte {}",
            path.display(),
            e.utf8_error().valid_up_to()
        ),
    };
    if let Some(at) = raw.find('\0') {
        bail!("{} is not text: a NUL byte at byte {at}", path.display());
    }
    let first = raw.lines().find(|l| !l.trim().is_empty());
    let Some(first) = first else {
        bail!("{} is empty (no text in it)", path.display());
    };
    let jsonl =
        path.extension().is_some_and(|e| e == "jsonl") || first.trim_start().starts_with('{');
    if !jsonl {
        return Ok(raw);
    }
    let mut docs = Vec::new();
    for (i, line) in raw
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        let text = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            anyhow::anyhow!("{}:{}: no string field `text`", path.display(), i + 1)
        })?;
        docs.push(text.to_string());
    }
    let joined = docs.join("\n\n");
    if joined.trim().is_empty() {
        bail!(
            "{} is empty: its `text` fields hold no text",
            path.display()
        );
    }
    Ok(joined)
}
