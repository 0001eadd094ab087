#!/usr/bin/env python3
"""bitsmith against llama.cpp on the same CPU, same weights: prefill, batch-1 decode and the
perplexity forward, interleaved for N rounds, printed as medians with min–max and the
bitsmith ÷ llama.cpp ratio of the medians.

    scripts/llama_cpp_build.sh                     # once: llama.cpp's tools into a cache
    python scripts/bench_vs_llama_cpp.py --work /tmp/bvl [--rounds 3] [--ppl-windows 4]

The pairs (each row of issue 17's table; `--pairs` picks some):

| pair        | llama.cpp file                                   | bitsmith model                          |
|-------------|--------------------------------------------------|-----------------------------------------|
| f32         | `bitsmith export --type F32`                     | the float model, `--dtype f32`          |
| bf16        | `bitsmith export --type BF16`                    | the float model, `--dtype bf16`         |
| q8_0        | `llama-quantize F32 Q8_0`                        | `quantize --bits 8 --group-size -1`     |
| q4_0-pure   | `llama-quantize --pure F32 Q4_0` (embedding too) | `quantize --bits 4 --group-size 32 --sym` |
| q4_0        | `llama-quantize F32 Q4_0` (its default mix)      | `quantize --bits 4 --group-size 128`    |
| q4_1        | `llama-quantize F32 Q4_1`                        | `quantize --bits 4 --group-size 32` (asymmetric) |
| q4_1-ggml   | q4_1's file                                      | q4_1's model, `--kernels ggml`          |
| q8_0-int8   | q8_0's file                                      | q8_0's model, `--kernels int8`          |
| q4_0-int8   | q4_0's file                                      | q4_0's model, `--kernels int8`          |

The `-int8` pairs compare like with like: llama.cpp quantizes the activations to 8 bits in
every product, bitsmith's default kernels keep them exact, `--kernels int8` quantizes them
above batch 8 (prefill and the ppl forward; decode stays exact, as in the plain pair).

bitsmith's models are rounded to nearest (`--method rtn`): speed does not depend on how the
codes were chosen. Everything made is kept in WORK and reused by the next run.

Measures, per pair and round (the two tools alternate which goes first):
* prefill: `llama-bench -p 512 -n 0` against `bitsmith bench --prompt-len 512`;
* decode: `llama-bench -p 0 -n 64 -d 512` (64 tokens after a 512-token context) against
  `bitsmith bench --prompt-len 512 --gen 64`'s decode rate;
* ppl forward (`--ppl-windows N`, 0 skips): `llama-perplexity -c 2048 --chunks N` against
  `bitsmith ppl --limit N`, both as N · 2048 tokens over the time of the windows' forwards
  (llama.cpp's from its log timestamps, bitsmith's `seconds`: loading and tokenizing
  excluded on both sides).
Both tools run one untimed warm-up of the same shape before each timed measure (llama-bench's
default; `bitsmith bench` does the same since 2026-12-06). All with `--threads` threads (default 2) and llama.cpp's plain CPU kernels (`--repack 0`,
`--no-repack`: its AMX repacking crashes on this project's VMs). Raw results go to WORK/raw.jsonl.
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PAIRS = {
    # name: (how llama.cpp's file is made, bitsmith quantize args or None, bitsmith extra)
    "f32": (("export", "F32"), None, ["--dtype", "f32"]),
    "bf16": (("export", "BF16"), None, ["--dtype", "bf16"]),
    "q8_0": (("quantize", "Q8_0", False), ["--bits", "8", "--group-size", "-1"], []),
    "q4_0-pure": (("quantize", "Q4_0", True),
                  ["--bits", "4", "--group-size", "32", "--sym"], []),
    "q4_0": (("quantize", "Q4_0", False), ["--bits", "4", "--group-size", "128"], []),
    "q4_1": (("quantize", "Q4_1", False), ["--bits", "4", "--group-size", "32"], []),
}
# q4_1's files through candle's GGML blocks (`--kernels ggml`): its Q4_1 dot product is scalar
PAIRS["q4_1-ggml"] = PAIRS["q4_1"][:2] + (["--kernels", "ggml"], "q4_1")
# the same files with `--kernels int8`; the 4th field names the pair whose files they reuse
for _base in ("q8_0", "q4_0"):
    _how, _bits, _extra = PAIRS[_base]
    PAIRS[f"{_base}-int8"] = (_how, _bits, _extra + ["--kernels", "int8"], _base)


def files_of(name):
    """The pair whose llama.cpp file and bitsmith model `name` runs."""
    return PAIRS[name][3] if len(PAIRS[name]) > 3 else name


def run(cmd, env=None):
    """Run a command, returning stdout; fail with the tail of its output."""
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"error: {cmd[0]} exited {p.returncode}:\n{(p.stdout + p.stderr)[-4000:]}")
    return p.stdout, p.stderr


def make_files(a, llama):
    """The llama.cpp files and bitsmith models of the chosen pairs, made once in WORK."""
    f32 = os.path.join(a.work, "f32.gguf")
    made = {}
    for name in a.pairs:
        how, bits_args = PAIRS[name][:2]
        gguf = os.path.join(a.work, f"{files_of(name)}.gguf")
        if not os.path.exists(gguf):
            if how[0] == "export":
                run([a.bitsmith, "export", a.model, "--type", how[1], "--embedding-type",
                     how[1], "-o", gguf])
            else:
                if not os.path.exists(f32):
                    run([a.bitsmith, "export", a.model, "--type", "F32", "-o", f32])
                pure = ["--pure"] if how[2] else []
                run([os.path.join(llama, "llama-quantize")] + pure + [f32, gguf, how[1]])
        model = a.model
        if bits_args is not None:
            model = os.path.join(a.work, f"{files_of(name)}-bitsmith")
            if not os.path.exists(model):
                run([a.bitsmith, "quantize", a.model, "--method", "rtn"] + bits_args
                    + ["-o", model, "--quiet"])
        made[name] = (gguf, model)
    return made


def llama_bench(llama, gguf, threads, prompt, gen, depth):
    out, _ = run([os.path.join(llama, "llama-bench"), "-m", gguf, "-t", str(threads),
                  "-p", str(prompt), "-n", str(gen), "-d", str(depth), "-r", "1",
                  "--repack", "0", "-o", "json"])
    rows = json.loads(out)
    if len(rows) != 1:
        sys.exit(f"error: llama-bench gave {len(rows)} results, expected 1:\n{out}")
    return rows[0]["avg_ts"]


def llama_ppl_rate(llama, gguf, text, windows, threads):
    out, err = run([os.path.join(llama, "llama-perplexity"), "-m", gguf, "-f", text, "-c",
                    "2048", "--chunks", str(windows), "-t", str(threads), "--no-repack"])
    # llama-perplexity prints no overall timing; its log lines carry timestamps
    # (`M.SS.mmm.uuu`): from "calculating perplexity" to "Final estimate" is the forward
    # of every window (and its scoring), what `bitsmith ppl` reports as `seconds`
    stamp = r"(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) I "
    log = out + err
    start = re.search(stamp + r"perplexity: calculating perplexity", log)
    end = re.search(stamp + r"Final estimate", log)
    if not (start and end):
        sys.exit(f"error: no timestamps in llama-perplexity's output:\n{log[-4000:]}")
    secs = [int(m) * 60 + int(s) + int(ms) / 1e3 + int(us) / 1e6
            for m, s, ms, us in (start.groups(), end.groups())]
    return windows * 2048 / (secs[1] - secs[0])


def bitsmith_bench(a, model, extra):
    out, _ = run([a.bitsmith, "bench", model, "--prompt-len", "512", "--gen", "64", "--json"]
                 + extra)
    v = json.loads(out.strip().splitlines()[-1])
    return v["prefill_tokens_per_second"], v["decode_tokens_per_second"]


def bitsmith_ppl_rate(a, model, extra, windows):
    out, _ = run([a.bitsmith, "ppl", model, "--limit", str(windows), "--json",
                  "--data-dir", a.data_dir] + extra)
    v = json.loads(out.strip().splitlines()[-1])
    # every token of every window is run through the model (as llama.cpp's rate counts)
    return v["windows"] * v["seqlen"] / v["seconds"]


def joined_text(a):
    raw = os.path.join(a.data_dir, "wiki.test.raw")
    out = os.path.join(a.work, "wiki.test.joined.txt")
    if not os.path.exists(out):
        subprocess.run([sys.executable, os.path.join(HERE, "wikitext_joined.py"), raw, out],
                       check=True)
    return out


def summary(xs):
    return statistics.median(xs), min(xs), max(xs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="folder for the files made (reused)")
    p.add_argument("--model", default="fixtures/SmolLM2-135M-Instruct-Q4_1-dequant",
                   help="float model: folder or (offline) repo id")
    p.add_argument("--bitsmith", default=os.path.join(ROOT, "target/release/bitsmith"))
    p.add_argument("--llama-dir", default=os.path.join(
        os.environ.get("LLAMA_CPP_DIR", os.path.expanduser("~/.cache/bitsmith/llama.cpp")),
        "bin"))
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data/wikitext-2-raw"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ppl-windows", type=int, default=4,
                   help="2048-token windows for the ppl-forward rate (0: skip that column)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", default=",".join(PAIRS),
                   help=f"comma-separated, from: {', '.join(PAIRS)}")
    a = p.parse_args()
    a.pairs = [x for x in a.pairs.split(",") if x]
    for x in a.pairs:
        if x not in PAIRS:
            sys.exit(f"error: unknown pair `{x}`; known: {', '.join(PAIRS)}")
    if not os.access(os.path.join(a.llama_dir, "llama-bench"), os.X_OK):
        sys.exit(f"error: no llama-bench in {a.llama_dir}: run scripts/llama_cpp_build.sh "
                 "(or set --llama-dir)")
    os.makedirs(a.work, exist_ok=True)
    made = make_files(a, a.llama_dir)
    text = joined_text(a) if a.ppl_windows > 0 else None
    results = {n: {"prefill": ([], []), "decode": ([], []), "ppl": ([], [])} for n in a.pairs}
    raw = open(os.path.join(a.work, "raw.jsonl"), "a")
    for r in range(a.rounds):
        for name in a.pairs:
            gguf, model = made[name]
            extra = PAIRS[name][2]
            order = ["llama", "bitsmith"] if (r % 2 == 0) else ["bitsmith", "llama"]
            for tool in order:
                if tool == "llama":
                    row = {"prefill": llama_bench(a.llama_dir, gguf, a.threads, 512, 0, 0),
                           "decode": llama_bench(a.llama_dir, gguf, a.threads, 0, 64, 512)}
                    if text:
                        row["ppl"] = llama_ppl_rate(a.llama_dir, gguf, text, a.ppl_windows,
                                                    a.threads)
                else:
                    pre, dec = bitsmith_bench(a, model, extra)
                    row = {"prefill": pre, "decode": dec}
                    if text:
                        row["ppl"] = bitsmith_ppl_rate(a, model, extra, a.ppl_windows)
                side = 0 if tool == "llama" else 1
                for k, v in row.items():
                    results[name][k][side].append(v)
                raw.write(json.dumps({"round": r, "pair": name, "tool": tool, **row}) + "\n")
                raw.flush()
    cols = ["prefill", "decode"] + (["ppl"] if text else [])
    heads = {"prefill": "prefill 512, tok/s", "decode": "decode after 512, tok/s",
             "ppl": f"ppl forward {a.ppl_windows} × 2048, tok/s"}
    print(f"\n{a.rounds} rounds, {a.threads} threads; llama.cpp / bitsmith as median (min–max), "
          "ratio bitsmith ÷ llama.cpp of the medians\n")
    print("| pair | " + " | ".join(heads[c] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in a.pairs:
        cells = []
        for c in cols:
            (lm, llo, lhi), (bm, blo, bhi) = (summary(results[name][c][0]),
                                              summary(results[name][c][1]))
            cells.append(f"{lm:.0f} ({llo:.0f}–{lhi:.0f}) / {bm:.0f} ({blo:.0f}–{bhi:.0f}) "
                         f"**{bm / lm:.2f}×**")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
