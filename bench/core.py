"""Core benchmark: perplexity of the original, RTN and SignRound (with and without the
activation-weighted pre-tuning scale search, "prescale"), quantization wall time and peak memory,
on stories260K (W2G32, W3G32, W4G32) and pycode-7m (W2G128, W3G128, W4G128).

    python bench/core.py                 # everything, writes bench/results/core.md and .jsonl
    python bench/core.py --models stories260K --bits 2

Each quantization runs in its own process so its peak resident memory is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "..", "shared", "assets")

# name -> (folder, group size, calibration text (file, start, end fraction), evaluation text, eval windows)
MODELS = {
    "stories260K": ("models/stories260K", 32, ("text/tinystories_valid_prefix.txt", 0.0, 0.6),
                    ("text/tinystories_valid_prefix.txt", 0.8, 1.0), 200),
    "pycode-7m": ("models/pycode-7m", 128, ("models/pycode-7m/calib.txt", 0.0, 1.0),
                  ("models/pycode-7m/heldout.txt", 0.0, 1.0), 300),
}
SEQLEN = 256  # calibration and evaluation windows (both models were trained on 256)


def text_slice(spec) -> str:
    path, a, b = spec
    with open(os.path.join(ASSETS, path)) as f:
        text = f.read()
    return text[int(a * len(text)) : int(b * len(text))]


def algorithms(iters: int) -> dict:
    import lowbit

    return {
        "rtn": lowbit.RTN(),
        "rtn+prescale": lowbit.SignRound(iters=0, prescale=True),  # "optimized RTN"
        "signround": lowbit.SignRound(iters=iters, prescale=False),
        "signround+prescale": lowbit.SignRound(iters=iters, prescale=True),
    }


def one(model_name: str, bits: int | None, algorithm: str, iters: int, nsamples: int) -> dict:
    """One run, in this process: quantize (unless bits is None) and evaluate."""
    import torch

    import lowbit
    from lowbit.calib import make_windows, tokenize
    from lowbit.eval import perplexity
    from lowbit.model import load_model

    torch.manual_seed(0)
    folder, group, calib, evaluation, windows = MODELS[model_name]
    model, tok = load_model(os.path.join(ASSETS, folder))
    row = {"model": model_name, "scheme": "fp32" if bits is None else f"W{bits}G{group}", "algorithm": algorithm}
    seconds = 0.0
    if bits is not None:
        calib_windows = make_windows(tokenize(tok, text_slice(calib)), nsamples, SEQLEN, seed=0)
        algo = algorithms(iters)[algorithm]
        t0 = time.perf_counter()
        r = lowbit.quantize(model, lowbit.Scheme(bits, group), algo, calib_windows, progress=False)
        seconds = time.perf_counter() - t0
        row["unquantized"] = r.report["unquantized"]
    ev = perplexity(model, tokens=tokenize(tok, text_slice(evaluation)), seqlen=SEQLEN, max_windows=windows)
    row.update(ppl=ev["ppl"], eval_windows=ev["windows"], seconds=seconds,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--out", default=os.path.join(HERE, "results", "core"))
    p.add_argument("--one", nargs=3, metavar=("MODEL", "BITS", "ALGO"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        m, b, a = args.one
        print(json.dumps(one(m, None if b == "none" else int(b), a, args.iters, args.nsamples)))
        return

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows = []
    for m in args.models:
        runs = [("none", "original")] + [(str(b), a) for b in args.bits for a in algorithms(0)]
        for b, a in runs:
            cmd = [sys.executable, __file__, "--one", m, b, a, "--iters", str(args.iters), "--nsamples", str(args.nsamples)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"run failed: {' '.join(cmd)}\n{out.stderr}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['model']:12s} {r['scheme']:7s} {r['algorithm']:10s} ppl {r['ppl']:9.3f}  "
                  f"{r['seconds']:7.1f}s  {r['peak_rss_mb']:6.0f} MB", file=sys.stderr, flush=True)
    with open(args.out + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    table = markdown(rows, args)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table)


def markdown(rows, args) -> str:
    import torch

    orig = {r["model"]: r["ppl"] for r in rows if r["algorithm"] == "original"}
    rtn = {(r["model"], r["scheme"]): r["ppl"] for r in rows if r["algorithm"] == "rtn"}
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}; "
        f"SignRound iters {args.iters}, nsamples {args.nsamples}, seqlen {SEQLEN}, batch 8, seed 0, symmetric.",
        "",
        "| model | scheme | algorithm | perplexity | recovered vs RTN | quantize time (s) | peak RSS (MB) | left unquantized |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rec = ""
        if r["algorithm"] not in ("rtn", "original"):
            lost = rtn[(r["model"], r["scheme"])] - orig[r["model"]]
            rec = f"{(rtn[(r['model'], r['scheme'])] - r['ppl']) / lost:.0%}" if lost > 0 else "n/a"
        lines.append(
            f"| {r['model']} | {r['scheme']} | {r['algorithm']} | {r['ppl']:.3f} | {rec} | "
            f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {', '.join(r.get('unquantized', [])) or '-'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
