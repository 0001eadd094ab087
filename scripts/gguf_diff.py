#!/usr/bin/env python3
"""Compare two GGUF files tensor by tensor, byte for byte, with the `gguf` package's reader.

    python scripts/gguf_diff.py A.gguf B.gguf [--json]

For each tensor name in either file: its type in each, and whether the bytes are equal;
where the types agree and the bytes differ, how many blocks differ. Used to check that
`bitsmith export --type T` writes the blocks `llama-quantize` writes for T (README, "GGUF").
Exits 1 when any tensor differs. Needs `pip install gguf numpy`.
"""
import json
import sys

import gguf
import numpy as np


def tensors(path):
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        raise SystemExit(__doc__)
    a, b = tensors(args[0]), tensors(args[1])
    rows, differ = [], 0
    for name in sorted(set(a) | set(b)):
        ta, tb = a.get(name), b.get(name)
        if ta is None or tb is None:
            rows.append({"tensor": name, "only_in": args[0] if tb is None else args[1]})
            differ += 1
            continue
        ty_a, ty_b = ta.tensor_type.name, tb.tensor_type.name
        da = np.asarray(ta.data).view(np.uint8).ravel()
        db = np.asarray(tb.data).view(np.uint8).ravel()
        row = {"tensor": name, "type": ty_a if ty_a == ty_b else f"{ty_a}/{ty_b}"}
        if ty_a != ty_b or da.size != db.size:
            row["equal"] = False
        else:
            row["equal"] = bool(np.array_equal(da, db))
            if not row["equal"]:
                block_bytes = gguf.GGML_QUANT_SIZES[ta.tensor_type][1]
                blocks_a = da.reshape(-1, block_bytes)
                blocks_b = db.reshape(-1, block_bytes)
                row["blocks_differing"] = int((blocks_a != blocks_b).any(axis=1).sum())
                row["blocks"] = int(blocks_a.shape[0])
        differ += not row["equal"]
        rows.append(row)
    by_type = {}
    for r in rows:
        if "type" in r:
            s = by_type.setdefault(r["type"], {"tensors": 0, "equal": 0})
            s["tensors"] += 1
            s["equal"] += r["equal"]
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            if not r.get("equal", False):
                print(r)
    print(json.dumps({"tensors": len(rows), "differing": differ, "by_type": by_type}))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
