"""Quality on a real model: stories260K (Llama, MLP width 172 = partial groups everywhere)."""
from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.algorithms import BlockData
from lowbit.calib import make_windows, tokenize
from lowbit.eval import perplexity
from lowbit.model import capture_block_inputs, find_blocks, find_linears, load_model, run_block

from conftest import STORIES


@pytest.fixture(scope="module")
def data(stories_text):
    calib, evaluation = stories_text
    _, tok = load_model(STORIES)
    windows = make_windows(tokenize(tok, calib), 128, 256, seed=0)
    eval_tokens = tokenize(tok, evaluation)
    return windows, eval_tokens


def ppl(model, eval_tokens):
    return perplexity(model, tokens=eval_tokens, seqlen=256, max_windows=200)["ppl"]


@pytest.fixture(scope="module")
def original_ppl(data):
    model, _ = load_model(STORIES)
    return ppl(model, data[1])


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4])
def test_signround_beats_rtn(bits, data, original_ppl):
    windows, eval_tokens = data
    scheme = lowbit.Scheme(bits, 32)
    results = {}
    for algo in (lowbit.RTN(), lowbit.SignRound(iters=200)):
        model, _ = load_model(STORIES)
        r = lowbit.quantize(model, scheme, algo, windows, progress=False)
        # Every Linear in every block is quantized; only the embedding / tied head are left.
        n_linear = sum(len(find_linears(b)) for b in find_blocks(model)[1])
        assert len(r.layers) == n_linear == 35
        assert r.report["unquantized"] == ["model.embed_tokens.weight"]  # tied to lm_head
        results[algo.name] = ppl(model, eval_tokens)
    assert original_ppl < results["signround"] < results["rtn"], (original_ppl, results)
    if bits == 2:  # the gap is large at 2 bits: SignRound must close most of it
        assert results["rtn"] - results["signround"] > 0.5 * (results["rtn"] - original_ppl)


class Block0:
    """stories260K's block 0 on its calibration inputs, and the output error of quantized weights."""

    def __init__(self, windows, scheme):
        model, _ = load_model(STORIES)
        _, blocks = find_blocks(model)
        x, per_block = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
        self.block, kwargs = blocks[0], per_block[0]
        self.data = BlockData(x, kwargs, run_block(self.block, x, kwargs, 8))
        self.layers = {n: (lin, scheme) for n, lin in find_linears(self.block).items()}
        self.original = {n: lin.weight.detach().clone() for n, (lin, _) in self.layers.items()}

    def mse(self, result) -> float:
        d = self.data
        with torch.no_grad():
            for n, (lin, _) in self.layers.items():
                lin.weight.copy_(result.weights[n].dequantize())
            err = (run_block(self.block, d.inputs, d.kwargs, 8) - d.targets).pow(2).mean().item()
            for n, (lin, _) in self.layers.items():
                lin.weight.copy_(self.original[n])
        return err


def test_signround_block_loss_below_rtn(data):
    """On block 0 (same inputs for both), SignRound's output error is below RTN's."""
    b = Block0(data[0][:32], lowbit.Scheme(2, 32))
    block, layers, original = b.block, b.layers, b.original
    rtn = b.mse(lowbit.RTN().quantize_block(block, layers))
    sr = lowbit.SignRound(iters=60).quantize_block(block, layers, b.data)
    assert b.mse(sr) < 0.8 * rtn
    assert sr.stats["loss_best"] <= sr.stats["loss_first"]
    # The block's own weights are untouched by tuning (only V and the factors are learned).
    assert all(torch.equal(lin.weight, original[n]) for n, (lin, _) in layers.items())


@pytest.mark.parametrize("bits", [2, 4])
def test_keep_last_beats_best_minibatch(bits, data):
    """The last parameters (keep="last", the default) reproduce the block's outputs better on the
    whole calibration set than those of the lowest single-minibatch loss (keep="best"), at learning
    rate 1 / iters, where the rule was measured (BENCHMARKS.md; most blocks, not all: at 200
    iterations this block at 4 bits is one of the exceptions)."""
    b = Block0(data[0][:64], lowbit.Scheme(bits, 32))
    algo = lowbit.SignRound(iters=100, lr=1 / 100, amp=False, loss="mse")  # the rule was measured on plain MSE
    results = {keep: replace(algo, keep=keep).quantize_block(b.block, b.layers, b.data) for keep in ("last", "best")}
    assert any(not torch.equal(results["last"].weights[n].codes, results["best"].weights[n].codes) for n in b.layers)
    assert b.mse(results["last"]) < b.mse(results["best"])
    assert results["last"].stats["kept"] == "last" and results["best"].stats["kept"] == "best"
    # The last pass's mean loss is about the final parameters' loss on all the windows.
    assert results["last"].stats["loss_last"] == pytest.approx(b.mse(results["last"]), rel=0.1)


