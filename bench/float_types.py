"""MXFP4, NVFP4 and MXFP8 (weights and inputs quantized, W4A4 / W8A8): round to nearest against
SignRound and its options, perplexity measured with the inputs quantized.

    python bench/float_types.py                                  # pycode-7m, every scheme and variant
    python bench/float_types.py --schemes MXFP4 --variants rtn,signround-drop
    python bench/float_types.py --models smollm2 --iters 50      # SmolLM2-135M (get_smollm2.py)
    python bench/float_types.py --schemes MXFP4 --variants rtn --mixed 4.5 --mixed-algorithms rtn
    python bench/float_types.py --variants autoround --ar-python /work/arvenv/bin/python

Mixed MXFP4/MXFP8 (--mixed 4.5): a plan at that average (scales counted: MXFP4 costs 4.25 bits a
weight, MXFP8 8.25) from DeltaLoss with its input term on 16 of the calibration windows, solved
exactly (dp), against the heuristic "8 bits at the first and last blocks" at the same budget (the
same solver with a score that only says those blocks matter); each quantized by RTN and SignRound.
"deltaloss" ties q/k/v and gate/up to one scheme (what fused kernels load), "deltaloss_untied" not,
"deltaloss_untied_tuned" scores each option on the weights of a 50-iteration SignRound instead of
rounded ones (`--mixed-plans` picks which). "recovered" is against pure MXFP4 by the same algorithm.

autoround: Intel's auto-round (its own venv, bench/README.md) on the same windows, fp32 tuning,
compile off, its scheme of the same name; its quantized model (its own input quantizers) is
evaluated by lowbit's perplexity on the same text.

Variants: rtn; signround (200 iterations, lowbit's defaults); signround-drop (the largest 0.1% of
squared output errors left out of the loss, drop=0.001); signround-prescale (the activation-
weighted scale search before tuning); signround-drop-prescale; signround-lr0.01 (twice the default
step at 200 iterations); signround-fixedrange (the range factors kept where they start, as MX
keeps them anyway); signround-blocktarget (SignRound target="block"); signround-mse (its
loss="mse", the plain mean squared error, SignRound's default before 2026-12-03; the default,
"relative", takes each token's error relative to its size); signround-fp32 / signround-bf16 (tuned
in float32 / under bf16 autocast whatever the CPU; the default autocasts where bf16 is fast).
Calibration: 128 windows of 256
tokens, seed 0 (pycode-7m: its calib.txt; SmolLM2: c4_validation_2k); evaluation: pycode-7m's
heldout.txt, 300 windows of 256 / SmolLM2: wikitext2 test, 40 windows of 256. "recovered" is the
share of the perplexity round to nearest loses against full precision that the variant wins back.
Rows go to bench/results/float_types.jsonl; the table of this run to bench/results/float_types.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from core import ASSETS, MODELS, SEQLEN, text_slice  # noqa: E402
from scale import cpu_kind  # noqa: E402

VARIANTS = {
    "rtn": None,
    "signround": {},
    "signround-drop": {"drop": 0.001},
    "signround-prescale": {"prescale": True},
    "signround-drop-prescale": {"drop": 0.001, "prescale": True},
    "signround-lr0.01": {"lr": 0.01},
    "signround-fixedrange": {"tune_minmax": False},
    "signround-blocktarget": {"target": "block"},  # the block's own error only (SignRound.target)
    "signround-mse": {"loss": "mse"},  # plain MSE; the default weighs each token's error by its size
    "signround-fp32": {"amp": False},  # tuned in float32 where the default would autocast to bf16
    "signround-bf16": {"amp": True},  # tuned under bf16 autocast wherever it runs
    "autoround": "autoround",
}


def model_setup(name: str):
    """(folder, calibration text, evaluation text, eval windows) of a benchmark model."""
    if name == "smollm2":
        folder = subprocess.run([sys.executable, os.path.join(ASSETS, "scripts", "get_smollm2.py")], check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1]
        from lowbit.calib import read_text

        calib = read_text(os.path.join(ASSETS, "text", "c4_validation_2k.parquet"))
        with open(os.path.join(ASSETS, "text", "wikitext2_test.txt")) as f:
            return folder, calib, f.read(), 40
    folder, _, calib, evaluation, windows = MODELS[name]
    return os.path.join(ASSETS, folder), text_slice(calib), text_slice(evaluation), windows


def run(model_name: str, scheme: str | None, variant: str, iters: int) -> dict:
    import torch

    import lowbit
    from lowbit.calib import make_windows, tokenize
    from lowbit.eval import perplexity
    from lowbit.allocate.plan import plan_schemes
    from lowbit.model import load_model

    torch.manual_seed(0)
    folder, calib, evaluation, windows = model_setup(model_name)
    model, tok = load_model(folder)
    row = {"model": model_name, "scheme": scheme or "fp32", "variant": variant if scheme else "-", "iters": iters}
    t0 = time.perf_counter()
    if scheme is not None and "@" in scheme:
        calib_windows = make_windows(tokenize(tok, calib), 128, SEQLEN, seed=0)
        algorithm, _, allocation = variant.partition("-")
        options, target = scheme.split("@")
        plan = mixed_plan(model, options.replace("/", ","), float(target), calib_windows[:16], allocation)
        algo = lowbit.RTN() if algorithm == "rtn" else lowbit.SignRound(iters=iters)
        r = lowbit.quantize(model, "MXFP4", algo, calib_windows, overrides=plan_schemes(plan), progress=False)
        row |= {"achieved_bits": plan["achieved_bits"], "at_8_bits": sorted(n for n, e in plan["layers"].items()
                                                                           if e["scheme"] != plan_first(plan))}
    elif scheme is not None:
        settings = VARIANTS[variant]
        calib_windows = make_windows(tokenize(tok, calib), 128, SEQLEN, seed=0)
        if settings == "autoround":
            row |= autoround(model, tok, scheme, calib_windows, iters)
        else:
            algo = lowbit.RTN() if settings is None else lowbit.SignRound(iters=iters, **settings)
            r = lowbit.quantize(model, scheme, algo, calib_windows, progress=False)
            row["kept_start"] = r.report["blocks_kept_start"]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["ppl"] = perplexity(model, tokens=tokenize(tok, evaluation), seqlen=SEQLEN, max_windows=windows)["ppl"]
    return row


def plan_first(plan) -> str:
    return next(iter(plan["options"]))


def mixed_plan(model, options: str, target: float, windows, allocation: str) -> dict:
    """A plan from DeltaLoss, or the first-and-last-blocks heuristic, at `target` average bits."""
    from lowbit.allocate.plan import block_layers, make_plan
    from lowbit.model import find_blocks

    if allocation.startswith("deltaloss"):  # deltaloss: q/k/v and gate/up tied (fused kernels); _untied: not;
        # _tuned: each option scored on the weights of a 50-iteration SignRound, not on rounded ones
        # _signed: the signed first-order change of each swap (deltaloss_signed), not |g * dW|
        metric = "deltaloss_signed" if "_signed" in allocation else "deltaloss"
        return make_plan(model, options, target, windows, metric=metric, solver="dp",
                         tie="_untied" not in allocation, tune_iters=50 if allocation.endswith("_tuned") else 0)
    blocks_name, blocks = find_blocks(model)
    ends = (f"{blocks_name}.0.", f"{blocks_name}.{len(blocks) - 1}.")
    low, high = options.split(",")
    scores = {n: {low: 1.0 if n.startswith(ends) else 0.0, high: 0.0} for n in block_layers(model)}
    return make_plan(model, options, target, windows, scores=scores, solver="dp")


def autoround(model, tok, scheme, windows, iters) -> dict:
    import auto_round
    from auto_round import AutoRound

    ar = AutoRound(model, tok, scheme=scheme, dataset=[w[None] for w in windows], iters=iters, nsamples=len(windows),
                   seqlen=SEQLEN, batch_size=8, seed=0, low_gpu_mem_usage=False, device_map="cpu", amp=False,
                   enable_torch_compile=False)
    qmodel, layer_config = ar.quantize()
    assert qmodel is model
    kept = sorted(n for n, c in layer_config.items() if isinstance(c, dict) and c.get("bits", 16) >= 16)
    return {"auto_round_version": auto_round.__version__, "ar_16bit_layers": kept}


def table(rows: list[dict]) -> str:
    out = ["| model | scheme | variant | ppl | vs fp | recovered | quantize (s) |", "|---|---|---|---|---|---|---|"]
    fp = {r["model"]: r["ppl"] for r in rows if r["scheme"] == "fp32"}
    ref = {(r["model"], r["scheme"], "rtn"): r["ppl"] for r in rows if r["variant"] == "rtn"}
    ref |= {(r["model"], "MXFP4", "signround"): r["ppl"] for r in rows if r["variant"] == "signround"
            and r["scheme"] == "MXFP4"}
    for r in rows:
        base = fp.get(r["model"])
        # against RTN of the same scheme; a mixed plan against pure MXFP4 by the same algorithm
        key = (r["model"], "MXFP4", r["variant"].split("-")[0]) if "@" in r["scheme"] else (r["model"], r["scheme"], "rtn")
        lost = ref[key] - base if base is not None and key in ref else None
        vs = f"{(r['ppl'] / base - 1) * 100:+.2f}%" if base else "-"
        rec = f"{(ref[key] - r['ppl']) / lost * 100:.0f}%" if lost and r["variant"] != "rtn" else "-"
        out.append(f"| {r['model']} | {r['scheme']} | {r['variant']} | {r['ppl']:.4f} | {vs} | {rec} | {r['seconds']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="pycode-7m")
    p.add_argument("--schemes", default="MXFP4,NVFP4,MXFP8")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--mixed", type=float, default=None, help="add mixed MXFP4/MXFP8 plans at this average")
    p.add_argument("--mixed-algorithms", default="rtn,signround", help="what quantizes the mixed plans")
    p.add_argument("--mixed-plans", default="deltaloss,deltaloss_untied,ends",
                   help="which mixed plans: deltaloss (q/k/v, gate/up tied), deltaloss_untied, "
                        "deltaloss_untied_tuned (options scored after 50 SignRound iterations), ends; "
                        "deltaloss_signed[_untied][_tuned]: the signed first-order change of each swap")
    p.add_argument("--ar-python", default=None, help="the python of auto-round's venv (variant autoround)")
    p.add_argument("--table", action="store_true", help="print the table of every run in the results file")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "SCHEME", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    plans = {f"deltaloss{m}{u}{t}" for m in ("", "_signed") for u in ("", "_untied") for t in ("", "_tuned")}
    unknown = set(args.mixed_plans.split(",")) - plans - {"ends"}
    if unknown:
        p.error(f"unknown mixed plan(s): {', '.join(sorted(unknown))}")
    if args.one:
        m, s, v = args.one
        print(json.dumps(run(m, None if s == "fp32" else s, v, args.iters)))
        return
    jobs = []
    if args.table:  # the latest row of each run in the results file, as one table
        latest = {}
        with open(os.path.join(HERE, "results", "float_types.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                latest[(r["model"], r["scheme"], r["variant"], r["iters"])] = r
        print(f"CPU: {next(iter(latest.values()))['cpu']}\n\n{table(list(latest.values()))}")
        return
    for m in args.models.split(","):
        jobs.append((m, "fp32", "-"))
        for s in filter(None, args.schemes.split(",")):
            # at 8 bits only round to nearest, plain SignRound and its loss
            jobs += [(m, s, v) for v in filter(None, args.variants.split(","))
                     if not (s.endswith("8") and v not in ("rtn", "signround", "signround-mse"))]
        if args.mixed:
            jobs += [(m, f"MXFP4/MXFP8@{args.mixed}", f"{a}-{how}") for a in args.mixed_algorithms.split(",")
                     for how in args.mixed_plans.split(",")]
    rows = []
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    for m, s, v in jobs:  # one process each: its own memory, nothing carried between runs
        python = args.ar_python if v == "autoround" else sys.executable
        if python is None:
            sys.exit("variant autoround needs --ar-python (auto-round's venv)")
        out = subprocess.run([python, __file__, "--one", m, s, v, "--iters", str(args.iters)],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{m} {s} {v} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        with open(os.path.join(HERE, "results", "float_types.jsonl"), "a") as f:
            f.write(json.dumps(rows[-1] | {"cpu": cpu_kind()}) + "\n")
    text = f"CPU: {cpu_kind()}; iters {args.iters}\n\n{table(rows)}\n"
    with open(os.path.join(HERE, "results", "float_types.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
