#!/usr/bin/env bash
# The FlexRound comparison table of the README (issue "FlexRound"): RTN, GPTQ and FlexRound
# (block-wise from RTN, block-wise from GPTQ, layer-wise) on one calibration set, at the
# grids the fixture can judge (its weights were 4-bit g32 asymmetric, so g32 is excluded).
# Each row quantizes under `/usr/bin/time -v` (wall time, peak RSS), then measures
# perplexity on the first 16 windows × 2048 of WikiText-2 test, and appends one line to
# $OUT/table.tsv. Rows already in the table are skipped, so an interrupted run resumes.
#
#   scripts/flexround_table.sh                 # every grid, every row
#   scripts/flexround_table.sh w3g128 w4pc     # only these grids (w4pc w4g128 w3g128 w2g64
#                                              # baq3.206 nupes-w4pc nupes-w4g128
#                                              # nupes-w3g128 nupes-w2g64)
#
# The nupes-* grids are NUPES' table (issue "NUPES"): symmetric uniform RTN and GPTQ,
# NUPES data-free, on GPTQ, learned and with FlexRound, and asymmetric uniform GPTQ (the
# honest baseline); each NUPES row's exponents (min, mean, max, and the mean per
# projection) go to $OUT/exponents.tsv.
#
# Environment:
#   MODEL      model folder or repo id (default: the fixture's offline repo id; run
#              scripts/make-fixture.sh first and export its HF_HOME / HF_HUB_OFFLINE)
#   DATA_DIR   WikiText-2 raw folder (default data/wikitext-2-raw)
#   OUT        where outputs and table.tsv go (default /tmp/flexround-table)
#   BITSMITH   the binary (default target/release/bitsmith)
#   ROWS       the rows to run, space-separated (default: every row of each grid)
#   KEEP=1     keep each quantized model (default: removed after its perplexity)
set -euo pipefail

MODEL="${MODEL:-fixtures/SmolLM2-135M-Instruct-Q4_1-dequant}"
DATA_DIR="${DATA_DIR:-data/wikitext-2-raw}"
OUT="${OUT:-/tmp/flexround-table}"
BITSMITH="${BITSMITH:-target/release/bitsmith}"
# One calibration set for every row (the methods that calibrate): 128 × 512 tokens, seed 0.
CALIB=(--nsamples 128 --seqlen 512 --seed 0)
# Every row fits its grid from each group's min and max, so rows differ only in rounding;
# GPTQ's own default fit (`shrink`, the Hessian-weighted range search) has its rows too,
# alone and as FlexRound's start.
FIT=(--range minmax)

mkdir -p "$OUT"
TABLE="$OUT/table.tsv"
[[ -f "$TABLE" ]] || printf 'grid\trow\tppl\twall_s\tpeak_rss_mib\n' > "$TABLE"

grid_flags() {
  case "$1" in
    w4pc) echo "--bits 4 --group-size -1" ;;
    w4g128) echo "--bits 4 --group-size 128" ;;
    w3g128) echo "--bits 3 --group-size 128" ;;
    w2g64) echo "--bits 2 --group-size 64" ;;
    baq3.206) echo "--method baq --bits 3.206" ;;
    nupes-w4pc) echo "--bits 4 --group-size -1" ;;
    nupes-w4g128) echo "--bits 4 --group-size 128" ;;
    nupes-w3g128) echo "--bits 3 --group-size 128" ;;
    nupes-w2g64) echo "--bits 2 --group-size 64" ;;
    *) echo "unknown grid '$1' (w4pc w4g128 w3g128 w2g64 baq3.206 nupes-w4pc nupes-w4g128 nupes-w3g128 nupes-w2g64)" >&2; return 1 ;;
  esac
}

row_flags() {
  case "$1" in
    rtn) echo "--method rtn ${FIT[*]}" ;;
    gptq) echo "--method gptq ${CALIB[*]} ${FIT[*]}" ;;
    gptq-shrink) echo "--method gptq ${CALIB[*]} --range shrink" ;;
    fr-block-rtn) echo "--method flexround --init rtn ${CALIB[*]} ${FIT[*]}" ;;
    fr-block-gptq) echo "--method flexround --init gptq ${CALIB[*]} ${FIT[*]}" ;;
    fr-layer) echo "--method flexround --reconstruct layer ${CALIB[*]} ${FIT[*]}" ;;
    fr-block-gptq-shrink) echo "--method flexround --init gptq ${CALIB[*]} --range shrink" ;;
    baq-gptq) echo "${CALIB[*]} ${FIT[*]}" ;;
    baq-fr-block) echo "--rounding flexround ${CALIB[*]} ${FIT[*]}" ;;
    baq-fr-layer) echo "--rounding flexround --reconstruct layer ${CALIB[*]} ${FIT[*]}" ;;
    sym-rtn) echo "--method rtn --sym ${FIT[*]}" ;;
    sym-gptq) echo "--method gptq --sym ${CALIB[*]} ${FIT[*]}" ;;
    nupes-rtn) echo "--method nupes --rounding rtn ${FIT[*]}" ;;
    nupes-gptq) echo "--method nupes --rounding gptq ${CALIB[*]} ${FIT[*]}" ;;
    nupes-fr-block) echo "--method nupes --rounding flexround ${CALIB[*]} ${FIT[*]}" ;;
    nupes-learned) echo "--method nupes --rounding learned ${CALIB[*]} ${FIT[*]}" ;;
    *) echo "unknown row '$1'" >&2; return 1 ;;
  esac
}

