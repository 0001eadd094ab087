//! Atomic output folders: everything is written into a hidden temporary sibling that is
//! renamed into place only when complete. A failure, a panic or an interrupt (SIGINT,
//! SIGTERM, SIGHUP) never leaves a half-written folder under the requested name.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Output folders in flight: (temporary folder, target), removed by [`remove_pending`]
/// (the CLI's interrupt handler, [`crate::signals`]).
static PENDING: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<(PathBuf, PathBuf)>> {
    // a panic while holding the list leaves it usable
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Delete every temporary folder still being written; returns their targets. Called on
/// an interrupt: the lock it takes is also held around [`OutputFolder::commit`]'s renames,
/// so a folder is either removed before its commit or committed whole, never both halves.
pub fn remove_pending() -> Vec<PathBuf> {
    let mut pending = pending();
    pending
        .drain(..)
        .map(|(tmp, target)| {
            let _ = std::fs::remove_dir_all(tmp);
            target
        })
        .collect()
}

pub struct OutputFolder {
    target: PathBuf,
    tmp: PathBuf,
    overwrite: bool,
    committed: bool,
}

impl OutputFolder {
    /// Reserve `target`. Fails at once if it exists and `overwrite` is false, so a long
    /// run does not discover that at the end.
    pub fn create(target: &Path, overwrite: bool) -> Result<Self> {
        if target.exists() && !overwrite {
            bail!(
                "output `{}` already exists; pass --overwrite to replace it",
                target.display()
            );
        }
        let name = target
            .file_name()
            .with_context(|| format!("output path `{}` has no folder name", target.display()))?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating parent folder `{}`", parent.display()))?;
        remove_stale_partials(&parent, &name);
        let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).ok();
        }
        std::fs::create_dir(&tmp).with_context(|| format!("creating `{}`", tmp.display()))?;
        pending().push((tmp.clone(), target.to_path_buf()));
        Ok(Self {
            target: target.to_path_buf(),
            tmp,
            overwrite,
            committed: false,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Move the finished folder into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        let old = self.target.with_file_name(format!(
            ".{}.old-{}",
            self.target
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            std::process::id()
        ));
        // held across both renames: an interrupt waits for them (see `remove_pending`)
        let mut pending = pending();
        if !pending.iter().any(|(tmp, _)| tmp == &self.tmp) {
            bail!(
                "the unfinished output for `{}` was removed (interrupted)",
                self.target.display()
            );
        }
        let replacing = self.target.exists();
        if replacing {
            if !self.overwrite {
                bail!(
                    "output `{}` appeared while writing; not replacing it",
                    self.target.display()
                );
            }
            std::fs::rename(&self.target, &old)
                .with_context(|| format!("moving the old `{}` aside", self.target.display()))?;
        }
        std::fs::rename(&self.tmp, &self.target).with_context(|| {
            format!(
                "renaming `{}` to `{}`",
                self.tmp.display(),
                self.target.display()
            )
        })?;
        self.committed = true;
        pending.retain(|(tmp, _)| tmp != &self.tmp);
        drop(pending);
        if replacing {
            std::fs::remove_dir_all(&old).ok();
        }
        Ok(self.target.clone())
    }

    fn unregister(&self) {
        pending().retain(|(tmp, _)| tmp != &self.tmp);
    }
}

/// Remove `.NAME.partial-PID` folders left by runs that were killed outright (SIGKILL,
/// power loss), whose process no longer exists.
fn remove_stale_partials(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = Path::new("/proc").is_dir() && Path::new(&format!("/proc/{pid}")).exists();
        if Path::new("/proc").is_dir() && !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for OutputFolder {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
            self.unregister();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_folder_leaves_nothing_and_commit_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        {
            let o = OutputFolder::create(&target, false).unwrap();
            std::fs::write(o.path().join("x"), b"1").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let o = OutputFolder::create(&target, false).unwrap();
        std::fs::write(o.path().join("x"), b"1").unwrap();
        o.commit().unwrap();
        assert!(OutputFolder::create(&target, false).is_err());
        let o = OutputFolder::create(&target, true).unwrap();
        std::fs::write(o.path().join("y"), b"2").unwrap();
        o.commit().unwrap();
        assert!(target.join("y").exists() && !target.join("x").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // a partial folder of a dead process is cleaned up by the next run
        let stale = dir.path().join(".out.partial-4000000000");
        std::fs::create_dir(&stale).unwrap();
        drop(OutputFolder::create(&target, true).unwrap());
        assert!(!stale.exists());
    }
}
