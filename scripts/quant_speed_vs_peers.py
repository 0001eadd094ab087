#!/usr/bin/env python3
"""GPTQ quantization speed: bitsmith against GPTQModel and the reference GPTQ (IST-DASLab's
`gptq`) on the same CPU, same model, same calibration size, then the perplexity of every
output by `bitsmith ppl` (issue 17, point 4).

    python3 -m venv ~/.cache/bitsmith/gptq-peers-venv
    ~/.cache/bitsmith/gptq-peers-venv/bin/pip install torch transformers gptqmodel==7.7.0
    python scripts/quant_speed_vs_peers.py --work /tmp/qspeed --model FOLDER \\
        --peer-python ~/.cache/bitsmith/gptq-peers-venv/bin/python [--seqlen 512 2048]

For each calibration length L (128 segments each, `--nsamples`), w4 g128 asymmetric, no
act-order, true-sequential on every side:
* bitsmith: `bitsmith quantize FOLDER --method gptq --bits 4 --group-size 128 --nsamples N
  --seqlen L --seed 0` (its defaults otherwise: the Hessian-weighted `shrink` range, damp
  0.01), 128 random L-token windows of the embedded WikiText-2 validation split;
* GPTQModel: `GPTQModel.load(FOLDER, QuantizeConfig(bits=4, group_size=128, sym=False,
  desc_act=False))`, `quantize(calibration, batch_size=1)`, `save` (its defaults otherwise:
  damp 0.05, group-aware reordering, the model's dtype), on CPU (no GPU is visible to it;
  `GPTQMODEL_CPU_WORKERS=2`, without which 7.7 refuses to start on a 2-core machine),
  fed 128 random L-token windows of the same split (seed 0, tokenized with the model's
  `tokenizer.json`): the same amount and source of text, not the same windows.
* reference (`--tools …,reference --reference-gptq DIR`, DIR a checkout of
  https://github.com/IST-DASLab/gptq): its `GPTQ` and `Quantizer` classes, imported from DIR
  as they are, driven by `llama.py`'s sequential loop (REFERENCE_DRIVER below: CPU, the
  catcher keeping every keyword transformers >= 5 passes to a decoder layer), `--wbits 4
  --groupsize 128 --true-sequential --percdamp .01`, asymmetric, the model's own dtype
  (`torch_dtype='auto'`, as `llama.py` loads it), fed the same windows as GPTQModel; its
  fake-quantized model is saved as a float folder.
Each run is timed with `/usr/bin/time -v` (wall clock and peak RSS of the whole process:
loading, calibration, solving and writing); the tools run in reverse order on odd rounds
(`--rounds`). Then `bitsmith ppl OUT --limit LIMIT` scores every output (GPTQModel's GPTQ
checkpoint read by bitsmith's GPTQ loader). That reading is checked against GPTQModel's own:
its loader (`GPTQModel.load(OUT, backend=BACKEND.TORCH)`, in the checkpoint's dtype) and
`bitsmith ppl --limit K` score the first K windows (`--peer-check-windows`, 0 skips) and
the script stops if they differ by more than 0.5 % (bf16 against f32 compute differs by
~0.05 %; a misread checkpoint by far more: a wrong RoPE base gave +22 %). Raw results go to
WORK/raw.jsonl.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from wikitext_joined import joined  # noqa: E402

# Run by the peer's Python: argv = model, calibration JSON, output folder.
GPTQMODEL_DRIVER = r"""
import json, sys, time
import torch
from gptqmodel import GPTQModel, QuantizeConfig
model_dir, calib_path, out = sys.argv[1:4]
with open(calib_path) as f:
    windows = json.load(f)
calibration = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
qc = QuantizeConfig(bits=4, group_size=128, sym=False, desc_act=False)
t0 = time.time()
model = GPTQModel.load(model_dir, qc)
t1 = time.time()
model.quantize(calibration, batch_size=1)
t2 = time.time()
model.save(out)
t3 = time.time()
print("PEER_TIMES " + json.dumps({"load": t1 - t0, "quantize": t2 - t1, "save": t3 - t2,
      "torch": torch.__version__, "threads": torch.get_num_threads(),
      "damp": qc.damp_percent, "dtype": str(next(model.model.parameters()).dtype)}))
