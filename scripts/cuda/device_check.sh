#!/usr/bin/env bash
# On the GPU machine, from the repository root, with gpu/ from scripts/cuda/build.sh:
#   bash gpu/device_check.sh kernels   # kernels/test_bitsmith_matmul.cu (built here with the
#                                      # machine's nvcc), tests/cuda_kernels.rs, tests/cuda_model.rs
#   bash gpu/device_check.sh model     # a packed model end to end on the GPU (below)
# Binaries and model parts are kept in /tmp/keep between calls on the same machine. The
# model: gpu/model.tar.xz.part-* (a tar of the model folder, xz-compressed and `split`, so
# that a model larger than one call's upload can arrive over two calls), plus optional
# gpu/cpu.logits (`bitsmith ppl MODEL --limit 4 --save-logits gpu/cpu.logits --top-k 64` on
# the CPU): `ppl` on the GPU is then compared with the CPU's logits (KL divergence), and
# `ppl`, `generate` and `bench` run packed and dequantized, f32 and bf16. Outputs go to $OUT
# when set (the device tool's return folder), else /tmp/keep/out.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/keep/out}"
mkdir -p /tmp/keep/lib "$OUT"
t0=$(date +%s)
stamp() { echo; echo "== $1 (t=$(($(date +%s) - t0)) s)"; }
# the CUDA image's libraries, then PyTorch's copies of them
LD_LIBRARY_PATH="/tmp/keep/lib:$(python3 - <<'P'
import glob, os, site
dirs = []
pats = ['/usr/local/cuda/lib64/libcu*.so*', '/usr/local/cuda/targets/x86_64-linux/lib/libcu*.so*']
for sp in site.getsitepackages():
    pats += [sp + '/nvidia/*/lib/libcu*.so*', sp + '/nvidia/lib/libcu*.so*']
for p in pats:
    for f in glob.glob(p):
        if os.path.dirname(f) not in dirs:
            dirs.append(os.path.dirname(f))
print(':'.join(dirs))
P
)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
unxz_to() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'), 1 << 20)" "$1" "$2"; }
for b in bitsmith cuda_kernels cuda_model; do
  if [[ -f gpu/$b.xz && ! -x /tmp/keep/$b ]]; then unxz_to gpu/$b.xz /tmp/keep/$b && chmod +x /tmp/keep/$b; fi
done
# a library under another file name here: link it in /tmp/keep/lib
for lib in $(ldd /tmp/keep/bitsmith /tmp/keep/cuda_model 2>/dev/null | awk '/not found/ {print $1}' | sort -u); do
  cand=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "${lib%%.so*}.so*" -type f -print 2>/dev/null | head -1)
  echo "missing $lib -> ${cand:-nothing found}"
  [[ -n "$cand" ]] && ln -sf "$cand" "/tmp/keep/lib/$lib"
done
cp gpu/model.tar.xz.part-* /tmp/keep/ 2>/dev/null || true

case "${1:-kernels}" in
kernels)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1
  ldd /tmp/keep/bitsmith | grep -E 'libcu|not found'
  stamp "kernels/test_bitsmith_matmul.cu"
  nvcc -O3 -arch=sm_90 -o /tmp/keep/t kernels/test_bitsmith_matmul.cu &&
    timeout 150 /tmp/keep/t >"$OUT/cu_test.txt" 2>&1
  echo "rc $?"; grep -v '^$' "$OUT/cu_test.txt" | tail -24
  for t in cuda_kernels cuda_model; do
    stamp "tests/$t.rs"
    timeout 150 /tmp/keep/$t --nocapture >"$OUT/$t.txt" 2>&1
    echo "rc $?"; tail -14 "$OUT/$t.txt"
  done
  ;;
model)
  B=/tmp/keep/bitsmith
  [[ -x $B ]] || { echo "no /tmp/keep/bitsmith: a fresh machine (run 'kernels' first, or carry the binaries)"; exit 3; }
  cat /tmp/keep/model.tar.xz.part-* >/tmp/keep/model.tar.xz
  rm -rf /tmp/keep/model && mkdir -p /tmp/keep/model &&
    python3 -c "import tarfile; tarfile.open('/tmp/keep/model.tar.xz').extractall('/tmp/keep/model')" ||
    { echo "the model parts do not make a whole archive"; exit 4; }
  M=/tmp/keep/model
  D=(--data-dir data/wikitext-2-raw --limit 4 --quiet)
  if [[ -f gpu/cpu.logits ]]; then
    stamp "ppl 4 x 2048 on the GPU against the CPU's logits"
    $B ppl $M "${D[@]}" --device cuda --kl-base gpu/cpu.logits 2>&1 | tee "$OUT/ppl_kl.txt"
  fi
  OPTS=("" "--weights dequantized" "--dtype bf16" "--dtype bf16 --weights dequantized")
  for opt in "${OPTS[@]}"; do
    stamp "ppl --device cuda $opt"
    $B ppl $M "${D[@]}" --device cuda $opt --json 2>&1 | tee -a "$OUT/ppl.txt"
  done
  stamp "generate (greedy)"
  $B generate $M --device cuda --raw --prompt "The capital of France is" --temperature 0 \
    --max-tokens 32 2>&1 | tee "$OUT/generate.txt"
  stamp "bench: 3 interleaved rounds, prompt 512, gen 128, batch 1 and 8"
  for r in 1 2 3; do
    for opt in "${OPTS[@]}"; do
      echo "round $r [$opt] $($B bench $M --device cuda $opt --gen 128 --json 2>&1 | tail -1)" | tee -a "$OUT/bench.txt"
    done
  done
  for opt in "" "--weights dequantized"; do
    echo "batch 8 [$opt] $($B bench $M --device cuda $opt --gen 128 --batch 8 --json 2>&1 | tail -1)" | tee -a "$OUT/bench.txt"
  done
  ;;
*) echo "usage: device_check.sh kernels|model"; exit 2 ;;
esac
stamp "done"
