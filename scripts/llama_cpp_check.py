#!/usr/bin/env python3
"""Score a GGUF file with llama.cpp's own `llama-perplexity` and with `bitsmith ppl`, on the
same text and (nearly) the same windows, and compare.

    scripts/llama_cpp_build.sh                       # once: the llama.cpp tools, into a cache
    python scripts/llama_cpp_check.py model.gguf \\
        --data-dir wikitext-2-raw [--chunks 16] [--tolerance 0.005]

llama.cpp side: `llama-perplexity -m FILE -f JOINED -c 1025 --ppl-stride 2047 --chunks N`,
where JOINED is the WikiText-2 test rows joined with "\\n\\n" as bitsmith joins them
(`scripts/wikitext_joined.py`). Why those flags (tools/perplexity/perplexity.cpp,
`perplexity_v2` and `main`): a positive `--ppl-stride S` grows the context to
`c + S/2` = 1025 + 1023 = 2048 tokens, evaluates windows of 2048 tokens starting every S
tokens and scores positions `n_ctx - S - 1 .. n_ctx - 2` of each, i.e. every token after
the first of the window; `--chunks N` stops after N windows. The one difference from
bitsmith's protocol is where the windows start: llama.cpp's window i starts at token
2047·i (S cannot be 2048: the first scored position would be -1), bitsmith's at 2048·i,
so window i sees up to i tokens of context that the other does not. Both score 2047·N
tokens with 2 to 2048 tokens of context each; the F32 row measures what that leaves.
The text is tokenized whole by both (no BOS: the fixture's `add_bos_token` is false).

bitsmith side: `bitsmith convert FILE -o WORK/hf` decodes every
tensor (candle's GGUF reader) into an F32 folder, then `bitsmith ppl WORK/hf --limit N`.

Prints one JSON line (both perplexities, the relative difference, the commands) and exits
1 when the difference exceeds --tolerance. Runs every tool under `nice -n 19`.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd, **kw):
    """Run a command under nice, returning its combined stdout+stderr; fail with its tail."""
    full = ["nice", "-n", "19"] + cmd
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"error: {cmd[0]} exited {p.returncode}:\n{p.stdout[-4000:]}")
    return p.stdout


def joined_text(data_dir, work):
    """The test rows joined as bitsmith joins them, written once into WORK."""
    raw = os.path.join(data_dir, "wiki.test.raw")
    if not os.path.exists(raw):
        raw = os.path.join(data_dir, "wikitext-2-raw", "wiki.test.raw")
    out = os.path.join(work, "wiki.test.joined.txt")
    if not os.path.exists(out):
        subprocess.run([sys.executable, os.path.join(HERE, "wikitext_joined.py"), raw, out],
                       check=True)
    return out


def llama_ppl(tool, gguf, text, chunks, threads):
    cmd = [tool, "-m", gguf, "-f", text, "-c", "1025", "--ppl-stride", "2047",
           "--chunks", str(chunks), "-t", str(threads),
           # the AMX/repacked weight layouts llama.cpp picks on CPUs that report AMX
           # crash in ggml_backend_amx_mul_mat on this project's VMs (SIGSEGV on any
           # quantized file, llama.cpp's own included): use the plain CPU kernels
           "--no-repack"]
    t0 = time.time()
    log = run(cmd)
    # perplexity_v2 prints the running perplexity after every window as "[i]ppl,"; the
    # last one is over all N windows
    found = re.findall(r"\[(\d+)\]([0-9.]+(?:e[+-]?\d+)?|nan|inf),", log)
    if not found:
        sys.exit(f"error: no perplexity in llama-perplexity's output:\n{log[-4000:]}")
    n, ppl = found[-1]
    if int(n) != chunks:
        sys.exit(f"error: llama-perplexity scored {n} windows, not {chunks} (text too short?)")
    ctx = re.search(r"n_ctx\s*=\s*(\d+)", log)
    return {"ppl": float(ppl), "windows": int(n), "n_ctx": int(ctx.group(1)) if ctx else None,
            "seconds": round(time.time() - t0, 1), "command": shlex.join(cmd)}


def bitsmith_ppl(bitsmith, gguf, tokenizer_from, data_dir, chunks, work):
    folder = os.path.join(work, os.path.basename(gguf).removesuffix(".gguf") + ".hf")
    convert = [bitsmith, "convert", gguf, "-o", folder, "--overwrite"]
    if tokenizer_from:
        convert += ["--tokenizer-from", tokenizer_from]
    run(convert)
    cmd = [bitsmith, "ppl", folder, "--dataset", "wikitext2", "--limit", str(chunks),
           "--data-dir", data_dir, "--json", "--quiet"]
    t0 = time.time()
    out = run(cmd)
    line = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not line:
        sys.exit(f"error: no JSON line from bitsmith ppl:\n{out[-4000:]}")
    result = json.loads(line[-1])
    return {"ppl": result["ppl"], "windows": chunks, "seconds": round(time.time() - t0, 1),
            "command": shlex.join(convert) + " && " + shlex.join(cmd)}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--tokenizer-from",
                    help="copy the tokenizer files from this folder (default: `bitsmith convert` "
                         "rebuilds them from the GGUF's vocabulary)")
    ap.add_argument("--data-dir", default=os.environ.get("BITSMITH_DATA_DIR"),
                    help="folder holding wiki.test.raw (default: $BITSMITH_DATA_DIR)")
    ap.add_argument("--chunks", type=int, default=16, help="windows of 2048 tokens")
    ap.add_argument("--tolerance", type=float, default=0.005, help="relative, default 0.5 %%")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp-dir",
                    default=os.environ.get("LLAMA_CPP_DIR",
                                           os.path.expanduser("~/.cache/bitsmith/llama.cpp")))
    ap.add_argument("--bitsmith", default=os.environ.get("BITSMITH", "bitsmith"))
    ap.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp") + "/bitsmith-llama-check")
    ap.add_argument("--llama-only", action="store_true", help="skip the bitsmith side")
    args = ap.parse_args()
    if not args.data_dir:
        sys.exit("error: --data-dir (or BITSMITH_DATA_DIR) is needed for wiki.test.raw")
    tool = os.path.join(args.llama_cpp_dir, "bin", "llama-perplexity")
    if not os.access(tool, os.X_OK):
        sys.exit(f"error: {tool} not found: run scripts/llama_cpp_build.sh first")
    os.makedirs(args.work, exist_ok=True)

    text = joined_text(args.data_dir, args.work)
    report = {"file": args.gguf,
              "llama_cpp": llama_ppl(tool, args.gguf, text, args.chunks, args.threads)}
    ok = True
    if not args.llama_only:
        report["bitsmith"] = bitsmith_ppl(args.bitsmith, args.gguf, args.tokenizer_from,
                                          args.data_dir, args.chunks, args.work)
        rel = report["llama_cpp"]["ppl"] / report["bitsmith"]["ppl"] - 1.0
        report["relative_difference"] = rel
        ok = abs(rel) <= args.tolerance
        report["within_tolerance"] = ok
    print(json.dumps(report), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
