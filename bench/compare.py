"""Side by side: lowbit's SignRound against Intel's auto-round (its SignRound), on CPU, with the same
settings and the SAME calibration token windows; perplexity by lowbit's evaluator for both.

Needs a separate venv with auto-round (see bench/README.md); this script installs nothing.

    /work/arvenv/bin/python bench/compare.py                     # every setting (long)
    /work/arvenv/bin/python bench/compare.py --quick             # iters 5, nsamples 16: a smoke test
    /work/arvenv/bin/python bench/compare.py --only stories260K-W2G32-i200 pycode-7m-W4G128-i200
    /work/arvenv/bin/python bench/compare.py --only W2G32 --tools autoround lowbit
    /work/arvenv/bin/python bench/compare.py --only W4G128-i200 --seeds 0 1 2   # spread over seeds
    /work/arvenv/bin/python bench/compare.py --only smollm2-W4G128 --light-vs-default   # ~1 h

Settings: stories260K W4G32, W2G32; pycode-7m W4G128, W3G128, W2G128; each at iters 200 (auto-round's
default) and 50 (its light recipe); nsamples 128, seqlen 256, batch 8, seed 0, symmetric. lowbit runs
its preset of the same name and windows seen: at 200 its default (200 steps of 8 windows), at 50 its
light preset (100 steps of 4 windows; 50 steps of 8 before 2026-12-04: tool lowbit-b8). SmolLM2-135M W4G128
and W2G64 (W4A16 and W2A16G64) only when `--only` names them: its calibration text is c4_validation_2k,
its evaluation 40 windows of wikitext2 test (as bench/float_types.py), and each auto-round run of it
takes most of an hour on 2 cores. At 50 iterations
auto-round runs its light recipe's learning rate (5e-3, read from auto_round.cli.main.RECIPES), as
`auto-round --light` would; lowbit its own defaults (SignRound.layer_lr). Tools per setting:

    fp32               the original model (once per model)
    autoround          auto-round, fp32 tuning (amp off), torch.compile off, low_gpu_mem_usage off
    autoround-default  auto-round with its own CPU defaults (amp on = bf16 tuning); not run unless asked
    lowbit             lowbit SignRound, its defaults (prescale on at <= 3 bits)
    lowbit-noprescale  lowbit with prescale off (like-with-like with auto-round); only at <= 3 bits
    lowbit-fp32        lowbit tuning in float32 (amp=False) where it would use bf16; not run unless asked
    lowbit-keepbest    lowbit keeping each block's parameters of the lowest minibatch loss (keep="best",
                       auto-round's rule) instead of the last ones; not run unless asked
    lowbit-relloss     lowbit with each token's squared error relative to its targets' mean square
                       (SignRound loss="relative", lowbit's default since 2026-12-03); not run unless asked
    lowbit-mse         lowbit with plain mean squared error (loss="mse", auto-round's loss and lowbit's
                       default before); not run unless asked
    lowbit-lr1         lowbit with learning rate 1 / iters for every layer (auto-round's default; lowbit's
                       default before it capped it at >= 3 bits); not run unless asked
    lowbit-lrcap       lowbit with that cap, min(1 / iters, 1 / sqrt(200 iters)), at 2 bits too; not run
                       unless asked
    lowbit-b8          lowbit at 8 windows a step and the setting's steps (the light preset before
                       2026-12-04 at 50); not run unless asked
    lowbit-b4          lowbit at 4 windows a step and the setting's steps (half the work); not run unless asked
    lowbit-b4x2        lowbit at 4 windows a step and twice the setting's steps (the same windows seen in
                       smaller steps, lr 1 / steps); not run unless asked. Rows record the batch and steps run.
    lowbit-arlayers    lowbit restricted to the Linear layers auto-round quantizes (auto-round keeps
                       int layers whose out or in features do not divide by 32 in 16 bits); only
                       where that set differs from lowbit's

The calibration windows are built once (lowbit.calib) in this process and handed to every run; each
run is its own subprocess, so its peak RSS (ru_maxrss) is its own. Rows are appended to
bench/results/compare.jsonl; the markdown table of this invocation is printed (and written to
bench/results/compare.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from core import SEQLEN  # noqa: E402
from float_types import model_setup  # noqa: E402  (core.py's models, text and windows, and SmolLM2's)

BATCH = 8
SEED = 0
# (model, bits, group size)
SCHEMES = [("stories260K", 4, 32), ("stories260K", 2, 32), ("pycode-7m", 4, 128), ("pycode-7m", 3, 128),
           ("pycode-7m", 2, 128)]
ON_REQUEST = [("smollm2", 4, 128), ("smollm2", 2, 64)]  # run only when --only names them
LOGS = os.path.join(tempfile.gettempdir(), "lowbit-compare-logs")  # each run's stderr (auto-round's log)
TOOLS = ["autoround", "lowbit", "lowbit-noprescale", "lowbit-arlayers"]
ALL_TOOLS = TOOLS + ["autoround-default", "lowbit-fp32", "lowbit-keepbest", "lowbit-relloss", "lowbit-mse", "lowbit-lr1", "lowbit-lrcap",
                     "lowbit-b8", "lowbit-b4", "lowbit-b4x2"]


ITERS = [200, 50]  # auto-round's default and its light recipe (at batch 8)


def lowbit_shape(tool: str, iters: int) -> tuple[int, int]:
    """(steps, windows a step) of a lowbit run at a setting of `iters` auto-round steps of BATCH:
    lowbit's preset that sees the same windows (default at 200, light at 50), else iters x BATCH."""
    from lowbit.pipeline import PRESETS

    if tool == "lowbit-b8":
        return iters, BATCH
    if tool == "lowbit-b4":
        return iters, BATCH // 2
    if tool == "lowbit-b4x2":
        return 2 * iters, BATCH // 2
    for algo, _ in PRESETS.values():
        batch = algo.get("batch_size", BATCH)
        if algo["iters"] * batch == iters * BATCH and iters in ITERS:
            return algo["iters"], batch
    return iters, BATCH


