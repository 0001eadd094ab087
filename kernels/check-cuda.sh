#!/usr/bin/env bash
# Compile-check every CUDA source in kernels/ to PTX (no GPU needed). Uses nvcc from PATH
# when there is one, else installs NVIDIA's nvcc, headers and runtime from PyPI into a
# venv (BITSMITH_NVCC_VENV, default ~/.cache/bitsmith/nvcc-venv) on first use.
#   bash kernels/check-cuda.sh            # sm_80 (A100) and sm_90 (H100)
#   bash kernels/check-cuda.sh --cargo    # and `cargo check --features cuda --all-targets`
# --cargo type-checks the Rust launcher and tests/cuda_kernels.rs against candle's CUDA backend
# in its own target dir (target/cuda-check), with nvcc-check-only.sh standing in for the
# minutes-long SASS compiles of candle-kernels' GGUF/MoE static library (only linking needs
# it; `cargo check` never links). ~5 min from scratch on 2 cores. Nothing runs on a GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV="${BITSMITH_NVCC_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bitsmith/nvcc-venv}"
NVCC="$(command -v nvcc || true)"
if [[ -z "$NVCC" ]]; then
  NVCC="$(find "$VENV" -path '*/bin/nvcc' -type f 2>/dev/null | head -1 || true)"
fi
if [[ -z "$NVCC" ]]; then
  echo "check-cuda: installing nvcc into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q nvidia-cuda-nvcc nvidia-cuda-crt nvidia-nvvm \
    nvidia-cuda-runtime nvidia-cuda-cccl >&2
  NVCC="$(find "$VENV" -path '*/bin/nvcc' -type f | head -1)"
fi
# the wheels' headers sit beside bin/, where nvcc does not look by default
ROOT="$(dirname "$(dirname "$NVCC")")"
INC=()
[[ -d "$ROOT/include/cccl" ]] && INC+=(-I"$ROOT/include/cccl")
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
n=0
for cu in *.cu; do
  for arch in sm_80 sm_90; do
    "$NVCC" --ptx -arch="$arch" "${INC[@]}" -o "$OUT/${cu%.cu}.$arch.ptx" "$cu"
    n=$((n + 1))
  done
  echo "check-cuda: $cu OK ($("$NVCC" --version | tail -1))"
done
echo "check-cuda: $n PTX compilations, 0 errors"

if [[ "${1:-}" == "--cargo" ]]; then
  cd ..
  # cudarc 0.19 knows CUDA up to 13.4; a newer nvcc (PyPI's) is checked against 13.4's API
  ver="$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
  read -r major minor <<<"$ver"
  if ((major > 13 || (major == 13 && minor > 4))); then major=13 minor=4; fi
  t0=$(date +%s)
  PATH="$(dirname "$NVCC"):$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" \
    CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-${major}0${minor}0}" \
    REAL_NVCC="$NVCC" NVCC="$PWD/kernels/nvcc-check-only.sh" \
    CARGO_TARGET_DIR="${BITSMITH_CUDA_TARGET_DIR:-$PWD/target/cuda-check}" \
    cargo check --features cuda --all-targets --locked
  echo "check-cuda: cargo check --features cuda OK ($(($(date +%s) - t0)) s)"
fi
