#!/usr/bin/env bash
# Build bitsmith's `cuda` feature on a machine with neither a GPU nor a CUDA toolkit, for a
# GPU machine that has the driver and CUDA 13.0's libraries (this workplace's H200 image:
# driver 580, /usr/local/cuda 13.0) but no Rust: the `bitsmith` binary and the test
# binaries of tests/cuda_kernels.rs and tests/cuda_model.rs, stripped and xz-compressed
# into gpu/ (ignored by git) with the device script scripts/cuda/device_check.sh.
#
#   bash scripts/cuda/build.sh          # ~10 min from an empty target dir on 2 cores
#
# - nvcc 13.0 from PyPI in a venv (BITSMITH_NVCC130_VENV, default
#   ~/.cache/bitsmith/nvcc130): the PTX of candle's and bitsmith's kernels is JIT-compiled
#   by the driver there, and a driver loads no PTX newer than its own CUDA (13.0 for 580).
# - candle links cudarc with `dynamic-linking`: the driver, cuBLAS(Lt), cuRAND and NVRTC
#   must be present at link time. Only their sonames are recorded, so stub libraries that
#   define every function cudarc declares for them stand in here; the GPU machine's real
#   libraries (libcuda.so.1, libcublas.so.13, libcublasLt.so.13, libcurand.so.10,
#   libnvrtc.so.13, libcudart.so.13) are loaded at run time.
# Target dir: target/cuda-build (CUDA_COMPUTE_CAP=90, Hopper; set it for another GPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV="${BITSMITH_NVCC130_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bitsmith/nvcc130}"
if ! ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
  echo "cuda/build: installing nvcc 13.0 into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" >&2
fi
CU="$(dirname "$(dirname "$(ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)")")"
STUBS="$VENV/linklib"
mkdir -p "$STUBS"
ln -sf "$CU/lib/libcudart.so.13" "$STUBS/libcudart.so"
export PATH="$CU/bin:$PATH" CUDA_HOME="$CU" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" \
  CUDARC_CUDA_VERSION=13000 LIBRARY_PATH="$STUBS" CARGO_TARGET_DIR="$ROOT/target/cuda-build"
TARGETS=(--bin bitsmith --test cuda_kernels --test cuda_model)
DEPS="$CARGO_TARGET_DIR/release/deps"
# 1. the stubs: every function cudarc declares for a library, empty, under its soname
CUDARC="$(cargo metadata --format-version 1 --locked --features cuda 2>/dev/null | python3 -c '
import json, sys
print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')"
stub() { # cudarc module, library name, soname
  grep -ohE '^\s+fn [A-Za-z0-9_]+\(' "$CUDARC/src/$1/sys/mod.rs" | sed -E 's/^\s+fn ([A-Za-z0-9_]+)\(/void \1(void) {}/' |
    sort -u | cc -shared -fPIC -x c -Wl,-soname,"$3" -o "$STUBS/lib$2.so" -
}
stub driver cuda libcuda.so.1
stub nvrtc nvrtc libnvrtc.so.13
stub curand curand libcurand.so.10
stub cublas cublas libcublas.so.13
stub cublaslt cublasLt libcublasLt.so.13
# 2. the binaries
cargo build --release --features cuda --locked "${TARGETS[@]}" >&2
mkdir -p gpu
newest() { ls -t "$DEPS/$1"-* | grep -v '\.d$' | head -1; }
strip -o gpu/bitsmith "$CARGO_TARGET_DIR/release/bitsmith"
strip -o gpu/cuda_kernels "$(newest cuda_kernels)"
strip -o gpu/cuda_model "$(newest cuda_model)"
xz -6 -T2 -f gpu/bitsmith gpu/cuda_kernels gpu/cuda_model
cp scripts/cuda/device_check.sh gpu/
ls -la gpu >&2
echo "cuda/build: gpu/ holds the binaries; on the GPU machine: bash gpu/device_check.sh" >&2