def setting_name(model: str, bits: int, group: int, iters: int) -> str:
    return f"{model}-W{bits}G{group}-i{iters}"


def ar_skips(shape) -> bool:
    """auto-round (int weights, 16-bit activations) leaves a Linear in 16 bits when either dimension
    does not divide by 32 (compressors/layer_config_resolver.py)."""
    return bool(shape[0] % 32 or shape[1] % 32)


# --------------------------------------------------------------------------- one run (child process)
def rss_mb() -> float:
    """Peak resident memory of this process (MB). VmHWM, not ru_maxrss: on Linux ru_maxrss survives
    execve, so a child would report its parent's peak (the driver, with torch and a model loaded)
    whenever that is larger."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(tool: str, model_name: str, bits: int, group: int, iters: int, nsamples: int, windows_file: str,
            seed: int) -> dict:
    t_start = time.perf_counter()
    import torch

    from lowbit.calib import calibration_windows, tokenize, windows_hash
    from lowbit.eval import perplexity
    from lowbit.model import load_model, weight_params

    torch.manual_seed(seed)
    folder, _, evaluation, eval_windows = model_setup(model_name)
    model, tok = load_model(folder)
    before = {n: p.detach().clone() for n, p in weight_params(model).items()}
    row = {"setting": setting_name(model_name, bits, group, iters) if tool != "fp32" else f"{model_name}-fp32",
           "model": model_name, "tool": tool, "bits": bits, "group_size": group, "sym": True,
           "iters": iters, "nsamples": nsamples, "seqlen": SEQLEN, "batch_size": BATCH, "seed": seed,
           "threads": torch.get_num_threads()}
    quant_s = 0.0
    if tool != "fp32":
        windows = calibration_windows(tok, torch.load(windows_file, weights_only=True), nsamples, SEQLEN, SEED)
        assert windows.shape == (nsamples, SEQLEN), windows.shape
        row["windows_sha256"] = windows_hash(windows)
        if tool.startswith("autoround"):
            quant_s, extra = _autoround(model, tok, windows, bits, group, iters, nsamples, seed, tool == "autoround-default")
        else:
            quant_s, extra = _lowbit(model, tok, windows, bits, group, iters, nsamples, seed, tool)
        row.update(extra)
        row["iters"], row["batch_size"] = extra.get("iters_run", iters), extra.get("batch_run", BATCH)
    row["peak_rss_quant_mb"] = rss_mb()
    changed = {n for n, w in before.items() if not torch.equal(w, weight_params(model)[n].detach().float())}
    row["unquantized"] = sorted(set(before) - changed)
    model.float()
    ev = perplexity(model, tokens=tokenize(tok, evaluation), seqlen=SEQLEN, max_windows=eval_windows)
    row.update(ppl=ev["ppl"], eval_windows=ev["windows"], quant_s=quant_s,
               total_s=time.perf_counter() - t_start, peak_rss_mb=rss_mb())
    return row


def _lowbit(model, tok, windows, bits, group, iters, nsamples, seed, tool):
    import lowbit
    import lowbit.pipeline
    from lowbit.host import tuned_process

    if tool == "lowbit-arlayers":  # only in this process: the layers auto-round would quantize
        orig = lowbit.pipeline.find_linears
        lowbit.pipeline.find_linears = lambda b: {n: m for n, m in orig(b).items() if not ar_skips(m.weight.shape)}
    # one learning rate for every layer: lowbit's default for 2 bits (1 / iters, auto-round's
    # default), or its default for 3 bits and over (the cap)
    iters, batch = lowbit_shape(tool, iters)
    default = lowbit.SignRound(iters=iters)
    lr = {"lowbit-lr1": default.layer_lr(2), "lowbit-lrcap": default.layer_lr(3)}.get(tool)
    algo = lowbit.SignRound(iters=iters, batch_size=batch, prescale=False if tool == "lowbit-noprescale" else None,
                            amp=False if tool == "lowbit-fp32" else None,
                            keep="best" if tool == "lowbit-keepbest" else "last", lr=lr,
                            loss={"lowbit-relloss": "relative", "lowbit-mse": "mse"}.get(tool, default.loss))
    t0 = time.perf_counter()
    with tuned_process():  # the process settings the lowbit command runs with
        r = lowbit.quantize(model, lowbit.Scheme(bits, group, sym=True), algo, windows, tokenizer=tok,
                            nsamples=nsamples, seqlen=SEQLEN, seed=seed, progress=False)
    quant_s = time.perf_counter() - t0
    blocks = r.report["blocks"]
    return quant_s, {
        "prescale": algo.uses_prescale(bits),
        "lr": algo.layer_lr(bits),
        "lowbit_unquantized": r.report["unquantized"],
        "block_s": [round(b["seconds"], 3) for b in blocks],
        "ms_per_iter": [round(b["seconds_per_iter"] * 1000, 2) for b in blocks],
        "loss": [[b["loss_first"], b["loss_best"], b["loss_last"]] for b in blocks],
        "loss_calib": [b["loss_calib"] for b in blocks],
        "capture_s": r.report["calibration"]["capture_seconds"],
        "iters_run": iters, "batch_run": batch,
    }


def _autoround_recipe_lr(iters: int) -> float | None:
    """The learning rate of auto-round's own CLI recipe with these iterations: its light recipe (50
    iterations) sets lr 5e-3; the others leave it to auto-round's default, 1 / iters."""
    from auto_round.cli.main import RECIPES

    lrs = {r["iters"]: r.get("lr") for r in RECIPES.values() if r.get("iters")}
    return lrs.get(iters)


