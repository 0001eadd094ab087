//! Turn the user's `MODEL` argument into local files.
//!
//! `MODEL` is either a folder on disk or a Hugging Face repo id (`org/name`). Repo ids are
//! resolved through the hub cache (`HF_HOME`, default `~/.cache/huggingface`). With
//! `HF_HUB_OFFLINE=1` only the cache is consulted and the network is never touched;
//! otherwise missing files are downloaded with `HF_TOKEN` (or the cached login token).

use crate::error::{fail, ErrorKind, ResultExt};
use anyhow::{anyhow, bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Files the loader and the packer need, all on local disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user asked for, for messages and provenance.
    pub source: String,
    /// Resolved commit hash when the model came from the hub.
    pub revision: Option<String>,
    pub config: PathBuf,
    /// One or more safetensors shards.
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    /// Small side files copied verbatim into a packed output (tokenizer config, chat template…).
    pub extras: Vec<(String, PathBuf)>,
}

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";
const TOKENIZER_FILE: &str = "tokenizer.json";
/// Copied into packed outputs when present.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Resolve `model` (folder or repo id) at `revision` (hub only; default `main`).
///
/// Errors: [`ErrorKind::ModelNotFound`] when nothing answers to `model`,
/// [`ErrorKind::InvalidModel`] when its files are incomplete or malformed,
/// [`ErrorKind::InvalidOption`] for a revision of a local folder.
pub fn resolve_model(model: &str, revision: Option<&str>) -> crate::Result<ModelFiles> {
    Ok(resolve(model, revision)?)
}

fn resolve(model: &str, revision: Option<&str>) -> Result<ModelFiles> {
    let path = Path::new(model);
    if path.is_dir() {
        if revision.is_some() {
            fail!(
                InvalidOption,
                "--revision only applies to Hugging Face repo ids, but `{model}` is a local folder"
            );
        }
        return resolve_folder(path, model).kind(ErrorKind::InvalidModel);
    }
    if path.exists() {
        fail!(
            ModelNotFound,
            "`{model}` is a file; MODEL must be a model folder, a Hugging Face repo id or a GGUF file named `*.gguf`"
        );
    }
    if !looks_like_repo_id(model) {
        fail!(
            ModelNotFound,
            "no model folder at `{model}` (and it is not a Hugging Face repo id of the form `org/name`)"
        );
    }
    resolve_hub(model, revision.unwrap_or("main"))
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p != &"."
                && p != &".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn resolve_folder(dir: &Path, source: &str) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!("model folder `{}` has no config.json", dir.display());
    }
    let weights = if dir.join(INDEX_FILE).is_file() {
        shard_names(&dir.join(INDEX_FILE))?
            .into_iter()
            .map(|f| dir.join(f))
            .collect()
    } else if dir.join(SINGLE_FILE).is_file() {
        vec![dir.join(SINGLE_FILE)]
    } else {
        bail!(
            "model folder `{}` has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors weights are supported)",
            dir.display()
        );
    };
    for w in &weights {
        if !w.is_file() {
            bail!(
                "weight shard `{}` named in {INDEX_FILE} is missing",
                w.display()
            );
        }
    }
    let tokenizer = Some(dir.join(TOKENIZER_FILE)).filter(|p| p.is_file());
    let extras = SIDE_FILES
        .iter()
        .map(|f| (f.to_string(), dir.join(f)))
        .filter(|(_, p)| p.is_file())
        .collect();
    Ok(ModelFiles {
        source: source.to_string(),
        revision: None,
        config,
        weights,
        tokenizer,
        extras,
    })
}

/// The distinct shard file names of a `model.safetensors.index.json`, in first-use order.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{} has no `weight_map` object", index.display()))?;
    let mut names: Vec<String> = Vec::new();
    for file in map.values() {
        let f = file
            .as_str()
            .ok_or_else(|| anyhow!("{}: weight_map values must be file names", index.display()))?;
        if f.contains('/') || f.contains("..") {
            bail!(
                "{}: shard name `{f}` must be a plain file name",
                index.display()
            );
        }
        if !names.iter().any(|n| n == f) {
            names.push(f.to_string());
        }
    }
    if names.is_empty() {
        bail!("{}: weight_map is empty", index.display());
    }
    Ok(names)
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn resolve_hub(repo_id: &str, revision: &str) -> Result<ModelFiles> {
    let cache = Cache::from_env();
    let snapshot = cached_snapshot(&cache, repo_id, revision);
    let snapshot_complete = snapshot
        .as_ref()
        .map(|(dir, _)| snapshot_has_weights(dir))
        .unwrap_or(false);
    if let (Some((dir, commit)), true) = (&snapshot, snapshot_complete) {
        let mut files = resolve_folder(dir, repo_id)
            .with_context(|| format!("hub cache entry of `{repo_id}` at revision `{revision}`"))
            .kind(ErrorKind::InvalidModel)?;
        files.revision = Some(commit.clone());
        return Ok(files);
    }
    if offline() {
        fail!(
            ModelNotFound,
            "`{repo_id}` (revision `{revision}`) is not in the Hugging Face cache at `{}` and HF_HUB_OFFLINE is set; \
             download it first or point HF_HOME at the cache that holds it",
            cache.path().display()
        );
    }
    download(&cache, repo_id, revision)
}

/// The snapshot folder and commit hash for `revision` (a branch/tag name or a commit hash).
fn cached_snapshot(cache: &Cache, repo_id: &str, revision: &str) -> Option<(PathBuf, String)> {
    let repo_dir = cache
        .path()
        .join(format!("models--{}", repo_id.replace('/', "--")));
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => {
            revision.to_string()
        }
        Err(_) => return None,
    };
    let dir = repo_dir.join("snapshots").join(&commit);
    dir.is_dir().then_some((dir, commit))
}

fn snapshot_has_weights(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    if dir.join(INDEX_FILE).is_file() {
        return shard_names(&dir.join(INDEX_FILE))
            .map(|names| names.iter().all(|n| dir.join(n).is_file()))
            .unwrap_or(false);
    }
    dir.join(SINGLE_FILE).is_file()
}

fn download(cache: &Cache, repo_id: &str, revision: &str) -> Result<ModelFiles> {
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| cache.token());
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_token(token)
        .with_progress(true)
        .build()
        .context("building the Hugging Face hub client")?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    // a file the hub does not give: the repo, revision or file is missing, access is
    // refused or the hub cannot be reached
    let fetch = |file: &str| {
        repo.get(file)
            .with_context(|| format!("downloading `{file}` of `{repo_id}` (revision `{revision}`)"))
            .kind(ErrorKind::ModelNotFound)
    };
    let config = fetch("config.json")?;
    let weights = match repo.get(INDEX_FILE) {
        Ok(index) => shard_names(&index).kind(ErrorKind::InvalidModel)?
            .iter()
            .map(|f| fetch(f))
            .collect::<Result<Vec<_>>>()?,
        Err(_) => vec![fetch(SINGLE_FILE)?],
    };
    let tokenizer = repo.get(TOKENIZER_FILE).ok();
    let extras = SIDE_FILES
        .iter()
        .filter_map(|f| repo.get(f).ok().map(|p| (f.to_string(), p)))
        .collect();
    let commit = cached_snapshot(cache, repo_id, revision).map(|(_, c)| c);
    Ok(ModelFiles {
        source: repo_id.to_string(),
        revision: commit,
        config,
        weights,
        tokenizer,
        extras,
    })
}

#[cfg(test)]
mod tests {
    use super::looks_like_repo_id;

    #[test]
    fn repo_id_shapes() {
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M"));
        assert!(!looks_like_repo_id("./model"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
    }
}
