"""Bit allocation benchmark: uniform W2/W3/W4 against mixed plans at several average-bit budgets
(scales and zero points counted), for each sensitivity metric and for the heuristic users reach
for (extra bits to the first and last blocks), all quantized by the same SignRound settings.

    python bench/allocate.py                      # writes bench/results/allocate.md and .jsonl
    python bench/allocate.py --models stories260K --iters 50
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core import ASSETS, MODELS, SEQLEN, text_slice  # noqa: E402

import lowbit  # noqa: E402
from lowbit.allocate import layer_bits  # noqa: E402
from lowbit.allocate.plan import block_layers, make_plan, parse_options, plan_schemes  # noqa: E402
from lowbit.allocate.sensitivity import METRICS, tuned_weights  # noqa: E402
from lowbit.calib import make_windows, tokenize  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.model import find_blocks, load_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def first_last_plan(model, options: dict, target_bits: float) -> dict:
    """The usual heuristic: every layer at the cheapest option, then whole blocks raised one
    option at a time from the ends inwards (first, last, second, second to last...) while the
    budget allows."""
    layers = block_layers(model)
    prefix, blocks = find_blocks(model)
    block_of = {n: int(n[len(prefix) + 1 :].split(".")[0]) for n in layers}
    n_weights = sum(l.weight.numel() for l in layers.values())
    budget = target_bits * n_weights
    order = sorted(options, key=lambda o: layer_bits(64, 64, options[o]))
    level = dict.fromkeys(layers, 0)
    n_blocks = len(blocks)
    ends = [i for pair in zip(range(n_blocks), reversed(range(n_blocks))) for i in pair]
    ends = list(dict.fromkeys(ends))

    def cost(lv):
        return sum(layer_bits(*layers[n].weight.shape, options[order[lv[n]]]) for n in layers)

    for _ in range(len(order) - 1):
        for b in ends:
            trial = dict(level)
            for n in layers:
                if block_of[n] == b and trial[n] < len(order) - 1:
                    trial[n] += 1
            if cost(trial) <= budget:
                level = trial
    return {n: options[order[level[n]]] for n in layers}, cost(level) / n_weights


def avg_bits(model, schemes: dict) -> float:
    layers = block_layers(model)
    return sum(layer_bits(*l.weight.shape, schemes[n]) for n, l in layers.items()) / sum(
        l.weight.numel() for l in layers.values()
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--targets", nargs="+", type=float, default=[2.5, 2.75, 3.0, 3.5],
                   help="average bits; those below the cheapest plan (all W2) are skipped and said so")
    p.add_argument("--metrics", nargs="+", default=list(METRICS))
    p.add_argument("--iters", type=int, default=50, help="SignRound iterations for every row (default 50)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--metric-samples", type=int, default=16, help="calibration windows for the metrics")
    p.add_argument("--metric-prescale", action="store_true",
                   help="score the options as prescaled (activation-weighted range) rather than rounded")
    p.add_argument("--options", default=None,
                   help="comma-separated schemes a layer may take (default W2/W3/W4/W8 at the model's group size); "
                        "the uniform rows are the first options of 2, 3 and 4 bits")
    p.add_argument("--metric-tune-iters", type=int, default=0,
                   help="score the weights a SignRound of this many iterations gives per option (0: rounded)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "allocate"))
    args = p.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    torch.manual_seed(0)
    rows, skipped = [], []

    for m in args.models:
        folder, group, calib, evaluation, n_eval = MODELS[m]
        path = os.path.join(ASSETS, folder)
        _, tok = load_model(path)
        windows = make_windows(tokenize(tok, text_slice(calib)), args.nsamples, SEQLEN, seed=0)
        eval_tokens = tokenize(tok, text_slice(evaluation))
        options = parse_options(args.options.split(",") if args.options else
                                [f"W{b}A16G{group}" if group != 128 else f"W{b}A16" for b in (2, 3, 4, 8)])
        by_bits = {}
        for s in options.values():
            by_bits.setdefault(s.bits, s)  # the uniform rows: the first option of each width

        def run(label, metric, schemes, target, alloc_s):
            model, _ = load_model(path)
            t0 = time.perf_counter()
            lowbit.quantize(model, by_bits[2], lowbit.SignRound(iters=args.iters), windows,
                            overrides=schemes, progress=False)
            q_s = time.perf_counter() - t0
            ppl = perplexity(model, tokens=eval_tokens, seqlen=SEQLEN, max_windows=n_eval)["ppl"]
            row = {"model": m, "plan": label, "metric": metric, "target_bits": target,
                   "avg_bits": avg_bits(model, schemes), "ppl": ppl, "alloc_s": alloc_s, "quantize_s": q_s}
            rows.append(row)
            print(f"{m:12s} {label:9s} {metric:11s} target {target!s:5s} bits {row['avg_bits']:.3f} "
                  f"ppl {ppl:8.3f} alloc {alloc_s:5.1f}s quant {q_s:6.1f}s", file=sys.stderr, flush=True)

        model, _ = load_model(path)
        names = list(block_layers(model))
        for b in (2, 3, 4):
            run("uniform", f"W{b}", dict.fromkeys(names, by_bits[b]), None, 0.0)
        scores = {}
        for metric in args.metrics:
            model, _ = load_model(path)
            t0 = time.perf_counter()
            layers = block_layers(model)
            if args.metric_tune_iters and "tuned" not in scores:
                scores["tuned"] = tuned_weights(model, options, windows[: args.metric_samples], args.metric_tune_iters)
                scores["tuned_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
            scores[metric] = METRICS[metric](model, layers, options, windows[: args.metric_samples],
                                             blocks=find_blocks(model)[1], prescale=args.metric_prescale,
                                             tuned=scores.get("tuned"))
            scores[metric + "_s"] = time.perf_counter() - t0 + scores.get("tuned_s", 0.0)  # each pays for the tuning
        w3_bits = avg_bits(model, dict.fromkeys(names, by_bits[3]))
        w2_bits = avg_bits(model, dict.fromkeys(names, by_bits[2]))
        for target in sorted(set(args.targets) | {round(w3_bits, 3)}):
            if target < w2_bits:
                print(f"{m}: target {target} skipped, below the cheapest plan (all W2: {w2_bits:.3f} bits)",
                      file=sys.stderr)
                skipped.append(f"{m} {target}")
                continue
            schemes, _ = first_last_plan(model, options, target)
            run("mixed", "first_last", schemes, target, 0.0)
            for metric in args.metrics:
                plan = make_plan(model, options, target, windows, metric=metric, scores=scores[metric])
                run("mixed", metric, plan_schemes(plan), target, scores[metric + "_s"] + plan["seconds"]["solve"])

    with open(args.out + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. Every row: SignRound "
        f"iters {args.iters} (prescale at <= 3 bits), nsamples {args.nsamples}, seqlen {SEQLEN}; options W2/W3/W4/W8 "
        f"at the model's group size; q/k/v and gate/up tied; metrics on {args.metric_samples} windows"
        f"{' (options prescaled)' if args.metric_prescale else ' (options rounded to nearest)'}"
        f"{f', scored after SignRound({args.metric_tune_iters} iters) per option' if args.metric_tune_iters else ''}; solver dp. "
        "Average bits count the fp16 scale and the zero point of every group.",
        "",
        "| model | plan | metric | target bits | average bits | perplexity | allocation time (s) | quantize time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = "" if r["target_bits"] is None else f"{r['target_bits']:g}"
        lines.append(f"| {r['model']} | {r['plan']} | {r['metric']} | {t} | {r['avg_bits']:.3f} | {r['ppl']:.3f} | "
                     f"{r['alloc_s']:.1f} | {r['quantize_s']:.1f} |")
    if skipped:
        lines += ["", f"Skipped (below the cheapest plan once scales are counted): {', '.join(skipped)}."]
    table = "\n".join(lines) + "\n"
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
