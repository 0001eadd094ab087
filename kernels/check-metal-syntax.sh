#!/usr/bin/env bash
# Syntax-check bitsmith's Metal kernels on Linux: g++ -fsyntax-only with a stand-in for
# <metal_stdlib> (kernels/metal-shim/). It catches typos, undeclared names and type
# mismatches in the C++ that Metal Shading Language is built on; it cannot check Metal's
# own rules, which only Apple's compiler (macOS) knows.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
CXX="${CXX:-g++}"
if ! command -v "$CXX" >/dev/null; then
  echo "check-metal-syntax: $CXX not found" >&2
  exit 1
fi
for f in *.metal; do
  "$CXX" -std=c++17 -fsyntax-only -Wno-attributes -Imetal-shim -x c++ "$f"
  echo "check-metal-syntax: $f ok"
done
