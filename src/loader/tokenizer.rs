//! Tokenizer loading (`tokenizer.json`, the `tokenizers` crate).

use super::ModelFiles;
use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

/// Load the model's `tokenizer.json`; errors name the model and the file.
pub fn load_tokenizer(files: &ModelFiles) -> Result<Tokenizer> {
    let path = files.tokenizer.as_ref().ok_or_else(|| {
        anyhow!(
            "model `{}` has no tokenizer.json (only the `tokenizers` JSON format is supported)",
            files.source
        )
    })?;
    Tokenizer::from_file(path).map_err(|e| anyhow!("reading tokenizer `{}`: {e}", path.display()))
}