def _autoround(model, tok, windows, bits, group, iters, nsamples, seed, defaults):
    import torch

    import auto_round
    import auto_round.calib_dataset
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.quantizer import SignRoundQuantizer

    class Recorded(list):
        """The windows as auto-round's `dataset` (a list of [1, seqlen] LongTensors); records
        what auto-round actually takes from it."""

        taken: list = []

        def __iter__(self):
            for x in list.__iter__(self):
                Recorded.taken.append(x)
                yield x

    def no_dataloader(*a, **k):  # a list must not fall back to auto-round's own (online) dataset
        raise RuntimeError("auto-round tried to build its own calibration dataloader")

    auto_round.calib_dataset.get_dataloader = no_dataloader
    block_s, seen = [], {}
    orig_qb = SignRoundQuantizer.quantize_block

    def timed_qb(self, *a, **k):
        if not seen:  # the settings auto-round tunes with, as resolved
            seen.update(lr=float(self.lr), minmax_lr=float(self.minmax_lr),
                        gradient_accumulate_steps=self.gradient_accumulate_steps,
                        enable_minmax_tuning=self.enable_minmax_tuning, not_use_best_mse=self.not_use_best_mse,
                        dynamic_max_gap=self.dynamic_max_gap, enable_quanted_input=self.enable_quanted_input,
                        momentum=self.momentum, optimizer=getattr(self.optimizer, "__name__", str(self.optimizer)),
                        batch_size=self.calibration_context.batch_size)
        t0 = time.perf_counter()
        out = orig_qb(self, *a, **k)
        block_s.append(round(time.perf_counter() - t0, 3))
        return out

    SignRoundQuantizer.quantize_block = timed_qb
    import gc

    gc_s, gc_collect = [0.0, 0], gc.collect

    def timed_gc(*a, **k):  # auto-round clears memory (gc.collect) several times per block
        t = time.perf_counter()
        try:
            return gc_collect(*a, **k)
        finally:
            gc_s[0] += time.perf_counter() - t
            gc_s[1] += 1

    gc.collect = timed_gc
    kw = {} if defaults else {"amp": False, "enable_torch_compile": False}
    kw["lr"] = _autoround_recipe_lr(iters)
    t0 = time.perf_counter()
    ar = AutoRound(model, tok, bits=bits, group_size=group, sym=True, dataset=Recorded(w[None] for w in windows),
                   iters=iters, nsamples=nsamples, seqlen=SEQLEN, batch_size=BATCH, seed=seed,
                   low_gpu_mem_usage=False, device_map="cpu", **kw)
    t1 = time.perf_counter()
    qmodel, layer_config = ar.quantize()
    quant_s = time.perf_counter() - t1
    assert qmodel is model, "auto-round returned another model object"
    taken = torch.cat(Recorded.taken) if Recorded.taken else torch.empty(0, SEQLEN, dtype=torch.long)
    used_ours = taken.shape == windows.shape and torch.equal(taken, windows)
    if not used_ours:
        raise RuntimeError(f"auto-round did not take exactly our windows: took {tuple(taken.shape)}")
    return quant_s, {
        "auto_round_version": auto_round.__version__,
        "ctor_s": t1 - t0,
        "used_our_windows": used_ours,
        "amp": bool(getattr(ar.model_context, "amp", None)) if hasattr(ar, "model_context") else None,
        "amp_dtype": str(getattr(getattr(ar, "model_context", None), "amp_dtype", "")),
        "tuned_dtype": str(model.dtype),
        "torch_compile": bool(getattr(ar, "enable_torch_compile", None)),
        "ar_settings": seen,
        "gc_collect_s": gc_s[0], "gc_collect_calls": gc_s[1],
        "ar_16bit_layers": sorted(n for n, c in layer_config.items() if isinstance(c, dict) and c.get("bits", 16) >= 16),
        "block_s": block_s,
        "ms_per_iter": [round(s * 1000 / iters, 2) for s in block_s] if iters else [],
    }


