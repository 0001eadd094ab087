//! Corpus text helpers shared by calibration and evaluation.

/// The Hugging Face rows of a `wiki.*.raw` file joined with `"\n\n"` (the GPTQ protocol):
/// one row per line; whitespace-only lines become `""`, others keep their `"\n"`.
pub fn wikitext_joined(raw: &str) -> String {
    let rows: Vec<&str> = raw
        .split_inclusive('\n')
        .map(|line| if line.trim().is_empty() { "" } else { line })
        .collect();
    rows.join("\n\n")
}