rows_of() {
  case "$1" in
    baq3.206) echo "baq-gptq baq-fr-block baq-fr-layer" ;;
    nupes-*) echo "sym-rtn nupes-rtn sym-gptq nupes-gptq gptq nupes-learned nupes-fr-block" ;;
    *) echo "gptq fr-block-gptq fr-block-rtn fr-layer rtn gptq-shrink fr-block-gptq-shrink" ;;
  esac
}

# Reads the per-layer exponent lines of `bitsmith inspect`'s output (file $3) and appends
# one line to $OUT/exponents.tsv: min, mean and max over layers, the mean per projection.
exponents() {
  python3 - "$1" "$2" "$3" "$OUT/exponents.tsv" <<'PY'
import re, sys
from collections import defaultdict
grid, row, inspect, path = sys.argv[1:]
by_proj = defaultdict(list)
for line in open(inspect):
    m = re.match(r"\s+model\.layers\.\d+\.\w+\.(\w+)\s+a ([0-9.]+)", line)
    if m:
        by_proj[m.group(1)].append(float(m.group(2)))
every = [a for v in by_proj.values() for a in v]
if not every:
    sys.exit(f"no exponents in inspect's output for {grid} {row}")
proj = " ".join(f"{p}={sum(v) / len(v):.2f}" for p, v in sorted(by_proj.items()))
with open(path, "a") as f:
    f.write(f"{grid}\t{row}\t{min(every):.2f}\t{sum(every) / len(every):.2f}\t{max(every):.2f}\t{proj}\n")
PY
}

run_row() {
  local grid="$1" row="$2" dir="$OUT/$1-$2"
  if awk -F'\t' -v g="$grid" -v r="$row" '$1 == g && $2 == r { found = 1 } END { exit !found }' "$TABLE"; then
    echo "== $grid $row: already in $TABLE"
    return
  fi
  local flags
  # shellcheck disable=SC2207
  flags=($(grid_flags "$grid") $(row_flags "$row"))
  rm -rf "$dir"
  echo "== $grid $row: $BITSMITH quantize $MODEL ${flags[*]} -o $dir"
  /usr/bin/time -v -o "$dir.time" "$BITSMITH" quantize "$MODEL" "${flags[@]}" -o "$dir" > "$dir.log" 2>&1 || {
    echo "quantize failed, see $dir.log" >&2
    return 1
  }
  "$BITSMITH" ppl "$dir" --limit 16 --json --quiet --data-dir "$DATA_DIR" > "$dir.ppl.json"
  if [[ "$row" == nupes-* ]]; then
    "$BITSMITH" inspect "$dir" --summary > "$dir.inspect"
    exponents "$grid" "$row" "$dir.inspect"
  fi
  python3 - "$grid" "$row" "$dir" "$TABLE" <<'PY'
import json, re, sys
grid, row, d, table = sys.argv[1:]
ppl = json.load(open(d + ".ppl.json"))
timing = open(d + ".time").read()
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", timing).group(1)
secs = 0.0
for part in wall.split(":"):
    secs = secs * 60 + float(part)
rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing).group(1))
value = ppl["ppl"]
with open(table, "a") as f:
    f.write(f"{grid}\t{row}\t{value:.2f}\t{secs:.0f}\t{rss_kib / 1024:.0f}\n")
print(f"{grid}\t{row}\tppl {value:.2f}\twall {secs:.0f} s\tpeak RSS {rss_kib / 1024:.0f} MiB")
PY
  [[ "${KEEP:-0}" == 1 ]] || rm -rf "$dir"
}

GRIDS=("$@")
[[ ${#GRIDS[@]} -gt 0 ]] || GRIDS=(w3g128 w4pc baq3.206 w4g128 w2g64 nupes-w4pc nupes-w4g128 nupes-w3g128 nupes-w2g64)
for grid in "${GRIDS[@]}"; do
  grid_flags "$grid" > /dev/null
  for row in ${ROWS:-$(rows_of "$grid")}; do run_row "$grid" "$row"; done
done
column -t -s $'\t' "$TABLE"
