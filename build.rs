//! With the `cuda` feature: compile `kernels/bitsmith_matmul.cu`, `kernels/bitsmith_lut.cu` and
//! `kernels/bitsmith_hadamard.cu` to PTX with nvcc into `$OUT_DIR/{name}.ptx` (embedded by
//! `src/infer/kernels/cuda.rs`, `src/infer/kernels/lut/cuda.rs` and
//! `src/model/online_cuda.rs`). Without it: nothing, so the default build needs no CUDA.
//!
//! Why nvcc at build time and not NVRTC at run time: candle's `cuda` feature already needs
//! nvcc at build time (candle-kernels compiles its own kernels the same way), so this adds
//! no requirement, a kernel that does not compile fails the build instead of the first
//! forward, and nothing beyond the driver is needed at run time. nvcc is `$NVCC`, else
//! `nvcc` on `PATH`, else `$CUDA_HOME/bin/nvcc` (or `CUDA_PATH`); the target is
//! `compute_$CUDA_COMPUTE_CAP` (the variable candle-kernels reads), else the first GPU's
//! compute capability from nvidia-smi, else 80 — PTX for 8.0 is JIT-compiled by the driver
//! on any newer GPU.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let nvcc = find_nvcc();
    let cap = compute_cap();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for name in ["bitsmith_matmul", "bitsmith_lut", "bitsmith_hadamard"] {
        let src = format!("kernels/{name}.cu");
        println!("cargo::rerun-if-changed={src}");
        let mut cmd = Command::new(&nvcc);
        cmd.args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(out_dir.join(format!("{name}.ptx")))
            .arg(&src);
        // NVIDIA's PyPI wheels keep the CCCL headers (which cuda_fp16.h includes) beside
        // bin/, where nvcc does not look by default
        if let Some(root) = nvcc.parent().and_then(|b| b.parent()) {
            let cccl = root.join("include/cccl");
            if cccl.is_dir() {
                cmd.arg(format!("-I{}", cccl.display()));
            }
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {src} ({status})");
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(p) = std::env::split_paths(&path)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
        {
            return p;
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = PathBuf::from(home).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    panic!("the `cuda` feature needs nvcc: put it on PATH or set NVCC or CUDA_HOME");
}

fn compute_cap() -> String {
    if let Ok(c) = std::env::var("CUDA_COMPUTE_CAP") {
        return c.trim().replace('.', "");
    }
    Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().replace('.', ""))
        })
        .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_digit()))
        .unwrap_or_else(|| "80".into())
}
