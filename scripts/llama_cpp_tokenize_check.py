#!/usr/bin/env python3
"""Tokenize llama.cpp's vocabulary test inputs with llama.cpp's own tokenizer
(`llama-tokenize`) on a GGUF file and compare with the ids llama.cpp's tests expect.

    python scripts/llama_cpp_tokenize_check.py MODEL.gguf VOCAB.gguf.inp VOCAB.gguf.out

MODEL.gguf is any GGUF holding the vocabulary under test (bitsmith's export, say); the
.inp/.out pair is one of llama.cpp's `models/ggml-vocab-*.gguf.{inp,out}` (the fixture's
`vocab/` folder has two, from `scripts/make-fixture.sh`). `llama-tokenize` comes from
`scripts/llama_cpp_build.sh` (`$LLAMA_TOKENIZE` overrides where). Prints `matched/total`
and the first mismatches; exits 1 on any mismatch.
"""
import os
import subprocess
import sys
import tempfile


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    model, inp, out = sys.argv[1:]
    tool = os.environ.get(
        "LLAMA_TOKENIZE",
        os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                     "bitsmith", "llama.cpp", "bin", "llama-tokenize"),
    )
    if not os.access(tool, os.X_OK):
        print(f"{tool} not found: run scripts/llama_cpp_build.sh", file=sys.stderr)
        return 2
    with open(out, encoding="utf-8") as f:
        want = [line.split() for line in f.read().splitlines()]
    with open(inp, encoding="utf-8") as f:
        cases = f.read().split("\n__ggml_vocab_test__\n")[: len(want)]
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "case.txt")
        for case, ids in zip(cases, want):
            with open(text, "w", encoding="utf-8") as f:
                f.write(case)
            r = subprocess.run(
                [tool, "-m", model, "-f", text, "--ids", "--no-bos", "--log-disable"],
                capture_output=True, text=True, check=False,
            )
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            got = r.stdout.strip().strip("[]").replace(",", " ").split()
            if got != ids:
                bad.append((case, ids, got))
    print(f"{len(want) - len(bad)}/{len(want)} inputs tokenized as llama.cpp's test expects")
    for case, ids, got in bad[:5]:
        print(f"  {case!r}: expected {' '.join(ids)}, got {' '.join(got)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