"""

# Run by the peer's Python: argv = scripts folder, model folder, wiki.test.raw, windows.
# The GPTQ-protocol perplexity of the first windows, by GPTQModel's own loader and kernels.
PEER_PPL_DRIVER = r"""
import json, math, sys
import torch
scripts, path, test_raw, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, scripts)
from pathlib import Path
from reference_ppl import hf_rows
from gptqmodel import GPTQModel, BACKEND
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(path)
model = GPTQModel.load(path, backend=BACKEND.TORCH, device="cpu")
ids = tok("\n\n".join(hf_rows(Path(test_raw))), return_tensors="pt").input_ids
nll, count = 0.0, 0
with torch.inference_mode():
    for i in range(n):
        x = ids[:, i * 2048:(i + 1) * 2048]
        logits = model.model(x, use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
print("PEER_PPL " + json.dumps({"windows": n, "ppl": math.exp(nll / count)}))
"""


# Run by the peer's Python: argv = reference folder, model folder, calibration JSON, output
# folder. The sequential layer loop of IST-DASLab/gptq's `llama.py` (`llama_sequential` with
# `--true-sequential`, 4 bits, `--groupsize 128`, asymmetric, `--percdamp .01`, no act-order)
# around the reference's own `GPTQ` and `Quantizer` classes imported from its `gptq.py` and
# `quant.py`; only the plumbing differs: CPU instead of `cuda:0` (its unconditional
# `torch.cuda.synchronize()` becomes a no-op), and the catcher keeps every keyword the
# decoder layers of transformers >= 5 need (rotary `position_embeddings`, not only
# `attention_mask`). Writes the fake-quantized model as a float folder, as `llama.py` leaves it.
REFERENCE_DRIVER = r"""
import json, os, shutil, sys, time
ref, model_dir, calib_path, out = sys.argv[1:5]
sys.path.insert(0, ref)
import torch
import torch.nn as nn
if not torch.cuda.is_available():
    torch.cuda.synchronize = lambda *a, **k: None
from gptq import GPTQ
from quant import Quantizer
from modelutils import find_layers
from transformers import LlamaForCausalLM
t0 = time.time()
model = LlamaForCausalLM.from_pretrained(model_dir, dtype="auto")
model.eval()
model.config.use_cache = False
with open(calib_path) as f:
    windows = json.load(f)
t1 = time.time()
with torch.no_grad():
    layers = model.model.layers
    dtype = next(iter(model.parameters())).dtype
    n, L = len(windows), len(windows[0])
    inps = torch.zeros((n, L, model.config.hidden_size), dtype=dtype)
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for w in windows:
        try:
            model(torch.tensor([w]))
        except ValueError:
            pass
    layers[0] = layers[0].module
    kwargs = cache["kwargs"]
    outs = torch.zeros_like(inps)

    def run(layer, j):
        o = layer(inps[j].unsqueeze(0), **kwargs)
        o = o[0] if isinstance(o, tuple) else o
        outs[j] = o.reshape(outs[j].shape)

    sequential = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
                  ["self_attn.o_proj"], ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]
    for i in range(len(layers)):
        layer = layers[i]
        full = find_layers(layer)
        for names in sequential:
            subset = {nm: full[nm] for nm in names}
            gptq = {}
            for nm in subset:
                gptq[nm] = GPTQ(subset[nm])
                gptq[nm].quantizer = Quantizer()
                gptq[nm].quantizer.configure(4, perchannel=True, sym=False, mse=False)
            def add_batch(nm):
                def tmp(_, inp, o):
                    gptq[nm].add_batch(inp[0].data, o.data)
                return tmp
            handles = [subset[nm].register_forward_hook(add_batch(nm)) for nm in subset]
            for j in range(n):
                run(layer, j)
            for h in handles:
                h.remove()
            for nm in subset:
                gptq[nm].fasterquant(percdamp=0.01, groupsize=128, actorder=False)
                gptq[nm].free()
        for j in range(n):
            run(layer, j)
        inps, outs = outs, inps
