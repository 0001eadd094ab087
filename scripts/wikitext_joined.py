#!/usr/bin/env python3
"""Write a WikiText-2 `wiki.*.raw` file as bitsmith's `ppl` reads it (the GPTQ protocol):
the Hugging Face rows (one per line, whitespace-only lines as "") joined with "\\n\\n".
The same text `src/util/text.rs::wikitext_joined` builds, for other tools to score, e.g.

    python scripts/wikitext_joined.py wiki.test.raw wiki.test.joined.txt
    llama-perplexity -m model.gguf -f wiki.test.joined.txt -c 1025 --ppl-stride 2047
"""
import sys


def joined(raw):
    """The rows of a `wiki.*.raw` text joined as bitsmith joins them."""
    # split after every "\n" only (str.splitlines would also split on \r, \x0b, U+2028...)
    parts = raw.split("\n")
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    rows = ["" if line.strip() == "" else line for line in lines]
    return "\n\n".join(rows)


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    with open(sys.argv[1], encoding="utf-8", newline="") as f:
        raw = f.read()
    with open(sys.argv[2], "w", encoding="utf-8", newline="") as f:
        f.write(joined(raw))


if __name__ == "__main__":
    main()
