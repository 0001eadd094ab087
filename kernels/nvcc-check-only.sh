#!/usr/bin/env bash
# nvcc for `cargo check --features cuda` only (kernels/check-cuda.sh --cargo): runs the real
# nvcc ($REAL_NVCC) for everything except candle-kernels' static GGUF/MoE library, whose
# ~15 full SASS compiles (`nvcc -c`, minutes each on 2 cores) only matter at link time, which
# `cargo check` never reaches: those get an empty host object and an `ar` archive instead.
# Never use it for a build that links.
set -euo pipefail
args=("$@")
for a in "${args[@]}"; do
  if [[ "$a" == "--lib" ]]; then
    out=""; objs=()
    for ((i = 0; i < ${#args[@]}; i++)); do
      case "${args[i]}" in
        -o) out="${args[i + 1]}"; i=$((i + 1)) ;;
        *.o) objs+=("${args[i]}") ;;
      esac
    done
    rm -f "$out"; ar rcs "$out" "${objs[@]}"; exit 0
  fi
done
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ "${args[i]}" == "-c" ]]; then
    for ((j = 0; j < ${#args[@]}; j++)); do
      [[ "${args[j]}" == "-o" ]] && out="${args[j + 1]}"
    done
    echo "" | cc -x c -c -o "$out" -; exit 0
  fi
done
exec "$REAL_NVCC" "$@"