t2 = time.time()
model.save_pretrained(out)
for f in os.listdir(model_dir):
    if f.startswith("tokenizer") or f in ("special_tokens_map.json", "generation_config.json"):
        shutil.copy(os.path.join(model_dir, f), out)
t3 = time.time()
print("PEER_TIMES " + json.dumps({"load": t1 - t0, "quantize": t2 - t1, "save": t3 - t2,
      "torch": torch.__version__, "threads": torch.get_num_threads(), "damp": 0.01,
      "dtype": str(dtype)}))
"""


def timed(cmd, log_path, env=None):
    """Run `cmd` under /usr/bin/time -v; returns (wall seconds, peak RSS MiB, stdout)."""
    full = ["/usr/bin/time", "-v"] + cmd
    print("$ " + " ".join(full), flush=True)
    t0 = time.time()
    p = subprocess.run(full, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    with open(log_path, "w") as f:
        f.write(p.stdout + "\n----- stderr -----\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}), log: {log_path}\n{p.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return wall, int(rss.group(1)) / 1024 if rss else None, p.stdout


def calibration_windows(model_dir, data_dir, n, seqlen, seed):
    """`n` random `seqlen`-token windows of the joined WikiText-2 validation split."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(data_dir, "wiki.valid.raw"), encoding="utf-8", newline="") as f:
        ids = tok.encode(joined(f.read()), add_special_tokens=False).ids
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seqlen) for _ in range(n)]
    return [ids[s:s + seqlen] for s in starts]


def ppl(bitsmith, out, data_dir, limit):
    p = subprocess.run([bitsmith, "ppl", out, "--limit", str(limit), "--json",
                        "--data-dir", data_dir], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bitsmith ppl {out} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)["ppl"]


