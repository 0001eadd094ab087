#!/usr/bin/env bash
# Compile-check every CUDA source in kernels/ to PTX (no GPU needed). Uses nvcc from PATH
# when there is one, else installs NVIDIA's nvcc, headers and runtime from PyPI into a
# venv (BITSMITH_NVCC_VENV, default ~/.cache/bitsmith/nvcc-venv) on first use.
#   bash kernels/check-cuda.sh            # sm_80 (A100) and sm_90 (H100)
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