# --------------------------------------------------------------------------- driver
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="iters 5, nsamples 16 (smoke test)")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only settings whose name (e.g. stories260K-W2G32-i200) contains one of these")
    p.add_argument("--tools", nargs="+", default=TOOLS, choices=ALL_TOOLS)
    p.add_argument("--no-fp", action="store_true", help="skip the fp32 rows")
    p.add_argument("--light-vs-default", action="store_true",
                   help="per setting (its -iN ignored) only auto-round's default run (its CPU defaults, the default "
                        "preset's iterations) and lowbit's light preset, and the ratio of their times")
    p.add_argument("--seeds", nargs="+", type=int, default=[SEED],
                   help="tuning seeds (minibatch order; the windows stay the same): each run once per seed, "
                        "and a summary of the spread")
    p.add_argument("--out", default=os.path.join(HERE, "results", "compare"))
    p.add_argument("--summary", nargs="*", metavar="RUN_ID",
                   help="print the summary table (means over seeds, time ratios per run) of runs already in "
                        "OUT.jsonl, pooled (default: the latest run) and exit")
    p.add_argument("--one", nargs=8, metavar=("TOOL", "MODEL", "BITS", "GROUP", "ITERS", "NSAMPLES", "WINDOWS", "SEED"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.summary is not None:
        if not os.path.isfile(args.out + ".jsonl"):
            sys.exit(f"no results at {args.out}.jsonl: run compare.py first")
        with open(args.out + ".jsonl") as f:
            rows = [json.loads(line) for line in f]
        run_ids = args.summary or ([rows[-1]["run_id"]] if rows else [])
        missing = [i for i in run_ids if not any(r["run_id"] == i for r in rows)]
        if missing or not run_ids:
            sys.exit(f"no run {', '.join(missing) or '(none)'} in {args.out}.jsonl")
        rows = [r for r in rows if r["run_id"] in run_ids]
        print(summary(rows))
        return
    if args.one:
        tool, m, b, g, it, ns, wf, seed = args.one
        print(json.dumps(run_one(tool, m, int(b), int(g), int(it), int(ns), wf, int(seed))))
        return

    try:
        import auto_round
    except ImportError:
        sys.exit("auto_round is not importable from this Python; set up the venv as in bench/README.md")
    import torch
    import transformers

    from lowbit.calib import calibration_windows, make_windows, tokenize
    from lowbit.model import load_model

    iters_list = [5] if args.quick else ITERS
    nsamples = 16 if args.quick else 128
    settings = [(m, b, g, it) for m, b, g in SCHEMES + (ON_REQUEST if args.only else []) for it in iters_list]
    if args.light_vs_default:  # one entry per scheme; the iterations go with the tool below
        settings = [(m, b, g, 0) for m, b, g in dict.fromkeys(s[:3] for s in settings)]
        args.tools = ["autoround-default", "lowbit"]
    if args.only:
        settings = [s for s in settings if any(o in setting_name(*s).removesuffix("-i0") for o in args.only)]
    if not settings:
        sys.exit("no setting matches --only")
    versions = {"auto_round": auto_round.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count()}
    print(f"versions: {versions}", file=sys.stderr)

    tmp = tempfile.mkdtemp(prefix="lowbit-compare-")
    windows_files = {}
    for m in dict.fromkeys(s[0] for s in settings):  # the windows, once per model
        folder, calib, _, _ = model_setup(m)
        _, tok = load_model(folder)
        w = calibration_windows(tok, make_windows(tokenize(tok, calib), nsamples, SEQLEN, seed=SEED),
                                nsamples, SEQLEN, SEED)
        windows_files[m] = os.path.join(tmp, f"{m}.pt")
        torch.save(w, windows_files[m])

    runs = [] if args.no_fp else [("fp32", m, 0, 0, 0, SEED) for m in windows_files]
    for m, b, g, it in settings:
        for seed in args.seeds:
            for tool in args.tools:
                if tool == "lowbit-noprescale" and b > 3:
                    continue  # lowbit's default is already prescale off above 3 bits
                if tool == "lowbit-arlayers" and not _ar_differs(m):
                    continue
                if args.light_vs_default:
                    it = iters_list[0 if tool == "autoround-default" else -1]
                runs.append((tool, m, b, g, it, seed))

    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = []
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for tool, m, b, g, it, seed in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", tool, m, str(b), str(g), str(it), str(nsamples),
               windows_files[m], str(seed)]
        env = dict(os.environ, TQDM_DISABLE="1")
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"run failed: {' '.join(cmd)}\n{out.stderr[-4000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(run_id=run_id, quick=args.quick, process_s=time.perf_counter() - t0, versions=versions)
        os.makedirs(LOGS, exist_ok=True)
        with open(os.path.join(LOGS, f"{r['setting']}-{tool}-s{seed}.log"), "w") as f:
            f.write(out.stderr)
        if tool.startswith("autoround"):
            r["log_tail"] = [l for l in out.stderr.splitlines() if "tuning time" in l or "Summary" in l or "lr" in l][-6:]
        rows.append(r)
        with open(args.out + ".jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{r['setting']:26s} {tool:18s} seed {seed} ppl {r['ppl']:9.3f}  quant {r['quant_s']:7.1f}s  "
              f"total {r['total_s']:6.1f}s  {r['peak_rss_mb']:6.0f} MB", file=sys.stderr, flush=True)
    hashes = {}
    for r in rows:
        if "windows_sha256" in r:
            hashes.setdefault(r["model"], set()).add(r["windows_sha256"])
    assert all(len(h) == 1 for h in hashes.values()), "runs of one model saw different windows"
    table = markdown(rows, versions, nsamples, args.quick)
    if args.light_vs_default:
        table += light_vs_default(rows)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table)


