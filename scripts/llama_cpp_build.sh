#!/usr/bin/env bash
# Build the llama.cpp tools the consumer check and the side-by-side benchmark need
# (llama-perplexity, llama-imatrix, llama-quantize, llama-simple, llama-bench, llama-tokenize),
# from the llama.cpp tree vendored in the `llama-cpp-python`
# source distribution on PyPI: the package registry is the only network this project's
# machines are guaranteed to reach, and the sdist pins one llama.cpp commit.
#
#   scripts/llama_cpp_build.sh            # -> $LLAMA_CPP_DIR/bin/llama-perplexity ...
#
# Environment:
#   LLAMA_CPP_DIR      cache folder (default ~/.cache/bitsmith/llama.cpp); kept outside
#                      the repository, reused by later runs (idempotent: a run whose four
#                      binaries already exist does nothing)
#   LLAMA_CPP_VERSION  llama-cpp-python version to fetch (default: the newest sdist)
#   JOBS               parallel compile jobs (default 2); compilation runs under nice -n 19
#   PYTHON             the python whose pip fetches the sdist (default python3)
set -euo pipefail

DIR="${LLAMA_CPP_DIR:-$HOME/.cache/bitsmith/llama.cpp}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
TOOLS=(llama-perplexity llama-imatrix llama-quantize llama-simple llama-bench llama-tokenize)

have_all() {
  local t
  for t in "${TOOLS[@]}"; do [[ -x "$DIR/bin/$t" ]] || return 1; done
}
if have_all; then
  echo "llama.cpp tools already built in $DIR/bin (remove it to rebuild)"
  exit 0
fi
mkdir -p "$DIR"
start=$(date +%s)

# 1. the sdist (pip's own client; no wheel: we want the vendored C++ tree). Only
#    llama-cpp-python itself as source: `--no-binary :all:` would also build pip's
#    metadata step's build requirements (cmake, ninja) from source, which takes an hour.
spec="llama-cpp-python${LLAMA_CPP_VERSION:+==$LLAMA_CPP_VERSION}"
if ! ls "$DIR"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
  "$PYTHON" -m pip download "$spec" --no-deps --no-binary llama-cpp-python \
    -d "$DIR/sdist" --quiet
fi
sdist=$(ls "$DIR"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -n 1)
src="$DIR/src/$(basename "$sdist" .tar.gz)"
if [[ ! -d "$src" ]]; then
  mkdir -p "$DIR/src"
  tar -xzf "$sdist" -C "$DIR/src"
fi
tree="$src/vendor/llama.cpp"
[[ -f "$tree/CMakeLists.txt" ]] || { echo "error: no vendored llama.cpp in $src" >&2; exit 1; }

# 2. cmake: the system one, else one from PyPI in a venv inside the cache
CMAKE=$(command -v cmake || true)
if [[ -z "$CMAKE" ]]; then
  if [[ ! -x "$DIR/venv/bin/cmake" ]]; then
    "$PYTHON" -m venv "$DIR/venv"
    "$DIR/venv/bin/pip" install --quiet cmake
  fi
  CMAKE="$DIR/venv/bin/cmake"
fi

# 3. configure and build only the four tools (static, CPU, this machine's ISA)
build="$DIR/build"
nice -n 19 "$CMAKE" -S "$tree" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >"$DIR/configure.log"
nice -n 19 "$CMAKE" --build "$build" --config Release -j "$JOBS" --target "${TOOLS[@]}"

mkdir -p "$DIR/bin"
for t in "${TOOLS[@]}"; do cp "$build/bin/$t" "$DIR/bin/$t"; done
echo "$(basename "$src")" >"$DIR/bin/VERSION"
echo "built ${TOOLS[*]} from $(basename "$src") in $(( $(date +%s) - start )) s -> $DIR/bin"
