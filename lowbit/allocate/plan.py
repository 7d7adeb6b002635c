"""A bit-allocation plan: per layer the chosen scheme and its scores, as a JSON file a user can
read and edit. make_plan scores the layers with a metric and solves the budget with a solver."""
from __future__ import annotations

import json
import os
import re
import time

import torch

from lowbit.version import __version__
from lowbit.allocate.cost import layer_bits
from lowbit.allocate.sensitivity import METRICS, base_option, tuned_weights
from lowbit.allocate.solvers import SOLVERS, Choice, Problem
from lowbit.errors import LowbitError
from lowbit.model import find_blocks, find_linears
from lowbit.qdq.act import check_mix
from lowbit.schemes import Scheme, get_scheme

# Layers that fused kernels (vLLM's QKV and gate-up projections) load as one: they share a scheme.
TIE_PATTERNS = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3")]


def block_layers(model) -> dict:
    blocks_name, blocks = find_blocks(model)
    return {f"{blocks_name}.{i}.{n}": lin for i, b in enumerate(blocks) for n, lin in find_linears(b).items()}


def tied_groups(names: list[str]) -> list[list[str]]:
    groups = []
    for pattern in TIE_PATTERNS:
        by_parent: dict = {}
        for n in names:
            parent, _, leaf = n.rpartition(".")
            if leaf in pattern:
                by_parent.setdefault(parent, []).append(n)
        groups += [g for g in by_parent.values() if len(g) > 1]
    return groups


def parse_options(options) -> dict[str, Scheme]:
    """"W2A16,W4A16" or a list of names / Schemes -> {name: Scheme}."""
    if isinstance(options, str):
        options = [o.strip() for o in options.split(",") if o.strip()]
    out = {}
    for o in options:
        s = o if isinstance(o, Scheme) else get_scheme(o)
        out[s.name] = s
    if len(out) < 1:
        raise LowbitError("give at least one option (e.g. W2A16,W4A16)")
    reason = check_mix(s.act for s in out.values())
    if reason:
        raise LowbitError(reason)
    return out


def make_plan(
    model,
    options,
    target_bits: float,
    windows: torch.Tensor,
    *,
    metric: str = "deltaloss",
    solver: str = "dp",
    tie: bool = True,
    fixed: dict[str, str] | None = None,
    min_bits: int | None = None,
    prescale: bool = False,
    scores: dict | None = None,
    tune_iters: int = 0,
) -> dict:
    """Score every block Linear for every option with `metric` (or take precomputed `scores`,
    {layer: {option: score}}) and pick one option per layer within target_bits on average.
    tune_iters > 0 scores the weights a short SignRound gives for each option, not rounded ones."""
    if metric not in METRICS:
        raise LowbitError(f"unknown metric {metric!r} (have: {', '.join(METRICS)})")
    if solver not in SOLVERS:
        raise LowbitError(f"unknown solver {solver!r} (have: {', '.join(SOLVERS)})")
    opts = parse_options(options)
    if min_bits is not None:
        opts = {k: s for k, s in opts.items() if s.bits >= min_bits}
        if not opts:
            raise LowbitError(f"no option has at least {min_bits} bits")
    fixed = {k: parse_options([v]).popitem()[0] for k, v in (fixed or {}).items()}
    for v in fixed.values():
        if v not in opts:
            raise LowbitError(f"fixed option {v} is not among the options ({', '.join(opts)})")
    layers = block_layers(model)
    n_weights = sum(lin.weight.numel() for lin in layers.values())
    t0 = time.perf_counter()
    _, blocks = find_blocks(model)
    if scores is None:
        # deltaloss_signed takes its gradient where every layer has the cheapest option: only
        # that one is worth a SignRound (the others' weights enter as rounded)
        base = base_option(opts, layers)
        tune = {base: opts[base]} if metric == "deltaloss_signed" else opts
        tuned = tuned_weights(model, tune, windows, tune_iters) if tune_iters > 0 else None
        scores = METRICS[metric](model, layers, opts, windows, blocks=blocks, prescale=prescale, tuned=tuned)
    t_metric = time.perf_counter() - t0
    choices = {
        n: [Choice(o, layer_bits(*lin.weight.shape, s), scores[n][o]) for o, s in opts.items()]
        for n, lin in layers.items()
    }
    problem = Problem(choices, int(target_bits * n_weights), tied_groups(list(layers)) if tie else [],
                      _expand_fixed(fixed, list(layers)), n_weights)
    t1 = time.perf_counter()
    picks = SOLVERS[solver](problem)
    t_solve = time.perf_counter() - t1
    return {
        "lowbit_version": __version__,
        "target_bits": target_bits,
        "achieved_bits": problem.cost(picks) / n_weights,
        "n_weights": n_weights,
        "metric": metric,
        "solver": solver,
        "prescale": prescale,
        "tune_iters": tune_iters,
        "options": {o: s.to_dict() for o, s in opts.items()},
        "tied": problem.tied,
        "fixed": fixed,
        "seconds": {"metric": t_metric, "solve": t_solve},
        "layers": {
            n: {"scheme": picks[n], "bits": layer_bits(*layers[n].weight.shape, opts[picks[n]]),
                "score": scores[n][picks[n]], "scores": scores[n]}
            for n in layers
        },
    }


def _expand_fixed(fixed: dict[str, str], names: list[str]) -> dict[str, str]:
    """Fixed entries are layer names or regexes."""
    out = {}
    for pattern, opt in fixed.items():
        hits = [n for n in names if n == pattern or re.fullmatch(pattern, n)]
        if not hits:
            raise LowbitError(f"fixed layer {pattern!r} matches no layer")
        out.update(dict.fromkeys(hits, opt))
    return out


def plan_schemes(plan: dict) -> dict[str, Scheme]:
    """{layer: Scheme} of a plan (dict as read from its file). A layer's "scheme" may be an option
    name of the plan, a preset name, or a dict of Scheme fields (for hand edits)."""
    try:
        options = {o: Scheme.from_dict(d) for o, d in plan.get("options", {}).items()}
        out = {}
        for name, entry in plan["layers"].items():
            s = entry["scheme"] if isinstance(entry, dict) else entry
            if isinstance(s, dict):
                out[name] = Scheme.from_dict(s)
            else:
                out[name] = options[s] if s in options else get_scheme(s)
    except (KeyError, TypeError) as e:
        raise LowbitError(f"malformed plan: missing or wrong {e}") from None
    reason = check_mix(s.act for s in out.values())
    if reason:
        raise LowbitError(f"plan: {reason}")
    return out


def write_plan(plan: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(plan, f, indent=2)


def read_plan(path: str) -> dict:
    try:
        with open(path) as f:
            plan = json.load(f)
    except OSError:
        raise LowbitError(f"plan file not found: {path}") from None
    except ValueError as e:
        raise LowbitError(f"plan {path} is not valid JSON: {e}") from None
    plan_schemes(plan)  # validate now, not halfway through quantizing
    return plan