def _ar_differs(model_name: str) -> bool:
    import json as _json

    folder = model_setup(model_name)[0]
    with open(os.path.join(folder, "config.json")) as f:
        c = _json.load(f)
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    dims = [c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * hd, c["num_attention_heads"] * hd]
    return any(d % 32 for d in dims)


def short_layers(names: list[str]) -> str:
    """model.layers.0.mlp.up_proj, model.layers.1.mlp.up_proj... -> model.layers.[0-4].mlp.up_proj"""
    import re

    groups: dict[str, list[int]] = {}
    for n in names:
        m = re.match(r"(.*?\.layers\.)(\d+)(\..*)", n)
        if m:
            groups.setdefault(m.group(1) + "*" + m.group(3), []).append(int(m.group(2)))
        else:
            groups[n] = []
    out = []
    for k, idx in groups.items():
        if idx:
            idx = sorted(idx)
            rng = f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 else ",".join(map(str, idx))
            k = k.replace("*", f"[{rng}]")
        out.append(k)
    return ", ".join(out)


def markdown(rows, versions, nsamples, quick) -> str:
    """One row per run; the time columns divide by auto-round's time on the same setting and seed
    (fp32 tuning, and its CPU defaults), where that run is in the table. With several seeds, a
    second table gives each (setting, tool) its mean and range."""
    ar = {(r["setting"], r["seed"], r["tool"]): r["quant_s"] for r in rows if r["tool"].startswith("autoround")}

    def ratio(r, tool):
        t = ar.get((r["setting"], r["seed"], tool))
        return f"{r['quant_s'] / t:.2f}" if r["tool"] != "fp32" and t else ""

    lines = [
        f"Machine: {platform.machine()}, {versions['cores']} cores, Python {versions['python']}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}, auto-round {versions['auto_round']}; nsamples {nsamples}, "
        f"seqlen {SEQLEN}, batch {BATCH}, windows of seed {SEED}, symmetric{' (QUICK: not comparable)' if quick else ''}.",
        "",
        "| setting | tool | seed | ppl | quant wall (s) | total (s) | peak RSS (MB) | unquantized layers "
        "| time / autoround | time / autoround-default |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['tool']} | {r['seed']} | {r['ppl']:.3f} | {r['quant_s']:.1f} | {r['total_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {'(all)' if r['tool'] == 'fp32' else short_layers(r['unquantized']) or '-'} | "
            f"{ratio(r, 'autoround')} | {ratio(r, 'autoround-default')} |"
        )
    if len({r["seed"] for r in rows if r["tool"] != "fp32"}) > 1:
        lines += ["", "| setting | tool | seeds | ppl mean | ppl min-max | quant wall mean (s) |", "|---|---|---|---|---|---|"]
        groups: dict = {}
        for r in rows:
            if r["tool"] != "fp32":
                groups.setdefault((r["setting"], r["tool"]), []).append(r)
        for (setting, tool), rs in groups.items():
            ppl = [r["ppl"] for r in rs]
            lines.append(f"| {setting} | {tool} | {len(rs)} | {sum(ppl) / len(ppl):.3f} | {min(ppl):.3f}-{max(ppl):.3f} | "
                         f"{sum(r['quant_s'] for r in rs) / len(rs):.1f} |")
    return "\n".join(lines) + "\n"


