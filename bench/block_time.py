"""Where a block's time goes in a whole quantize run (issue 19): SignRound's tuning, the pipeline's
passes over the calibration windows, the pre-tuning range search.

    python bench/block_time.py                              # SmolLM2-135M, first 3 blocks, W2A16G64, 50 iters
    python bench/block_time.py --model pycode-7m --blocks 6 --scheme W4A16 --iters 200
    python bench/block_time.py --steps 8x50 4x100           # the light preset's two shapes of tuning

The model's first `--blocks` blocks are quantized as `lowbit.quantize` does it (128 windows of 256
of the model's calibration text, batch 8, seed 0), twice per `--rounds`, alternating:

  early   the start's loss (the block-never-ends-worse check) stops once it passes the tuned
          weights' loss (pipeline._loss's `above`), as lowbit runs it
  full    the start's loss over every window (the same function with no bound): the baseline

With `--steps BATCHxITERS ...` the modes are instead those tunings (windows a step x steps), each
with the start's loss stopped early; their weights differ, so nothing is checked.

Each part's seconds per block are summed by wrapping the functions that do it. The two modes must
keep the same weights (checked: the same kept-start choice and loss per block). Rows go to
bench/results/block_time.jsonl with the CPU kind; run it alone.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import lowbit  # noqa: E402
import lowbit.algorithms.signround as signround  # noqa: E402
import lowbit.pipeline as pipeline  # noqa: E402
from float_types import model_setup  # noqa: E402
from scale import cpu_kind  # noqa: E402

# (module, function, label): what each part of a block's time is
PARTS = [
    (signround._Tuner, "tune", "tuning"),
    (pipeline, "_loss", "start's loss"),
    (pipeline, "run_block", "passes (targets, outputs, start's loss)"),
    (signround, "search_range_factors", "range search"),
]


def timed(seconds: dict):
    """Wrap each part's function so its calls add to seconds[label]; returns an undo list."""
    undo = []
    for owner, name, label in PARTS:
        f = getattr(owner, name)

        def wrapper(*a, _f=f, _label=label, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                seconds[_label] += time.perf_counter() - t

        setattr(owner, name, wrapper)
        undo.append((owner, name, f))
    return undo


def run(model_name: str, blocks: int, scheme: str, iters: int, mode: str, batch: int = 8) -> dict:
    from lowbit.calib import make_windows, tokenize
    from lowbit.model import load_model

    folder, calib, _, _ = model_setup(model_name)
    model, tok = load_model(folder)
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    windows = make_windows(tokenize(tok, calib), 128, 256, seed=0)
    seconds = collections.defaultdict(float)
    undo = timed(seconds)
    bounded = pipeline._loss
    if mode == "full":
        pipeline._loss = lambda *a, above=None, **k: bounded(*a, **k)
    try:
        t0 = time.perf_counter()
        r = lowbit.quantize(model, scheme, lowbit.SignRound(iters=iters, batch_size=batch), windows, nsamples=128, seqlen=256,
                            progress=False)
        total = time.perf_counter() - t0
    finally:
        pipeline._loss = bounded
        for owner, name, f in undo:
            setattr(owner, name, f)
    b = r.report["blocks"]
    return {"model": model_name, "blocks": blocks, "scheme": scheme, "iters": iters, "batch": batch, "mode": mode,
            "cpu": cpu_kind(), "threads": torch.get_num_threads(), "total_s": total,
            "per_block_s": {k: v / blocks for k, v in seconds.items()},
            "start_windows": [x.get("loss_start_windows") for x in b],
            "kept_start": [x.get("kept_start") for x in b], "loss_calib": [x["loss_calib"] for x in b]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "pycode-7m"])
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--scheme", default="W2A16G64")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", nargs="+", metavar="BATCHxITERS",
                   help="alternate these tunings (e.g. 8x50 4x100) instead of the two start's-loss modes")
    args = p.parse_args()
    if args.steps:
        try:
            shapes = [(int(b), int(i)) for b, i in (s.split("x") for s in args.steps)]
        except ValueError:  # not two numbers
            sys.exit(f"--steps wants BATCHxITERS, e.g. 8x50, got {args.steps}")
        modes = [(s, "early", b, i) for s, (b, i) in zip(args.steps, shapes)]
    else:
        modes = [(m, m, 8, args.iters) for m in ("early", "full")]
    rows = []
    for _ in range(args.rounds):
        for label, mode, batch, iters in modes:
            rows.append({**run(args.model, args.blocks, args.scheme, iters, mode, batch), "label": label})
            r = rows[-1]
            print(f"{label:5s} total {r['total_s']:.1f} s; per block: "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in r["per_block_s"].items())
                  + f"; start's loss over windows {r['start_windows']}", flush=True)
    if args.steps:
        best = {label: min(r["total_s"] for r in rows if r["label"] == label) for label, *_ in modes}
        first = next(iter(best.values()))
        print(f"{rows[0]['cpu']}, {rows[0]['threads']} threads; best totals: "
              + ", ".join(f"{k} {v:.1f} s ({v / first:.3f}x)" for k, v in best.items()))
        _save(rows, None)
        return
    early = [r for r in rows if r["mode"] == "early"]
    full = [r for r in rows if r["mode"] == "full"]
    same = all(a["kept_start"] == b["kept_start"] and a["loss_calib"] == b["loss_calib"] for a in early for b in full)
    print(f"{rows[0]['cpu']}, {rows[0]['threads']} threads; same weights both ways: {same}")
    print(f"best total: early {min(r['total_s'] for r in early):.1f} s, full {min(r['total_s'] for r in full):.1f} s "
          f"({min(r['total_s'] for r in early) / min(r['total_s'] for r in full):.3f}x)")
    _save(rows, same)


def _save(rows, same):
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "block_time.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "same_weights": same}) + "\n")


if __name__ == "__main__":
    main()
