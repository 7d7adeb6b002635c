"""llama.cpp's k-quants tuned by SignRound on their own grid (issue 18): perplexity of round to
nearest against SignRound for Q2_K, Q3_K, Q4_K, and the GGUF file each writes (its size, and that
every quantized tensor in it decodes to exactly the weights lowbit evaluated).

    python bench/kquant.py                        # pycode-7m, q2_k q3_k q4_k, iters 200
    python bench/kquant.py --types q2_k --iters 50

pycode-7m; calibration and evaluation as bench/core.py (128 windows of 256 from calib.txt; 300
windows of heldout.txt). Every layer in the type named (pycode-7m's rows are 256 and 768 wide:
whole super-blocks). lowbit's own perplexity of its fake-quantized model; the llama.cpp column of
the same files is bench/gguf_llamacpp.py's (needs llama-cpp-python). Rows are appended to
bench/results/kquant.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from core import ASSETS, MODELS, SEQLEN, text_slice  # noqa: E402


def one(name: str, algorithm: str, iters: int, nsamples: int) -> dict:
    import torch

    import lowbit
    from lowbit.calib import make_windows, tokenize
    from lowbit.eval import perplexity
    from lowbit.export.gguf import gguf_name, read_gguf_weights, rotary_row_order, write_gguf
    from lowbit.model import load_model

    folder, _, calib, evaluation, windows = MODELS["pycode-7m"]
    model, tok = load_model(os.path.join(ASSETS, folder))
    row = {"model": "pycode-7m", "type": name, "algorithm": algorithm, "iters": iters if algorithm != "rtn" else 0}
    if name != "fp32":
        algo = lowbit.RTN() if algorithm == "rtn" else lowbit.SignRound(iters=iters)
        t0 = time.perf_counter()
        r = lowbit.quantize(model, f"gguf:{name}", algo, make_windows(tokenize(tok, text_slice(calib)), nsamples, SEQLEN, seed=0),
                            tokenizer=tok, nsamples=nsamples, seqlen=SEQLEN, progress=False)
        row["seconds"] = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.gguf")
            summary = write_gguf(model, tok, r.layers, path, name)
            row["file_mb"] = os.path.getsize(path) / 1e6
            got = read_gguf_weights(path)
        cfg = model.config
        exact = True
        for layer in r.layers:
            g = gguf_name(layer + ".weight")
            w = model.get_submodule(layer).weight.detach().numpy()
            heads = {".attn_q.": cfg.num_attention_heads, ".attn_k.": cfg.num_key_value_heads}
            for k, h in heads.items():
                if k in g:
                    w = w[rotary_row_order(w.shape[0], h)]
            exact &= bool(np.array_equal(got[g], w)) and summary[g] == f"{name} exact"
        row["file_holds_lowbit_weights"] = exact
    ev = perplexity(model, tokens=tokenize(tok, text_slice(evaluation)), seqlen=SEQLEN, max_windows=windows)
    row.update(ppl=ev["ppl"], eval_windows=ev["windows"], threads=torch.get_num_threads())
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=["q2_k", "q3_k", "q4_k"])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--out", default=os.path.join(HERE, "results", "kquant.jsonl"))
    args = p.parse_args()
    rows = [one("fp32", "original", 0, 0)]
    for t in args.types:
        for a in ("rtn", "signround"):
            rows.append(one(t, a, args.iters, args.nsamples))
            r = rows[-1]
            print(f"{t:5s} {a:9s} ppl {r['ppl']:.4f}  {r['seconds']:6.1f}s  file {r['file_mb']:.2f} MB  "
                  f"exact {r['file_holds_lowbit_weights']}", flush=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "date": time.strftime("%Y-%m-%d")}) + "\n")
    fp = rows[0]["ppl"]
    print(f"\noriginal {fp:.4f}\n\n| type | RTN | SignRound (iters {args.iters}) | RTN's loss recovered | file (MB) | file = lowbit's weights |")
    print("|---|---|---|---|---|---|")
    for t in args.types:
        rtn = next(r for r in rows if r["type"] == t and r["algorithm"] == "rtn")
        sr = next(r for r in rows if r["type"] == t and r["algorithm"] == "signround")
        rec = (rtn["ppl"] - sr["ppl"]) / (rtn["ppl"] - fp) if rtn["ppl"] > fp else float("nan")
        print(f"| {t} | {rtn['ppl']:.4f} | {sr['ppl']:.4f} | {rec:.0%} | {sr['file_mb']:.2f} | "
              f"{rtn['file_holds_lowbit_weights'] and sr['file_holds_lowbit_weights']} |")


if __name__ == "__main__":
    main()
