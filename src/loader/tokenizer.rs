//! Tokenizer loading (`tokenizer.json`, the `tokenizers` crate).

use super::ModelFiles;
use crate::error::{tagged, ErrorKind};
use tokenizers::Tokenizer;

/// Load the model's `tokenizer.json`; errors name the model and the file. A missing or
/// unreadable tokenizer is [`ErrorKind::InvalidModel`].
pub fn load_tokenizer(files: &ModelFiles) -> crate::Result<Tokenizer> {
    let path = files.tokenizer.as_ref().ok_or_else(|| {
        tagged(
            ErrorKind::InvalidModel,
            format!(
                "model `{}` has no tokenizer.json (only the `tokenizers` JSON format is supported)",
                files.source
            ),
        )
    })?;
    Tokenizer::from_file(path).map_err(|e| {
        tagged(
            ErrorKind::InvalidModel,
            format!("reading tokenizer `{}`: {e}", path.display()),
        )
        .into()
    })
}
