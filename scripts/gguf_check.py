#!/usr/bin/env python3
"""Check a bitsmith GGUF export with the `gguf` package (llama.cpp's own Python reader).

    bitsmith export MODEL --type Q4_0 -o out.gguf --reference-weights ref.safetensors
    python scripts/gguf_check.py out.gguf ref.safetensors

Reads every tensor of the GGUF with gguf's reader, dequantizes it with
`gguf.quants.dequantize` (numpy, the reference decoder) and compares it bit for bit with
the values bitsmith wrote to `ref.safetensors` (a quantized model's own dequantized
weights where it converted code for code, bitsmith's decoding of the blocks otherwise).
Also checks that the file holds exactly the reference's tensors, with the same shapes.
Prints one line per mismatch and a JSON summary; exits 1 on any mismatch.
Needs `pip install gguf numpy`.
"""
import json
import struct
import sys

import numpy as np
import gguf


def read_safetensors(path):
    """A minimal F32 safetensors reader (no dependency beyond numpy)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] != "F32":
            raise SystemExit(f"{path}: tensor {name} is {t['dtype']}, expected F32")
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[base + a : base + b], dtype="<f4").reshape(t["shape"])
    return out


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    gguf_path, ref_path = sys.argv[1], sys.argv[2]
    reader = gguf.GGUFReader(gguf_path)
    ref = read_safetensors(ref_path)
    bad, types = [], {}
    seen = set()
    for t in reader.tensors:
        seen.add(t.name)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        want = ref.get(t.name)
        if want is None:
            bad.append(f"{t.name}: in the GGUF, not in the reference")
            continue
        if got.size != want.size or tuple(got.shape) != tuple(want.shape):
            bad.append(f"{t.name}: shape {tuple(got.shape)} in the GGUF, {tuple(want.shape)} in the reference")
            continue
        g, w = got.reshape(-1).view(np.uint32), want.reshape(-1).view(np.uint32)
        diff = np.flatnonzero(g != w)
        if diff.size:
            i = diff[0]
            bad.append(
                f"{t.name} ({t.tensor_type.name}): {diff.size} of {g.size} values differ, first at "
                f"{i}: gguf {got.reshape(-1)[i]!r}, bitsmith {want.reshape(-1)[i]!r}"
            )
    for name in sorted(set(ref) - seen):
        bad.append(f"{name}: in the reference, not in the GGUF")
    for line in bad:
        print(line)
    print(json.dumps({"tensors": len(reader.tensors), "types": types, "mismatches": len(bad),
                      "gguf_version": getattr(gguf, "__version__", "unknown")}))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
