//! Checkpoints and the output lock, with the real binary: a second run on the same OUT
//! stops at once naming the first, a checkpoint made with other settings is an error (and
//! `--fresh` starts over), and a resumed run's `bitsmith.json` lists every layer.
#![cfg(unix)]

mod common;

use common::{safetensors_files, CliModel, Synth};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn fixture() -> CliModel {
    // big enough that a run takes a few seconds
    let s = Synth {
        hidden: 256,
        intermediate: 512,
        layers: 6,
        heads: 8,
        kv_heads: 4,
        ..Synth::default()
    };
    CliModel::new(&s, 2, 40_000, 1)
}

fn command(f: &CliModel, out: &Path, extra: &[&str]) -> Command {
    f.quantize(out, 128, 128, &[&["--method", "gptq"], extra].concat())
}

fn spawn(f: &CliModel, out: &Path, extra: &[&str]) -> Child {
    command(f, out, extra).spawn().expect("spawn bitsmith")
}

fn run(f: &CliModel, out: &Path, extra: &[&str]) -> Output {
    command(f, out, extra).output().expect("run bitsmith")
}

fn wait_for(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {what}; make it longer"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_second_run_on_the_same_output_stops_at_once_naming_the_first() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let lock = work.path().join(".out.lock");
    let mut first = spawn(&f, &out, &[]);
    let pid = first.id().to_string();
    wait_for(&mut first, "the lock file", || {
        std::fs::read_to_string(&lock).is_ok_and(|t| t == pid)
    });
    let t0 = Instant::now();
    let second = run(&f, &out, &["--overwrite"]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second run succeeded");
    assert!(
        stderr.contains(&format!("another bitsmith run (pid {pid}) is writing")),
        "{stderr}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the second run did not stop at once"
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run ended before the second was checked; make it longer"
    );
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("bitsmith.json").is_file());
    assert!(!lock.exists(), "the lock file is removed at the end");
    assert!(!work.path().join(".out.checkpoint").exists());
}

#[test]
fn changed_option_is_an_error_and_a_resume_keeps_the_whole_story() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let ck = work.path().join(".out.checkpoint");
    // kill -9 after the first block is checkpointed
    let mut a = spawn(&f, &out, &[]);
    wait_for(&mut a, "a checkpointed block", || {
        ck.join("index.json").is_file()
    });
    a.kill().unwrap();
    a.wait().unwrap();
    assert!(!out.exists());

    let changed = run(&f, &out, &["--damp", "0.02"]);
    let stderr = String::from_utf8_lossy(&changed.stderr);
    assert!(!changed.status.success(), "a changed option resumed");
    assert!(stderr.contains("damp: 0.01 → 0.02"), "{stderr}");
    assert!(stderr.contains("--fresh"), "{stderr}");
    assert!(ck.join("index.json").is_file(), "the checkpoint is kept");

    let resumed = run(&f, &out, &[]);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from the checkpoint"), "{stderr}");
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bitsmith.json")).unwrap()).unwrap();
    let at = prov["resumed_at_block"].as_u64().unwrap();
    assert!(at >= 1, "{prov}");
    let names: Vec<&str> = prov["layer_loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        7 * f.layers,
        "every layer, restored ones included"
    );
    assert!(names[0].starts_with("model.layers.0."), "{names:?}");
    assert!(
        !ck.exists(),
        "the checkpoint is removed after OUT is written"
    );

    // the same bytes as an uninterrupted run; --fresh discards a (now mismatching) checkpoint
    let other = work.path().join("other");
    let mut b = spawn(&f, &other, &["--damp", "0.02"]);
    let ck_b = work.path().join(".other.checkpoint");
    wait_for(&mut b, "a checkpointed block", || {
        ck_b.join("index.json").is_file()
    });
    b.kill().unwrap();
    b.wait().unwrap();
    let fresh = run(&f, &other, &["--fresh"]);
    assert!(
        fresh.status.success(),
        "{}",
        String::from_utf8_lossy(&fresh.stderr)
    );
    assert_eq!(safetensors_files(&out), safetensors_files(&other));
}