def peer_check(args, ppl_driver, out, env):
    """GPTQModel's own perplexity of its checkpoint against bitsmith's reading of it."""
    k = args.peer_check_windows
    p = subprocess.run([args.peer_python, ppl_driver, HERE, out,
                        os.path.join(args.data_dir, "wiki.test.raw"), str(k)],
                       capture_output=True, text=True, env=env)
    m = re.search(r"PEER_PPL (.*)", p.stdout)
    if p.returncode != 0 or not m:
        raise SystemExit(f"GPTQModel's perplexity of {out} failed:\n{p.stderr[-3000:]}")
    theirs = json.loads(m.group(1))["ppl"]
    ours = ppl(args.bitsmith, out, args.data_dir, k)
    rel = ours / theirs - 1
    print(f"  {out}: {k} windows, GPTQModel's loader {theirs:.4f}, bitsmith {ours:.4f} ({rel:+.3%})",
          flush=True)
    if abs(rel) > 0.005:
        raise SystemExit(f"bitsmith reads {out} differently from GPTQModel ({rel:+.2%})")
    return {"windows": k, "gptqmodel_ppl": theirs, "bitsmith_ppl": ours}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder for calibration, outputs, logs")
    ap.add_argument("--model", required=True, help="float model folder (HF layout)")
    ap.add_argument("--peer-python", required=True,
                    help="a Python with torch + gptqmodel installed")
    ap.add_argument("--bitsmith", default=os.path.join(ROOT, "target/release/bitsmith"))
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "data/wikitext-2-raw"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, nargs="+", default=[512])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--limit", type=int, default=16, help="2048-token windows for ppl")
    ap.add_argument("--tools", default="bitsmith,gptqmodel",
                    help="comma-separated, run in this order (reversed on odd rounds): "
                         "bitsmith, gptqmodel, reference")
    ap.add_argument("--reference-gptq",
                    help="a checkout of IST-DASLab/gptq (its gptq.py, quant.py, modelutils.py): "
                         "needed by the `reference` tool, run with --peer-python")
    ap.add_argument("--peer-check-windows", type=int, default=4,
                    help="windows scored by GPTQModel's own loader to check bitsmith's reading (0 skips)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    tools = args.tools.split(",")
    unknown = set(tools) - {"bitsmith", "gptqmodel", "reference"}
    if unknown:
        ap.error(f"unknown --tools {sorted(unknown)}: choose from bitsmith, gptqmodel, reference")
    if "reference" in tools:
        missing = [f for f in ("gptq.py", "quant.py", "modelutils.py")
                   if not os.path.isfile(os.path.join(args.reference_gptq or "", f))]
        if not args.reference_gptq or missing:
            ap.error("the `reference` tool needs --reference-gptq DIR holding IST-DASLab/gptq's "
                     f"gptq.py, quant.py and modelutils.py (missing: {missing})")
    ref_driver = os.path.join(args.work, "reference_gptq_driver.py")
    with open(ref_driver, "w") as f:
        f.write(REFERENCE_DRIVER)
    driver = os.path.join(args.work, "gptqmodel_driver.py")
    with open(driver, "w") as f:
        f.write(GPTQMODEL_DRIVER)
    ppl_driver = os.path.join(args.work, "gptqmodel_ppl_driver.py")
    with open(ppl_driver, "w") as f:
        f.write(PEER_PPL_DRIVER)
    # GPTQModel 7.7 sizes its CPU pool as (cores + 1) // 2 and then asks for 2 loader
    # workers, which fails on a 2-core machine unless the pool is set explicitly.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    results = []
    for L in args.seqlen:
        calib = os.path.join(args.work, f"calib-{args.nsamples}x{L}.json")
        if not os.path.exists(calib):
            windows = calibration_windows(args.model, args.data_dir, args.nsamples, L, 0)
            with open(calib + ".tmp", "w") as f:  # no half-written file after a failure
                json.dump(windows, f)
            os.replace(calib + ".tmp", calib)
        for r in range(args.rounds):
            order = tools if r % 2 == 0 else tools[::-1]
            for tool in order:
                out = os.path.join(args.work, f"{tool}-{args.nsamples}x{L}-r{r}")
                log = out + ".log"
                if tool == "bitsmith":
                    cmd = [args.bitsmith, "quantize", args.model, "--method", "gptq",
                           "--bits", "4", "--group-size", "128", "--nsamples",
                           str(args.nsamples), "--seqlen", str(L), "--seed", "0", "-o", out]
                elif tool == "reference":
                    cmd = [args.peer_python, ref_driver, args.reference_gptq, args.model,
                           calib, out]
                else:
                    cmd = [args.peer_python, driver, args.model, calib, out]
                wall, rss, stdout = timed(cmd, log, env)
                m = re.search(r"PEER_TIMES (.*)", stdout)
                extra = json.loads(m.group(1)) if m else {}
                row = {"tool": tool, "nsamples": args.nsamples, "seqlen": L, "round": r,
                       "wall_s": wall, "peak_rss_mib": rss, "ppl": None, **extra}
                row["ppl"] = ppl(args.bitsmith, out, args.data_dir, args.limit)
                if tool == "gptqmodel" and args.peer_check_windows:
                    row["peer_check"] = peer_check(args, ppl_driver, out, env)
                print(json.dumps(row), flush=True)
                results.append(row)
                with open(os.path.join(args.work, "raw.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"\n| calibration | tool | wall s (median, min–max) | peak RSS MiB | ppl ({args.limit} × 2048) |")
    print("|---|---|---|---|---|")
    for L in args.seqlen:
        for tool in tools:
            rows = [x for x in results if x["seqlen"] == L and x["tool"] == tool]
            if not rows:
                continue
            w = [x["wall_s"] for x in rows]
            print(f"| {args.nsamples} × {L} | {tool} | {statistics.median(w):.0f} "
                  f"({min(w):.0f}–{max(w):.0f}) | {max(x['peak_rss_mib'] for x in rows):.0f} "
                  f"| {statistics.median(x['ppl'] for x in rows):.4f} |")


if __name__ == "__main__":
    main()
