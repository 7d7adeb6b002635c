"""Sensitivity metrics and plans on stories260K, and the plan flow through the CLI."""
import json
import subprocess
import sys

import pytest
import torch

from lowbit.allocate.plan import block_layers, make_plan, plan_schemes, read_plan, tied_groups, write_plan
from lowbit.allocate.sensitivity import METRICS, quantized_weight, tuned_weights
from lowbit.calib import make_windows, tokenize
from lowbit.errors import LowbitError
from lowbit.model import find_blocks, load_model
from lowbit.schemes import get_scheme

from conftest import STORIES, TINYSTORIES

OPTIONS = {n: get_scheme(n, group_size=32) for n in ("W2A16", "W4A16", "W8A16")}


@pytest.fixture(scope="module")
def windows(stories_text):
    _, tok = load_model(STORIES)
    return make_windows(tokenize(tok, stories_text[0]), 8, 256, seed=0)


@pytest.mark.parametrize("metric", list(METRICS))
def test_metric_finite_and_larger_for_fewer_bits(metric, windows):
    model, _ = load_model(STORIES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = block_layers(model)
    scores = METRICS[metric](model, layers, {o.name: o for o in OPTIONS.values()}, windows, blocks=find_blocks(model)[1])
    assert set(scores) == set(layers) and len(layers) == 35
    names = [o.name for o in OPTIONS.values()]  # W2, W4, W8 at group 32
    for n, s in scores.items():
        vals = [s[o] for o in names]
        assert all(torch.isfinite(torch.tensor(v)) and v >= 0 for v in vals), (n, s)
        assert min(vals) == 0 or metric != "deltaloss_signed", (n, s)  # each layer's best option scores 0
    # W2 above W8 on every layer; for the signed change of a swap on most: measured, two of the 35
    # layers of stories260K do lose a little at W8 (test_signed_deltaloss_follows_measured_swaps)
    above = sum(s[names[0]] > s[names[2]] for s in scores.values())
    assert above >= (0.9 if metric == "deltaloss_signed" else 1.0) * len(scores), scores
    ordered = sum(s[names[0]] > s[names[1]] > s[names[2]] for s in scores.values())
    if metric == "deltaloss_signed":  # from the W2 point, W4 and W8 differ by noise: only W2 > W4
        ordered = sum(s[names[0]] > s[names[1]] for s in scores.values())
    assert ordered >= 0.9 * len(scores)
    # the model is left as it was
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.grad is not None for p in model.parameters())


def test_plan_budget_ties_fixed_and_file(tmp_path, windows):
    model, _ = load_model(STORIES)
    fixed = {r"model\.layers\.0\.mlp\.down_proj": "W8A16G32"}
    plan = make_plan(model, list(OPTIONS.values()), 3.5, windows, metric="hessian", fixed=fixed)
    assert plan["achieved_bits"] <= 3.5
    assert plan["achieved_bits"] > 3.0  # the budget is used, not wasted
    chosen = {n: e["scheme"] for n, e in plan["layers"].items()}
    assert chosen["model.layers.0.mlp.down_proj"] == "W8A16G32"
    groups = tied_groups(list(chosen))
    assert len(groups) == 10  # q/k/v and gate/up in each of 5 blocks
    for g in groups:
        assert len({chosen[n] for n in g}) == 1
    assert len(set(chosen.values())) > 1  # really mixed
    path = tmp_path / "plan.json"
    write_plan(plan, path)
    again = read_plan(path)
    assert plan_schemes(again) == plan_schemes(plan)
    assert plan_schemes(again)["model.layers.0.mlp.down_proj"].bits == 8
    # hand edit with a dict scheme
    again["layers"]["model.layers.1.mlp.down_proj"]["scheme"] = {"bits": 3, "group_size": 64, "sym": False}
    assert plan_schemes(again)["model.layers.1.mlp.down_proj"].group_size == 64


def test_budget_too_low(windows):
    model, _ = load_model(STORIES)
    with pytest.raises(LowbitError, match="budget"):
        make_plan(model, list(OPTIONS.values()), 1.5, windows, metric="hessian")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)], capture_output=True, text=True)


def test_plan_picture(tmp_path):
    pytest.importorskip("matplotlib", reason="lowbit plan --png needs matplotlib (pip install -e '.[allocate]')")
    png = tmp_path / "plan.png"
    r = cli("plan", STORIES, "--dataset", TINYSTORIES, "--nsamples", 4, "--seqlen", 128, "--target-bits", 3.0,
            "--options", "W2A16G32,W4A16G32", "--metric", "hessian", "--out", tmp_path / "p.json", "--png", png)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


def test_plan_then_quantize_cli(tmp_path):
    plan_file = tmp_path / "plan.json"
    r = cli("plan", STORIES, "--dataset", TINYSTORIES, "--nsamples", 4, "--seqlen", 128, "--target-bits", 3.0,
            "--options", "W2A16G32,W4A16G32,W8A16G32", "--out", plan_file)
    assert r.returncode == 0, r.stderr
    plan = json.loads(plan_file.read_text())
    assert plan["achieved_bits"] <= 3.0 and plan["metric"] == "deltaloss"

    out = tmp_path / "q"
    r = cli("quantize", STORIES, "--plan", plan_file, "--dataset", TINYSTORIES, "--nsamples", 8, "--seqlen", 128,
            "--iters", 5, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "quantization.json").read_text())
    for n, layer in report["layers"].items():
        assert layer["bits"] == plan["options"][plan["layers"][n]["scheme"]]["bits"]
    assert report["plan"]["achieved_bits"] == plan["achieved_bits"]

    # one call: allocate and quantize
    out2 = tmp_path / "q2"
    r = cli("quantize", STORIES, "--target-bits", 3.0, "--options", "W2A16G32,W4A16G32,W8A16G32",
            "--metric", "hessian", "--dataset", TINYSTORIES, "--nsamples", 8, "--seqlen", 128, "--iters", 5,
            "--out", out2, "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((out2 / "quantization.json").read_text())
    assert report["plan"]["achieved_bits"] <= 3.0 and len({l["bits"] for l in report["layers"].values()}) > 1


def test_bad_plan(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"model.layers.99.mlp.down_proj": {"scheme": "W4A16"}}}))
    r = cli("quantize", STORIES, "--plan", bad, "--algorithm", "rtn", "--out", tmp_path / "q")
    assert r.returncode == 2 and "layers this model does not have" in r.stderr
    bad.write_text("{not json")
    r = cli("quantize", STORIES, "--plan", bad, "--algorithm", "rtn", "--out", tmp_path / "q")
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    assert not (tmp_path / "q").exists()


