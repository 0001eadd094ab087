//! A `.gguf` file given where a model is expected (`ppl`, `quantize`, `generate`, the
//! Rust API): decoded once by [`import_gguf`] into a Hugging Face folder in bitsmith's
//! cache, and that folder reused for as long as the file is unchanged (same path, size
//! and modification time). The loader itself reads folders and repo ids only; the GGUF
//! reader lives with the format, so this step sits here, above the loader.

use super::import::{import_gguf, ImportOptions, StoredDtype};
use crate::error::{fail, ErrorKind, ResultExt};
use crate::loader::{resolve_model, ModelFiles};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Resolve `model` as [`resolve_model`] does, and also take a GGUF file (a path ending in
/// `.gguf`): it is decoded to exact f32 weights, config and tokenizer in
/// `$BITSMITH_CACHE/gguf/` (default `$XDG_CACHE_HOME/bitsmith`, else
/// `~/.cache/bitsmith`) the first time, and read from there afterwards.
///
/// Errors: those of [`resolve_model`]; [`ErrorKind::InvalidOption`] for a revision with a
/// file; [`ErrorKind::InvalidModel`] when the decode fails: the file is not a `llama` GGUF
/// bitsmith decodes, its vocabulary cannot be rebuilt, or (marked the same, though not
/// the file's fault) the cache folder cannot be written.
pub fn resolve_model_or_gguf(model: &str, revision: Option<&str>) -> crate::Result<ModelFiles> {
    let path = Path::new(model);
    if !is_gguf_path(path) {
        return resolve_model(model, revision);
    }
    if revision.is_some() {
        fail!(
            InvalidOption,
            "--revision only applies to Hugging Face repo ids, but `{model}` is a GGUF file"
        );
    }
    let folder = cached_conversion(path)?;
    let mut files = resolve_model(&folder.to_string_lossy(), None)?;
    files.source = model.to_string();
    Ok(files)
}

/// A file whose name ends in `.gguf` (any case). Folders named so are folders.
pub fn is_gguf_path(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The cache folder holding `gguf` decoded, converting it first when it is not there.
fn cached_conversion(gguf: &Path) -> crate::Result<PathBuf> {
    let target = cache_entry(gguf).kind(ErrorKind::InvalidInput)?;
    if target.join("config.json").is_file() {
        return Ok(target);
    }
    let size = std::fs::metadata(gguf).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "gguf         decoding {} ({:.1} MiB) to f32 in {} (once: reused while the file is unchanged)",
        gguf.display(),
        size as f64 / (1 << 20) as f64,
        target.display()
    );
    let opts = ImportOptions {
        tokenizer_from: None,
        dtype: StoredDtype::F32,
        overwrite: false,
    };
    match import_gguf(gguf, &target, &opts) {
        Ok(folder) => Ok(folder),
        // another process finished the same conversion first
        Err(_) if target.join("config.json").is_file() => Ok(target),
        Err(e) => Err(e)
            .with_context(|| {
                format!(
                    "reading `{}` as a model (when its vocabulary cannot be rebuilt, run \
                     `bitsmith convert {} --tokenizer-from DIR -o FOLDER` and pass FOLDER)",
                    gguf.display(),
                    gguf.display()
                )
            })
            .kind(ErrorKind::InvalidModel)
            .map_err(Into::into),
    }
}

/// `<cache>/gguf/<file stem>-<hash of path, size and modification time>`: a changed or
/// replaced file gets a new entry rather than a stale one.
fn cache_entry(gguf: &Path) -> Result<PathBuf> {
    let canonical = gguf
        .canonicalize()
        .with_context(|| format!("resolving `{}`", gguf.display()))?;
    let meta = std::fs::metadata(&canonical)
        .with_context(|| format!("reading the metadata of `{}`", gguf.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    let identity = format!(
        "{}\0{}\0{}.{:09}",
        canonical.display(),
        meta.len(),
        modified.as_secs(),
        modified.subsec_nanos()
    );
    let stem = canonical
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(cache_root()?
        .join("gguf")
        .join(format!("{stem}-{:016x}", fnv1a64(identity.as_bytes()))))
}

fn cache_root() -> Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("BITSMITH_CACHE") {
        return Ok(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(dir.join("bitsmith"));
    }
    var("HOME")
        .map(|h| h.join(".cache").join("bitsmith"))
        .context("no cache folder for the decoded GGUF: set BITSMITH_CACHE (or HOME)")
}

/// FNV-1a, 64 bits: a cache key stable across builds and Rust versions (std's hasher
/// promises neither).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        // from the FNV reference (Fowler, Noll, Vo): "" and "a"
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_changed_file_gets_a_new_cache_entry() {
        let dir = std::env::temp_dir().join(format!("bitsmith-gguf-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.gguf");
        std::fs::write(&f, b"GGUF one").unwrap();
        let first = cache_entry(&f).unwrap();
        assert_eq!(first, cache_entry(&f).unwrap(), "the key is deterministic");
        std::fs::write(&f, b"GGUF longer content").unwrap();
        let second = cache_entry(&f).unwrap();
        assert_ne!(first, second, "a different size must not reuse the old decode");
        assert!(second.file_name().unwrap().to_string_lossy().starts_with("m-"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn only_files_named_gguf_are_taken_as_gguf() {
        let dir = std::env::temp_dir().join(format!("bitsmith-gguf-name-{}", std::process::id()));
        let named_dir = dir.join("folder.gguf");
        std::fs::create_dir_all(&named_dir).unwrap();
        std::fs::write(dir.join("x.GGUF"), b"GGUF").unwrap();
        std::fs::write(dir.join("x.bin"), b"GGUF").unwrap();
        assert!(is_gguf_path(&dir.join("x.GGUF")));
        assert!(!is_gguf_path(&dir.join("x.bin")));
        assert!(!is_gguf_path(&named_dir));
        std::fs::remove_dir_all(&dir).ok();
    }
}