def test_keep_checked():
    with pytest.raises(lowbit.LowbitError, match="keep"):
        lowbit.SignRound(keep="first")


def test_deterministic(data):
    windows = data[0][:16]
    codes = []
    for _ in range(2):
        model, _ = load_model(STORIES)
        r = lowbit.quantize(model, "W2A16G32", lowbit.SignRound(iters=10, batch_size=4), windows, seed=3, progress=False)
        codes.append(r.layers)
    assert codes[0].keys() == codes[1].keys()
    for name in codes[0]:
        assert torch.equal(codes[0][name].codes, codes[1][name].codes)
        assert torch.equal(codes[0][name].scale, codes[1][name].scale)


def test_quantized_weights_on_grid(data):
    """The model's weights after quantization are exactly the dequantized codes."""
    model, _ = load_model(STORIES)
    r = lowbit.quantize(model, "W3A16", lowbit.SignRound(iters=5), data[0][:8], progress=False)
    mods = dict(model.named_modules())
    for name, q in r.layers.items():
        assert q.bits == 3 and q.group_size == 128
        assert torch.equal(mods[name].weight.detach(), q.dequantize())
        assert q.scale.shape[1] == (2 if mods[name].weight.shape[1] == 172 else 1)


def test_bf16_tuning_close_to_fp32(data):
    # amp=True: the block runs in bf16 (attention as bf16 matmuls on the CPU); the loss it reaches is close
    # to fp32 tuning's, the weights are still float32 codes, and torch's SDPA is restored after.
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention
    windows = data[0][:16]
    losses = {}
    for amp in (False, True):
        model, _ = load_model(STORIES)
        r = lowbit.quantize(model, "W4A16G32", lowbit.SignRound(iters=30, amp=amp), windows, progress=False)
        assert all(b["amp"] == ("bfloat16" if amp else None) for b in r.report["blocks"])
        assert next(model.parameters()).dtype == torch.float32
        losses[amp] = sum(b["loss_best"] for b in r.report["blocks"])
    assert F.scaled_dot_product_attention is sdpa
    assert losses[True] < 1.1 * losses[False], losses


def test_block_never_ends_worse_than_its_start(data):
    """A tuning that makes things worse (a step far too large for the rounding offsets) is undone
    block by block: the start's weights (here round to nearest) are kept, the report says so, and
    no block's loss on the calibration windows ends above its start's. A tuning that helps keeps
    its weights. (Float32 tuning on every CPU, so the outcome does not depend on bf16 support.)"""
    windows = data[0][:32]
    scheme = lowbit.Scheme(2, 32)
    runs = {}
    for name, algo in [("rtn", lowbit.RTN()), ("bad", lowbit.SignRound(iters=4, lr=1.0, prescale=False, amp=False)),
                       ("good", lowbit.SignRound(iters=40, batch_size=4, prescale=False, amp=False))]:
        model, _ = load_model(STORIES)
        runs[name] = lowbit.quantize(model, scheme, algo, windows, progress=False)
    bad, good = runs["bad"].report, runs["good"].report
    assert 0 in bad["blocks_kept_start"]
    for n, q in runs["bad"].layers.items():
        if int(n.split(".")[2]) in bad["blocks_kept_start"]:
            assert torch.equal(q.codes, runs["rtn"].layers[n].codes), n
    assert good["blocks_kept_start"] == []
    for b in bad["blocks"] + good["blocks"]:
        assert b["loss_calib"] <= b["loss_start"]
        assert b["kept_start"] == (b["index"] in bad["blocks_kept_start"] and b in bad["blocks"])
        if b["kept_start"]:  # its loss was summed over every window
            assert b["loss_start_windows"] == 32
    assert any(b["loss_start_windows"] < 32 for b in good["blocks"])  # a tuning that helps stops it early


