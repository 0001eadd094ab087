#!/usr/bin/env python3
"""Check a bitsmith compressed-tensors export with the compressed-tensors package itself.

    bitsmith export MODEL --format compressed-tensors -o OUT --reference-weights ref.safetensors
    python scripts/compressed_tensors_check.py OUT ref.safetensors

Loads OUT with the package's own model-free decompressor (the `CompressedTensorsDequantizer`
of `compressed_tensors.entrypoints.convert`: it validates `quantization_config`, matches the
config group's targets and `ignore`, and runs the `pack-quantized` compressor's
`decompress` on every targeted linear; `validate` also fails on any quantization tensor
left over), then compares every dequantized weight with the weights bitsmith dequantizes
(`ref.safetensors`, F32):

- `f32`: the package's `decompress` with `weight_scale` widened to float32 must equal
  bitsmith's f32 weights bit for bit (codes, zero points and f16 scales all carried over);
- `f16`: the package's default, computing in the scale's dtype (float16), must equal
  bitsmith's weights rounded to float16 bit for bit; the summary counts the weights where
  that rounding changes the value (`(c - z) * s` needs more than f16's 11 bits).

Also checks that the two sets of weights name the same tensors with the same shapes.
Prints one line per mismatch and a JSON summary; exits 1 on any mismatch.
Needs `pip install compressed-tensors` (which brings torch).

    python scripts/compressed_tensors_check.py OUT ref.safetensors --ppl wiki.test.raw [--limit 16]

also loads OUT the way a user would, with transformers (`AutoModelForCausalLM`, whose
compressed-tensors integration decompresses every linear at load), in float32, and scores
the first LIMIT windows of 2048 tokens of WikiText-2 by bitsmith's protocol (the rows
joined as `scripts/wikitext_joined.py` joins them, every token after the first of each
window): compare `ppl` with `bitsmith ppl MODEL --limit LIMIT`. Needs `transformers` too.
"""
import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
    CompressedTensorsDequantizer,
)
from compressed_tensors.utils.match import match_quantizable_tensors


def load_folder(folder):
    index = f"{folder}/model.safetensors.index.json"
    try:
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    except FileNotFoundError:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(f"{folder}/{name}"))
    return tensors


def decompress_f32(dequantizer, tensors):
    """The package's decompress per targeted module, scales widened to float32."""
    out = {}
    for scheme in dequantizer.quant_config.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        names = compressor.compression_param_names(scheme)
        for module, _ in match_quantizable_tensors(
            tensors,
            ignore=dequantizer.quant_config.ignore,
            targets=scheme.targets,
            param_targets=[names[0]],
        ):
            state = {n: tensors[f"{module}.{n}"] for n in names}
            state["weight_scale"] = state["weight_scale"].float()
            out[f"{module}.weight"] = compressor.decompress(state, scheme)["weight"]
    return out


def perplexity(folder, wiki_raw, limit, seqlen=2048):
    """transformers' perplexity of the folder on the first `limit` windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from wikitext_joined import joined

    with open(wiki_raw, encoding="utf-8", newline="") as f:
        text = joined(f.read())
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
    )
    model.eval()
    windows = min(limit, ids.shape[1] // seqlen)
    nlls = []
    with torch.no_grad():
        for i in range(windows):
            x = ids[:, i * seqlen : (i + 1) * seqlen]
            logits = model(x).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
            nlls.append(nll.item())
    mean = sum(nlls) / len(nlls)
    return {
        "ppl": math.exp(mean),
        "mean_nll": mean,
        "windows": windows,
        "corpus_tokens": ids.shape[1],
        "window_nll": nlls,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("reference")
    ap.add_argument("--ppl", metavar="WIKI_TEST_RAW")
    ap.add_argument("--limit", type=int, default=16)
    a = ap.parse_args()
    folder, ref_path = a.folder, a.reference
    reference = load_file(ref_path)
    tensors = load_folder(folder)

    dequantizer = CompressedTensorsDequantizer(folder, dtype=torch.float32)
    native = dequantizer.validate(dict(tensors))
    wide = decompress_f32(dequantizer, tensors)

    failures = []
    rounded = 0
    total = 0
    for name, want in sorted(reference.items()):
        for label, got_all in (("f32", wide), ("f16", native)):
            got = got_all.get(name)
            if got is None:
                failures.append(f"{name}: missing from the {label} decompression")
                continue
            if tuple(got.shape) != tuple(want.shape):
                failures.append(f"{name} ({label}): shape {tuple(got.shape)}, want {tuple(want.shape)}")
                continue
            target = want if label == "f32" else want.half().float()
            diff = (got.float().view(torch.int32) != target.view(torch.int32)).sum().item()
            if diff:
                failures.append(f"{name} ({label}): {diff} of {want.numel()} weights differ")
        rounded += (want.half().float() != want).sum().item()
        total += want.numel()
    extra = sorted(set(wide) - set(reference))
    for name in extra:
        failures.append(f"{name}: decompressed but not in the reference")

    for f in failures:
        print(f)
    summary = {
        "linears": len(reference),
        "weights": total,
        "f16_rounded_weights": rounded,
        "mismatches": len(failures),
        "compressed_tensors": __import__("compressed_tensors").__version__,
    }
    if a.ppl:
        summary["transformers"] = perplexity(folder, a.ppl, a.limit)
    print(json.dumps(summary))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
