//! Evaluation text: WikiText-2 raw splits, rebuilt exactly as the reference pipelines see
//! them, or a user's own text file.

pub use crate::util::wikitext_joined;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where the evaluation text comes from.
#[derive(Debug, Clone)]
pub enum Corpus {
    /// WikiText-2 raw, split `test` or `valid`, found in a data directory.
    WikiText2 {
        split: String,
        data_dir: Option<PathBuf>,
    },
    /// A plain UTF-8 text file, used as-is.
    File(PathBuf),
}

/// Look for `wiki.<split>.raw` in `data_dir` (or `$BITSMITH_DATA_DIR`), directly or under
/// `wikitext-2-raw/`.
pub fn find_wikitext2(split: &str, data_dir: Option<&Path>) -> Result<PathBuf> {
    if !matches!(split, "test" | "valid") {
        bail!("WikiText-2 split `{split}` is not available (use `test` or `valid`)");
    }
    let file = format!("wiki.{split}.raw");
    let dir = match data_dir {
        Some(d) => d.to_path_buf(),
        None => match std::env::var_os("BITSMITH_DATA_DIR") {
            Some(d) => PathBuf::from(d),
            None => bail!(
                "--dataset wikitext2 needs the WikiText-2 raw files: pass --data-dir DIR or set BITSMITH_DATA_DIR \
                 to a folder holding {file} (or wikitext-2-raw/{file})"
            ),
        },
    };
    for candidate in [dir.join(&file), dir.join("wikitext-2-raw").join(&file)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no {file} in `{}` or `{}/wikitext-2-raw`",
        dir.display(),
        dir.display()
    )
}

/// The text to tokenize for `corpus`.
pub fn load_corpus_text(corpus: &Corpus) -> Result<String> {
    match corpus {
        Corpus::WikiText2 { split, data_dir } => {
            let path = find_wikitext2(split, data_dir.as_deref())?;
            let raw = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(wikitext_joined(&raw))
        }
        Corpus::File(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading text file {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_rule_matches_reference() {
        let raw = " \n = A = \n \nText here .\n";
        assert_eq!(wikitext_joined(raw), "\n\n = A = \n\n\n\n\nText here .\n");
    }
}
