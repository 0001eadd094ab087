//! Interrupts end a command one way whatever sent them: Ctrl-C (SIGINT), `kill`, `timeout`,
//! systemd or Kubernetes (SIGTERM), a closed terminal (SIGHUP). The unfinished output
//! folder is removed ([`crate::pack::output::remove_pending`]), a message on stderr says
//! what happened (with any line a running command registered through
//! [`note_on_interrupt`], e.g. where its checkpoint is), and the process exits with
//! `128 + signal` (130, 143, 129) as shells do, so scripts can tell an interrupt from an
//! error.
//!
//! A thread waits for the signals (signal-hook's iterator) and does the work outside the
//! signal handler, where removing folders and printing are allowed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

static NOTES: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
static NEXT_NOTE: AtomicU64 = AtomicU64::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A line printed on interrupt while this guard lives; dropped, it is forgotten.
#[must_use = "the note is removed when the guard is dropped"]
#[derive(Debug)]
pub struct InterruptNote(u64);

/// Register `line` to be printed if the process is interrupted before the returned guard
/// is dropped (lines print in the order registered).
pub fn note_on_interrupt(line: impl Into<String>) -> InterruptNote {
    let id = NEXT_NOTE.fetch_add(1, Ordering::Relaxed);
    lock_notes().push((id, line.into()));
    InterruptNote(id)
}

impl Drop for InterruptNote {
    fn drop(&mut self) {
        lock_notes().retain(|(id, _)| *id != self.0);
    }
}

fn lock_notes() -> std::sync::MutexGuard<'static, Vec<(u64, String)>> {
    // a panic elsewhere while holding the list leaves it usable
    NOTES.lock().unwrap_or_else(|e| e.into_inner())
}

/// True once an interrupt is being handled: the process is about to exit with `128 +
/// signal`, and an error the main thread meets meanwhile (its output folder vanished) is a
/// consequence, not the story to tell.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Clean up after `signal` (named `name`), print the message, and return the exit code.
pub fn handle(signal: i32, name: &str) -> i32 {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let removed = crate::pack::output::remove_pending();
    let mut msg = format!("\ninterrupted by {name}");
    for target in &removed {
        msg += &format!(
            "; the unfinished output was removed (`{}` was not written)",
            target.display()
        );
    }
    for (_, line) in lock_notes().iter() {
        msg += "\n";
        msg += line;
    }
    eprintln!("{msg}");
    128 + signal
}

/// Handle SIGINT, SIGTERM and SIGHUP as the module doc says, on a thread of their own.
#[cfg(unix)]
pub fn install() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("bitsmith-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let name = match sig {
                    SIGINT => "SIGINT (Ctrl-C)",
                    SIGTERM => "SIGTERM",
                    _ => "SIGHUP (terminal closed)",
                };
                std::process::exit(handle(sig, name));
            }
        })?;
    Ok(())
}

/// Ctrl-C only, where there are no Unix signals.
#[cfg(not(unix))]
pub fn install() -> anyhow::Result<()> {
    ctrlc::set_handler(|| std::process::exit(handle(2, "Ctrl-C")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_live_as_long_as_their_guard() {
        let a = note_on_interrupt("first");
        let b = note_on_interrupt("second");
        let texts = || -> Vec<String> { lock_notes().iter().map(|(_, l)| l.clone()).collect() };
        let at = |l: &str| texts().iter().position(|t| t == l);
        assert!(at("first").unwrap() < at("second").unwrap(), "in order");
        drop(a);
        assert!(at("first").is_none() && at("second").is_some());
        drop(b);
        assert!(at("second").is_none());
    }
}