def test_tuned_scores(windows):
    # scores on the weights a short SignRound gives per option: other weights than rounding's,
    # still ordered by bits, and the model is left as it was
    model, _ = load_model(STORIES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = {o.name: o for o in OPTIONS.values()}
    tuned = tuned_weights(model, opts, windows[:4], iters=3)
    layers = block_layers(model)
    name = "model.layers.0.mlp.down_proj"
    rounded = quantized_weight(layers[name].weight.detach(), opts["W2A16G32"], None, False)
    assert not torch.equal(tuned["W2A16G32"][name], rounded)
    scores = METRICS["hessian"](model, layers, opts, windows[:4], blocks=find_blocks(model)[1], tuned=tuned)
    assert sum(s["W2A16G32"] > s["W8A16G32"] for s in scores.values()) == len(scores)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plan = make_plan(model, opts, 4.0, windows[:4], metric="hessian", tune_iters=2)
    assert plan["tune_iters"] == 2 and plan["achieved_bits"] <= 4.0


def test_signed_deltaloss_follows_measured_swaps(windows):
    """deltaloss_signed predicts what moving one layer from W2 to W8 does to the loss (every other
    layer at W2) better than DeltaLoss's |g * dW| does: its rank correlation with the measured
    change, over stories260K's 35 layers, is higher (printed with pytest -s)."""
    model, _ = load_model(STORIES)
    layers, blocks = block_layers(model), find_blocks(model)[1]
    opts = {o.name: o for o in (OPTIONS["W2A16"], OPTIONS["W8A16"])}
    low, high = opts
    original = {n: lin.weight.detach().clone() for n, lin in layers.items()}
    q = {o: {n: quantized_weight(w, s, None, False) for n, w in original.items()} for o, s in opts.items()}

    @torch.no_grad()
    def loss():
        logits = model(input_ids=windows, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()

    with torch.no_grad():
        for n, lin in layers.items():
            lin.weight.copy_(q[low][n])
        at_low, measured = loss(), []
        for n, lin in layers.items():
            lin.weight.copy_(q[high][n])
            measured.append(loss() - at_low)
            lin.weight.copy_(q[low][n])
        for n, lin in layers.items():
            lin.weight.copy_(original[n])

    def rank_corr(a):
        ranks = torch.stack([torch.tensor(x).argsort().argsort().float() for x in (a, measured)])
        return torch.corrcoef(ranks)[0, 1].item()

    corr = {}
    for metric in ("deltaloss", "deltaloss_signed"):
        s = METRICS[metric](model, layers, opts, windows, blocks=blocks)
        corr[metric] = rank_corr([s[n][high] - s[n][low] for n in layers])
    print("rank correlation with the measured W2 -> W8 swaps:", corr)
    assert corr["deltaloss_signed"] > corr["deltaloss"] + 0.05 and corr["deltaloss_signed"] > 0.8, corr


def test_signed_deltaloss_tunes_only_the_cheapest_option(monkeypatch, windows):
    import lowbit.allocate.plan as plan_module

    seen = []
    real = plan_module.tuned_weights
    monkeypatch.setattr(plan_module, "tuned_weights", lambda m, o, w, i: seen.append(sorted(o)) or real(m, o, w, i))
    model, _ = load_model(STORIES)
    plan = make_plan(model, list(OPTIONS.values()), 4.0, windows[:4], metric="deltaloss_signed", tune_iters=2)
    assert seen == [["W2A16G32"]] and plan["achieved_bits"] <= 4.0


def test_deltaloss_counts_quantized_inputs(windows):
    """With an option that quantizes inputs, DeltaLoss adds |dL/dA_q * (A - Q(A))|: MXFP4 (W4A4)
    scores above MXFP4A16 (the same weights, 16-bit inputs) and MXFP8 below both; the model is
    left as it was, hooks included."""
    model, _ = load_model(STORIES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = block_layers(model)
    options = {n: get_scheme(n) for n in ("MXFP4", "MXFP4A16", "MXFP8")}
    scores = METRICS["deltaloss"](model, layers, options, windows, blocks=find_blocks(model)[1])
    above = sum(s["MXFP4"] > s["MXFP4A16"] for s in scores.values())
    below = sum(s["MXFP8"] < s["MXFP4A16"] for s in scores.values())
    assert above >= 0.9 * len(scores) and below >= 0.9 * len(scores), scores
    assert all(not lin._forward_pre_hooks for lin in layers.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("options,message", [
    ("MXFP4,W4A16", "options mix 16-bit inputs with quantized ones"),
    ("MXFP4,NVFP4", "options mix activation types of different kinds"),
])
def test_options_of_incompatible_inputs_are_refused(options, message):
    from lowbit.allocate.plan import parse_options

    with pytest.raises(LowbitError, match=message):
        parse_options(options)
    assert set(parse_options("MXFP4,MXFP8")) == {"MXFP4", "MXFP8"}
