//! Interrupts, sent to the real binary in the middle of a `quantize`: SIGINT, SIGTERM and
//! SIGHUP each remove the hidden partial output folder, say so on stderr, and exit with
//! `128 + signal`.
#![cfg(unix)]

mod common;

use common::{synthetic_text, write_tokenizer, Synth};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Hidden `.out.partial-*` folders under `dir`.
fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".out.partial-"))
        .collect()
}

#[test]
fn sigint_sigterm_and_sighup_remove_the_partial_output_and_exit_128_plus_signal() {
    let model = tempfile::tempdir().unwrap();
    // big enough that calibration takes seconds, so the signal lands mid-run
    let s = Synth {
        hidden: 256,
        intermediate: 512,
        layers: 4,
        heads: 8,
        kv_heads: 4,
        ..Synth::default()
    };
    s.write(model.path(), 2, false);
    write_tokenizer(model.path(), s.vocab);
    let calib = model.path().join("calib.txt");
    std::fs::write(&calib, synthetic_text(s.vocab, 40_000, 1)).unwrap();
    for (name, number, said) in [
        ("TERM", 15, "SIGTERM"),
        ("HUP", 1, "SIGHUP"),
        ("INT", 2, "SIGINT"),
    ] {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("out");
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitsmith"))
            .args([
                "quantize",
                model.path().to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--method",
                "gptq",
                "--calib",
                calib.to_str().unwrap(),
                "--nsamples",
                "256",
                "--seqlen",
                "128",
                "--quiet",
            ])
            .env("HF_HOME", work.path())
            .env("HF_HUB_OFFLINE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bitsmith");
        // wait until the partial folder exists: the run is writing
        let t0 = Instant::now();
        while partials(work.path()).is_empty() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "SIG{name}: quantize ended before its output folder appeared"
            );
            assert!(t0.elapsed() < Duration::from_secs(60), "no partial folder");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            child.try_wait().unwrap().is_none(),
            "SIG{name}: quantize finished before the signal; make the run longer"
        );
        let kill = Command::new("kill")
            .args(["-s", name, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(kill.success());
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(128 + number),
            "SIG{name}: exit status {:?}, stderr:\n{stderr}",
            o.status
        );
        assert!(
            stderr.contains(&format!("interrupted by {said}"))
                && stderr.contains("the unfinished output was removed"),
            "SIG{name}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(partials(work.path()).is_empty(), "SIG{name}: partial left");
        assert!(!out.exists(), "SIG{name}: OUT written");
    }
}
