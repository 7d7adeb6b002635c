"""Fingerprints of what lowbit writes: a SHA-256 per quantized result and per exported weight
file, for a fixed set of cases (models, schemes, algorithms, formats, re-exports). Two runs of the
same code on the same machine print the same lines; a refactoring that must not change behaviour
is checked by running this before and after and comparing the output (`diff`).

    python bench/fingerprint.py > before.txt     # on the old code
    python bench/fingerprint.py > after.txt      # on the new code
    diff before.txt after.txt && echo identical

Weight files are hashed whole (.safetensors, .gguf); quantization.json is left out (it holds
timings). The logits of each packed folder loaded back with lowbit.load are hashed too, and the
codes, scales and zero points of every quantized layer.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lowbit  # noqa: E402
from lowbit.calib import make_windows, tokenize  # noqa: E402
from lowbit.export import export, read_quantized  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "..", "shared", "assets")
STORIES = os.path.join(ASSETS, "models", "stories260K")
PYCODE = os.path.join(ASSETS, "models", "pycode-7m")
TINYSTORIES = os.path.join(ASSETS, "text", "tinystories_valid_prefix.txt")

# name -> (model, scheme, algorithm, overrides, lm_head, formats, re-exports: (from format, to formats))
CASES = {
    "stories-W4G32-signround": (STORIES, "W4A16G32", "signround", None, False,
                                "fake,auto_round,gptq,gguf:q4_0,gguf:q4_k", [("fake", "auto_round,gguf:q4_0")]),
    "stories-W2G32-asym-signround": (STORIES, "W2A16G32-asym", "signround", None, False,
                                     "fake,auto_round,gptq", [("auto_round", "gptq,fake")]),
    "pycode-W2-mixed-signround": (PYCODE, "W2A16", "signround", {r".*self_attn\..*": "W4A16-asym"}, False,
                                  "fake,auto_round,gptq", [("gptq", "auto_round")]),
    "pycode-W8-rtn": (PYCODE, "W8A16", "rtn", None, False, "auto_round,gguf:q8_0,gguf:f16", []),
    "pycode-W3PC-asym-rtn": (PYCODE, "W3A16PC-asym", "rtn", None, False, "fake,auto_round,gptq", []),
    "pycode-W4-lmhead-rtn": (PYCODE, "W4A16", "rtn", None, True, "fake,auto_round,gguf:q4_k", [("fake", "gptq")]),
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tensor_sha(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def folder_lines(tag: str, folder: str) -> list[str]:
    lines = []
    files = sorted(glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True)
                   + glob.glob(os.path.join(folder, "**", "*.gguf"), recursive=True))
    for f in files:
        with open(f, "rb") as fh:
            lines.append(f"{tag} {os.path.relpath(f, folder)} {sha(fh.read())}")
    return lines


def logits_lines(tag: str, folder: str, ids: torch.Tensor) -> list[str]:
    """Each packed or fake subfolder loaded back with lowbit.load: the hash of its logits."""
    out = []
    subs = [folder] + sorted(os.path.join(folder, d) for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    for sub in subs:
        if not os.path.isfile(os.path.join(sub, "config.json")):
            continue
        model, _ = lowbit.load(sub)
        with torch.no_grad():
            out.append(f"{tag} logits {os.path.relpath(sub, folder)} {tensor_sha(model(ids).logits)}")
    return out


def run_case(name: str, spec, tmp: str, iters: int) -> list[str]:
    model_dir, scheme, algo_name, overrides, lm_head, formats, reexports = spec
    torch.manual_seed(0)
    model, tok = lowbit.load(model_dir)
    calib_file = TINYSTORIES if model_dir == STORIES else os.path.join(PYCODE, "calib.txt")
    with open(calib_file) as f:
        text = f.read()[:200_000]
    windows = make_windows(tokenize(tok, text), 16, 64, seed=0)
    algo = lowbit.SignRound(iters=iters) if algo_name == "signround" else lowbit.RTN()
    r = lowbit.quantize(model, lowbit.get_scheme(scheme), algo, windows, tokenizer=tok, overrides=overrides,
                        lm_head=lm_head, progress=False)
    lines = [f"{name} layer {n} {q.bits} {q.group_size} {q.sym} {tensor_sha(q.codes, q.scale.float(), q.zero.float())}"
             for n, q in sorted(r.layers.items())]
    out = export(r, os.path.join(tmp, name), formats)
    ids = windows[:2, :48]
    lines += folder_lines(name, out) + logits_lines(name, out, ids)
    for src, dst in reexports:
        src_dir = out if "," not in formats else os.path.join(out, src)
        back = read_quantized(src_dir)
        out2 = export(back, os.path.join(tmp, f"{name}-from-{src}"), dst)
        lines += folder_lines(f"{name} from {src}", out2)
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--iters", type=int, default=20, help="SignRound iterations in the signround cases")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            for line in run_case(name, CASES[name], tmp, args.iters):
                print(line, flush=True)


if __name__ == "__main__":
    main()