def light_vs_default(rows) -> str:
    """lowbit light against auto-round's default, per scheme and seed: perplexity and time."""
    ar = {(r["model"], r["bits"], r["group_size"], r["seed"]): r for r in rows if r["tool"] == "autoround-default"}
    lines = ["", "| scheme | seed | auto-round default: iters, ppl, quant s | lowbit light: iters, ppl, quant s "
                 "| time ratio |", "|---|---|---|---|---|"]
    for r in rows:
        a = ar.get((r["model"], r["bits"], r["group_size"], r["seed"]))
        if r["tool"] == "lowbit" and a:
            lines.append(f"| {r['model']}-W{r['bits']}G{r['group_size']} | {r['seed']} | {a['iters']}, {a['ppl']:.4f}, "
                         f"{a['quant_s']:.1f} | {r['iters']}, {r['ppl']:.4f}, {r['quant_s']:.1f} | "
                         f"{r['quant_s'] / a['quant_s']:.2f} |")
    return "\n".join(lines) + "\n"


def summary(rows) -> str:
    """Per (setting, tool), over the runs given (seeds, and invocations): perplexity mean and range
    (4 decimals: the tools differ by a few thousandths at 4 bits), quantization time, its ratio to
    auto-round's default runs of the setting (by the means, and per run against the run of the same
    invocation and seed), peak RSS, and the block Linears left in 16 bits."""
    ar = {(r["run_id"], r["setting"], r["seed"]): r["quant_s"] for r in rows if r["tool"] == "autoround-default"}
    groups: dict = {}
    for r in rows:
        if r["tool"] != "fp32":
            groups.setdefault((r["setting"], r["tool"]), []).append(r)
    lines = [f"runs {', '.join(sorted({r['run_id'] for r in rows}))}; versions {rows[0]['versions']}", "",
             "| setting | tool | runs | ppl mean | ppl min-max | quant wall mean (s) | / autoround-default (means; per run) "
             "| peak RSS (MB) | block Linears left in 16 bits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (setting, tool), rs in groups.items():
        ppl = [r["ppl"] for r in rs]
        t = sum(r["quant_s"] for r in rs) / len(rs)
        per_seed = [r["quant_s"] / ar[key] for r in rs if (key := (r["run_id"], setting, r["seed"])) in ar]
        ar_mean = [v for (_, s_, _), v in ar.items() if s_ == setting]
        ratio = (f"{t / (sum(ar_mean) / len(ar_mean)):.2f}; {min(per_seed):.2f}-{max(per_seed):.2f}"
                 if per_seed and tool != "autoround-default" else "")
        rss = [r["peak_rss_mb"] for r in rs]
        # auto-round casts its model to bf16, so its own list says which layers it kept in 16 bits
        block_16 = [n for n in rs[0].get("ar_16bit_layers", rs[0]["unquantized"]) if ".layers." in n]
        lines.append(f"| {setting} | {tool} | {len(rs)} | {sum(ppl) / len(ppl):.4f} | {min(ppl):.4f}-{max(ppl):.4f} | "
                     f"{t:.1f} | {ratio} | {min(rss):.0f}-{max(rss):.0f} | {short_layers(block_16) or 'none'} |")
    return "\n".join(lines + _keep_summary(rows)) + "\n"


def _keep_summary(rows) -> list[str]:
    """lowbit's two keep rules, from the runs where both ran with the same setting and seed."""
    runs = {(r["run_id"], r["setting"], r["seed"], r["tool"]): r for r in rows}
    pairs = [(r, runs[key]) for r in rows
             if r["tool"] == "lowbit" and (key := (r["run_id"], r["setting"], r["seed"], "lowbit-keepbest")) in runs]
    if not pairs:
        return []
    rel = sorted(a / b - 1 for last, best in pairs for a, b in zip(last["loss_calib"], best["loss_calib"])
                 if a is not None and b is not None)
    low = sorted(b / m for r in rows if r["tool"].startswith("lowbit") for _, b, m in r.get("loss", []) if m)
    return ["", f"keep last vs best, loss on all calibration windows (loss_calib): lower in "
                f"{sum(x < 0 for x in rel)} of {len(rel)} blocks, median {100 * rel[len(rel) // 2]:+.1f}%",
            f"lowest minibatch loss / mean loss of the last pass over the windows: median "
            f"{low[len(low) // 2]:.3f} ({low[0]:.3f}-{low[-1]:.3f}, {len(low)} blocks of lowbit runs)"]


if __name__ == "__main__":
    main()
