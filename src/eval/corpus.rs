//! Evaluation text: WikiText-2 raw splits, rebuilt exactly as the reference pipelines see
//! them, or a user's own text file.

pub use crate::util::{read_text_file, wikitext_joined};
use crate::error::{ErrorKind, ResultExt};
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
    /// A UTF-8 text file, used as-is, or JSONL (`.jsonl`, or a first line that is a JSON
    /// object) whose rows' `text` fields are joined with `"\n\n"`.
    File(PathBuf),
}

impl Corpus {
    /// How reports name the corpus: `wikitext2 test`, or the file's path.
    pub fn describe(&self) -> String {
        match self {
            Corpus::WikiText2 { split, .. } => format!("wikitext2 {split}"),
            Corpus::File(p) => p.display().to_string(),
        }
    }
}

/// Look for `wiki.<split>.raw` in `data_dir` (or `$BITSMITH_DATA_DIR`), directly or under
/// `wikitext-2-raw/`.
///
/// Every failure is [`ErrorKind::InvalidInput`].
pub fn find_wikitext2(split: &str, data_dir: Option<&Path>) -> Result<PathBuf> {
    find(split, data_dir).kind(ErrorKind::InvalidInput)
}

fn find(split: &str, data_dir: Option<&Path>) -> Result<PathBuf> {
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
                .with_context(|| format!("reading {}", path.display()))
                .kind(ErrorKind::InvalidInput)?;
            Ok(wikitext_joined(&raw))
        }
        Corpus::File(path) => read_text_file(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_files_and_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let plain = write("a.txt", b"Hello world\n");
        assert_eq!(read_text_file(&plain).unwrap(), "Hello world\n");
        let jsonl = write(
            "b.jsonl",
            b"{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 3}\n",
        );
        assert_eq!(read_text_file(&jsonl).unwrap(), "one\n\ntwo");
        let msg = |p: &Path| format!("{:#}", read_text_file(p).unwrap_err());
        let empty = write("empty.txt", b" \n\n");
        assert!(
            msg(&empty).contains("empty.txt is empty"),
            "{}",
            msg(&empty)
        );
        let binary = write("w.bin", &[b'a', 0xff, 0xfe, 0]);
        assert!(
            msg(&binary).contains("w.bin is not text"),
            "{}",
            msg(&binary)
        );
        let nul = write("n.txt", b"ab\0cd");
        assert!(msg(&nul).contains("n.txt is not text"), "{}", msg(&nul));
        let no_field = write("c.jsonl", b"{\"body\": \"x\"}\n");
        assert!(
            msg(&no_field).contains("c.jsonl:1: no string field `text`"),
            "{}",
            msg(&no_field)
        );
        let blank = write("d.jsonl", b"{\"text\": \"\"}\n");
        assert!(msg(&blank).contains("d.jsonl is empty"), "{}", msg(&blank));
    }

    #[test]
    fn rows_rule_matches_reference() {
        let raw = " \n = A = \n \nText here .\n";
        assert_eq!(wikitext_joined(raw), "\n\n = A = \n\n\n\n\nText here .\n");
    }
}
