"""Packed exports: file size against the fp16 checkpoint, load time, CPU decode speed.

    python bench/export.py [--model ../shared/assets/models/pycode-7m] [--tokens 64]

Weights come from RTN (sizes and speeds do not depend on how the codes were chosen). For each
scheme: the auto_round folder's size, its size relative to the same model saved in fp16, the time
lowbit.load takes, and greedy decode tokens/s of the packed model (QuantLinear, CPU torch path)
against the original fp32 model, in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lowbit  # noqa: E402
from lowbit.export import export  # noqa: E402
from lowbit.schemes import get_scheme  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "..", "shared", "assets")


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def decode_tps(model, ids: torch.Tensor, tokens: int) -> float:
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        dt = time.perf_counter() - t0
    return (out.shape[1] - ids.shape[1]) / dt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ASSETS, "models", "pycode-7m"))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--schemes", default="W2A16,W3A16,W4A16,mixed")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = lowbit.load(args.model)
    ids = tok("import os\n\ndef main(", return_tensors="pt").input_ids
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp16_dir = os.path.join(tmp, "fp16")
        model.to(torch.float16).save_pretrained(fp16_dir)
        model.to(torch.float32)
        fp16 = folder_bytes(fp16_dir)
        fp32_tps = decode_tps(model, ids, args.tokens)
        print(json.dumps({"scheme": "fp32 original", "fp16_bytes": fp16, "decode_tps": fp32_tps}), flush=True)
        for name in args.schemes.split(","):
            overrides = None
            if name == "mixed":  # attention at 4 bits, MLP at 2: a typical plan's shape
                scheme, overrides = get_scheme("W2A16"), {r".*self_attn\..*": get_scheme("W4A16")}
            else:
                scheme = get_scheme(name)
            r = lowbit.quantize(args.model, scheme, algorithm="rtn", overrides=overrides, progress=False)
            out = export(r, os.path.join(tmp, name), "auto_round")
            t0 = time.perf_counter()
            packed, _ = lowbit.load(out)
            load_s = time.perf_counter() - t0
            size = folder_bytes(out)
            row = {"scheme": name, "bytes": size, "vs_fp16": size / fp16, "load_s": load_s,
                   "decode_tps": decode_tps(packed, ids, args.tokens), "fp32_decode_tps": fp32_tps}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| scheme | file MB | vs fp16 | load s | decode tok/s | vs fp32 |")
    print("|---|---|---|---|---|---|")
    print(f"| fp16 original | {fp16 / 1e6:.2f} | 1.00 | | {fp32_tps:.1f} (fp32) | 1.00 |")
    for r in rows:
        print(f"| {r['scheme']} | {r['bytes'] / 1e6:.2f} | {r['vs_fp16']:.3f} | {r['load_s']:.2f} | "
              f"{r['decode_tps']:.1f} | {r['decode_tps'] / fp32_tps:.2f} |")


if __name__ == "__main__":
    main()
