//! An exclusive lock on an output folder for the life of a run, so two runs writing the
//! same OUT (its partial folder and checkpoint) cannot interleave. The lock is an advisory
//! file lock on `.NAME.lock` next to OUT, holding the owner's pid for the message a second
//! run prints; the kernel releases it when the process ends in any way, so a `kill -9`
//! never leaves a stale lock (a leftover file without a lock is simply reused).

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Held for the life of a run; dropped, the lock file is removed and the lock released.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    _file: File,
}

/// The lock file of an output folder: `.NAME.lock` next to it.
pub fn lock_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    output.with_file_name(format!(".{name}.lock"))
}

impl OutputLock {
    /// Take the lock of `output`, or fail at once naming the run that holds it.
    pub fn acquire(output: &Path) -> Result<Self> {
        let path = lock_path(output);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating parent folder `{}`", parent.display()))?;
        }
        // a holder removes the file before unlocking, so a lock taken on a file that is no
        // longer at `path` protects nothing: open again until the locked file is the one there
        for _ in 0..100 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("opening the lock file `{}`", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let mut pid = String::new();
                    file.read_to_string(&mut pid).ok();
                    let pid = pid.trim();
                    bail!(
                        "another bitsmith run (pid {}) is writing `{}`; wait for it to finish, \
                         stop it, or write to another folder (lock `{}`)",
                        if pid.is_empty() { "unknown" } else { pid },
                        output.display(),
                        path.display()
                    );
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking `{}`", path.display()))
                }
            }
            if same_file(&file, &path) {
                file.set_len(0)?;
                file.rewind()?;
                write!(file, "{}", std::process::id())?;
                file.flush()?;
                return Ok(Self { path, _file: file });
            }
        }
        bail!(
            "could not lock `{}`: it keeps being replaced",
            path.display()
        )
    }
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.is_file()
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // removed while still locked, so no other run can have locked this file meanwhile
        std::fs::remove_file(&self.path).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_and_release_allows_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let a = OutputLock::acquire(&out).unwrap();
        let err = OutputLock::acquire(&out).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(a);
        assert!(!lock_path(&out).exists());
        let _b = OutputLock::acquire(&out).unwrap();
    }
}