def test_start_loss_stops_once_past_the_tuned_loss(data):
    """The start's loss (pipeline._loss) runs a batch at a time and stops once its sum passes the
    bound: what it returns then is the part so far, above the bound and at most the full loss."""
    from lowbit.pipeline import _loss

    model, _ = load_model(STORIES)
    blocks = find_blocks(model)[1]
    x, kwargs = capture_block_inputs(model, blocks, data[0][:16], torch.device("cpu"))
    targets = run_block(blocks[0], x, kwargs[0], 4)
    torch.manual_seed(0)
    with torch.no_grad():
        for lin in find_linears(blocks[0]).values():
            lin.weight.add_(0.02 * torch.randn_like(lin.weight))
    full, n = _loss(blocks[0], x, kwargs[0], 4, None, targets, relative=True)
    assert n == 16 and full > 0
    part, m = _loss(blocks[0], x, kwargs[0], 4, None, targets, relative=True, above=full / 3)
    assert m < 16 and m % 4 == 0 and full / 3 < part <= full
    assert _loss(blocks[0], x, kwargs[0], 4, None, targets, relative=True, above=2 * full) == (full, 16)


def test_target_model_or_block(data):
    """target="model": each block is tuned toward the float model's outputs at that block (float
    block on float inputs); target="block": toward the float block on the quantized model's inputs,
    its own error only. Checked at block 1, whose inputs differ once block 0 is quantized."""
    from lowbit.algorithms import SignRound

    windows = data[0][:16]
    reference, _ = load_model(STORIES)
    _, ref_blocks = find_blocks(reference)
    fp_x, kwargs = capture_block_inputs(reference, ref_blocks, windows, torch.device("cpu"))
    with torch.no_grad():
        fp_in1 = run_block(ref_blocks[0], fp_x, kwargs[0], 8)
    seen = {}

    class Spy(SignRound):
        def quantize_block(self, block, layers, data, seed=0, run=None):
            seen.setdefault(self.target, []).append((data.inputs.clone(), data.targets.clone()))
            return super().quantize_block(block, layers, data, seed, run)

    for target in ("model", "block"):
        model, _ = load_model(STORIES)
        # float32 throughout, so the targets compare with the fp32 reference on any CPU kind
        lowbit.quantize(model, "W2A16G32", Spy(iters=2, target=target, amp=False), windows, progress=False)
    with torch.no_grad():
        (q_in_m, t_m), (q_in_b, t_b) = seen["model"][1], seen["block"][1]
        assert torch.equal(q_in_m, q_in_b)  # block 0 tuned the same way in both runs
        assert not torch.allclose(q_in_m, fp_in1, atol=1e-3)
        torch.testing.assert_close(t_m, run_block(ref_blocks[1], fp_in1, kwargs[1], 8))
        torch.testing.assert_close(t_b, run_block(ref_blocks[1], q_in_b, kwargs[1], 8))
    assert not torch.allclose(t_m, t_b, atol=1e-3)
    with pytest.raises(lowbit.LowbitError, match="target"):
        SignRound(target="float")


def test_relative_loss_is_what_the_block_keeps_by(data):
    """With loss="relative" the pipeline scores a block's tuned and start weights by the same
    relative measure it was tuned with (not plain MSE): block 0's reported loss_calib is its
    relative error on the windows, recomputed here, and the run differs from a plain-MSE one."""
    from lowbit.algorithms.base import squared_errors

    windows = data[0][:16]
    reference, _ = load_model(STORIES)
    _, ref_blocks = find_blocks(reference)
    fp_x, kwargs = capture_block_inputs(reference, ref_blocks, windows, torch.device("cpu"))
    runs = {}
    for loss in ("mse", "relative"):
        model, _ = load_model(STORIES)
        r = lowbit.quantize(model, "W2A16G32", lowbit.SignRound(iters=10, batch_size=4, amp=False, loss=loss),
                            windows, progress=False)
        runs[loss] = r
        with torch.no_grad():
            target = run_block(ref_blocks[0], fp_x, kwargs[0], 8)
            out = run_block(find_blocks(model)[1][0], fp_x, kwargs[0], 8)
        b0 = r.report["blocks"][0]
        assert b0["loss_calib"] == pytest.approx(squared_errors(out, target, loss == "relative").mean().item(), rel=1e-4)
        assert r.report["algorithm"]["loss"] == loss
    assert any(not torch.equal(runs["mse"].layers[n].codes, runs["relative"].layers[n].codes) for n in runs["mse"].layers)
