"""End to end on tiny random models of several architectures (tiny_models.py), built offline from
their configs: capture -> SignRound per block -> weights written in place -> save_fake ->
from_pretrained."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import lowbit
from lowbit.export import save_fake
from lowbit.model import capture_block_inputs, find_blocks, run_block

from tiny_models import ARCHS, BITS, BY_NAME, GROUP, IDS, NSAMPLES, SEQLEN, VOCAB, Arch, build, data


def signround():
    # lr 0.05 rather than the default 1 / iters = 0.2, which with 5 iterations only makes the
    # loss worse (the initial rounding is kept); at 0.05 the tuning really changes codes.
    return lowbit.SignRound(iters=5, lr=0.05, batch_size=2)


def run(model, windows, algorithm=None, seed=0):
    return lowbit.quantize(
        model, lowbit.Scheme(bits=BITS, group_size=GROUP), algorithm or signround(), windows,
        nsamples=NSAMPLES, seqlen=SEQLEN, seed=seed, progress=False,
    )


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@dataclass
class Run:
    arch: Arch
    model: nn.Module
    result: lowbit.QuantizeResult
    original: dict  # parameter name -> weights before quantization
    ref_logits: torch.Tensor  # full precision, on eval_ids
    q_logits: torch.Tensor  # quantized, in memory
    eval_ids: torch.Tensor


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: a.name)
def quantized(request) -> Run:
    arch = request.param
    model = build(arch)
    windows, eval_ids = data()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = logits(model, eval_ids)
    result = run(model, windows)
    assert result.model is model
    return Run(arch, model, result, original, ref, logits(model, eval_ids), eval_ids)


def block_linears(r: Run) -> dict[str, nn.Linear]:
    prefix = r.arch.blocks + "."
    return {n: m for n, m in r.model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)}


def distinct_per_group(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Number of distinct values in each (row, group) of a 2-D tensor; a last partial group too."""
    counts = []
    for start in range(0, t.shape[1], group_size):
        g = t[:, start : start + group_size].float().sort(dim=1).values
        counts.append(1 + (g.diff(dim=1) != 0).sum(dim=1))
    return torch.stack(counts, dim=1)


def test_every_block_linear_quantized_in_place(quantized):
    r = quantized
    linears = block_linears(r)
    assert len(linears) == 2 * r.arch.per_block
    assert set(r.result.layers) == set(linears)
    for name, lin in linears.items():
        q = r.result.layers[name]
        out_f, in_f = lin.weight.shape
        assert q.codes.shape == (out_f, in_f) and q.codes.dtype == torch.uint8
        assert q.scale.shape == q.zero.shape == (out_f, math.ceil(in_f / GROUP))
        assert (q.bits, q.group_size) == (BITS, GROUP)
        torch.testing.assert_close(lin.weight.detach(), q.dequantize(lin.weight.dtype), rtol=0, atol=1e-6)
        assert not torch.equal(lin.weight.detach(), r.original[name + ".weight"]), name
        if lin.bias is not None:  # biases are left alone
            assert torch.equal(lin.bias.detach(), r.original[name + ".bias"]), name
    # Everything outside the blocks (embeddings, lm_head) is untouched and reported as such.
    unquantized = set(r.result.report["unquantized"])
    assert not any(n.startswith(r.arch.blocks + ".") for n in unquantized)
    assert r.result.report["skipped_in_blocks"] == []
    for name, p in r.model.named_parameters():
        if p.dim() >= 2 and not name.startswith(r.arch.blocks + "."):
            assert name in unquantized
            assert torch.equal(p.detach(), r.original[name]), name
    assert any("embed" in n for n in unquantized)
    assert 0 < r.result.report["unquantized_share"] < 1
    assert set(r.result.report["layers"]) == set(linears)


def test_codes_use_at_most_2_pow_bits_levels_per_group(quantized):
    r = quantized
    partial = False
    for name, lin in block_linears(r).items():
        q = r.result.layers[name]
        assert int(q.codes.max()) <= 2**BITS - 1
        partial |= lin.weight.shape[1] % GROUP != 0
        for t in (q.codes, lin.weight.detach()):  # the codes and the weights now in the model
            n = distinct_per_group(t, GROUP)
            assert n.shape == (lin.weight.shape[0], math.ceil(lin.weight.shape[1] / GROUP))
            assert int(n.max()) <= 2**BITS, name
        # and the levels are used: not a degenerate quantization to a handful of values
        assert int(distinct_per_group(q.codes, GROUP).max()) >= 2 ** (BITS - 1), name
    assert partial, "every architecture here has a layer whose input is not a multiple of the group"


def test_logits_finite_changed_and_close(quantized):
    r = quantized
    assert torch.isfinite(r.ref_logits).all() and torch.isfinite(r.q_logits).all()
    assert not torch.allclose(r.q_logits, r.ref_logits, rtol=0, atol=1e-5)
    rel = ((r.q_logits - r.ref_logits).norm() / r.ref_logits.norm()).item()
    assert rel < 0.3, f"{r.arch.name}: relative logit error {rel:.3f} at {BITS} bits"

    blocks = r.result.report["blocks"]
    assert [b["index"] for b in blocks] == [0, 1]
    for b in blocks:
        assert b["iters"] == 5
        assert math.isfinite(b["loss_first"]) and math.isfinite(b["loss_best"])
        assert 0 <= b["loss_best"] <= b["loss_first"]
    cal = r.result.report["calibration"]
    assert (cal["nsamples"], cal["seqlen"]) == (NSAMPLES, SEQLEN)


def test_save_fake_round_trip(quantized, tmp_path):
    r = quantized
    out = save_fake(r.result, str(tmp_path / "q"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation=r.arch.attn, local_files_only=True
    ).eval()
    assert type(loaded) is type(r.model)
    torch.testing.assert_close(logits(loaded, r.eval_ids), r.q_logits, rtol=1e-5, atol=1e-5)
    params = dict(loaded.named_parameters())
    stored = load_file(os.path.join(out, "quantized_weights.safetensors"))
    for name, q in r.result.layers.items():
        torch.testing.assert_close(params[name + ".weight"].detach(), q.dequantize(), rtol=0, atol=1e-6)
        assert torch.equal(stored[name + ".codes"], q.codes)
        torch.testing.assert_close(stored[name + ".scale"], q.scale.float())
    with open(os.path.join(out, "quantization.json")) as f:
        info = json.load(f)
    assert info["format"] == "fake" and set(info["layers"]) == set(r.result.layers)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_same_seed_same_codes(arch):
    arch = BY_NAME[arch]
    windows, _ = data()
    a = run(build(arch), windows).layers
    b = run(build(arch), windows).layers
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].codes, b[name].codes), name
        assert torch.equal(a[name].scale, b[name].scale), name
        assert torch.equal(a[name].zero, b[name].zero), name
    # and the tuning did something: the codes are not those of round-to-nearest
    rtn = run(build(arch), windows, lowbit.RTN()).layers
    assert any(not torch.equal(a[n].codes, rtn[n].codes) for n in a)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_captured_inputs_reproduce_the_model(arch):
    """Block 0's inputs and kwargs captured from single windows, fed through the blocks in
    minibatches of 2 (and a last one of 1), give the model's own hidden states."""
    model = build(arch, layers=3)
    windows, _ = data()
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
    name, blocks = find_blocks(model)
    assert name == arch.blocks
    x, kwargs = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
    torch.testing.assert_close(x, hidden[0])
    x0, params = x, [p.clone() for p in model.parameters()]
    for i in range(len(blocks) - 1):  # the last hidden state has the final norm applied
        x = run_block(blocks[i], x, kwargs[i], 2)
        torch.testing.assert_close(x, hidden[i + 1], rtol=1e-5, atol=1e-5)
    # in bf16 (as SignRound's targets where bf16 is fast): float32 out, close, the block untouched
    half = run_block(blocks[0], x0, kwargs[0], 2, torch.bfloat16)
    assert half.dtype == torch.float32
    assert (half - hidden[1]).norm() < 0.02 * hidden[1].norm()
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))


MIXED = {
    # Block 0 slides over 4 tokens, block 1 attends to all: one set of block arguments can't do both.
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=64, **IDS,
    ),
    "qwen2-sliding": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=4, max_window_layers=1,
        max_position_embeddings=64, **IDS,
    ),
}


@pytest.mark.parametrize("name", MIXED)
def test_blocks_with_different_arguments(name):
    """Models that mix sliding-window and full-attention layers call their blocks with different
    masks: each block gets its own captured arguments, which reproduce the model's hidden states
    (block 0's would not), and the whole pipeline runs."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(MIXED[name](), attn_implementation="eager").eval()
    windows, eval_ids = data()
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
    _, blocks = find_blocks(model)
    x, kwargs = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
    assert all("forward" not in b.__dict__ for b in blocks)  # the blocks' own forward is back
    torch.testing.assert_close(x, hidden[0])
    x1 = run_block(blocks[0], x, kwargs[0], 2)
    torch.testing.assert_close(x1, hidden[1], rtol=1e-5, atol=1e-5)
    wrong = run_block(blocks[1], x1, kwargs[0], 2)  # block 1 with block 0's mask
    right = run_block(blocks[1], x1, kwargs[1], 2)
    assert not torch.allclose(wrong, right, atol=1e-4)
    before = logits(model, eval_ids)
    result = run(model, windows)
    after = logits(model, eval_ids)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    assert len(result.layers) == 2 * 7


@pytest.mark.parametrize("fmt", ["auto_round", "gptq"])
def test_packed_export_round_trip(quantized, fmt, tmp_path):
    # Tiny random models of every architecture: packed export, lowbit.load, same logits as the
    # fake-quantized model (layers the standard layout cannot hold are stored dense).
    from lowbit.export import export
    from lowbit.runtime import QuantLinear
    from lowbit.export.packed import load_packed

    r = quantized
    out = export(r.result, str(tmp_path / fmt), fmt)
    model, _ = load_packed(out)
    n_packed = sum(isinstance(m, QuantLinear) for m in model.modules())
    n_packable = sum(q.codes.shape[0] % 32 == 0 and q.codes.shape[1] % 32 == 0 and q.codes.shape[1] % GROUP == 0
                     for q in r.result.layers.values())
    assert n_packed == n_packable
    got = logits(model, r.eval_ids)
    rel = ((got - r.q_logits).norm() / r.q_logits.norm()).item()
    assert rel < 2e-3, f"{r.arch.name}: relative logit difference {rel:.2e}"  # float16 storage


@pytest.mark.parametrize("make_config", [
    lambda: transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=8,
        max_position_embeddings=64, **IDS),
    lambda: transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, **IDS),
], ids=["qwen3_moe", "mixtral"])
def test_weights_outside_linear_layers_are_reported(make_config):
    """Fused 3-D experts are split into per-expert Linear layers and quantized; what is left in
    the blocks that is not a Linear layer (the routers) is said before the work starts and in the
    report, by parameter and share of the weights, never silently."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config()).eval()
    with pytest.warns(UserWarning, match=r"not Linear layers and stay in full precision \((\d+\.\d)% of the weights\): mlp.gate.weight"):
        r = lowbit.quantize(model, "W4A16G32", "rtn", progress=False)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    assert sum(".experts." in n for n in r.layers) == 2 * 4 * 3
    skipped = r.report["skipped_in_blocks"]
    assert skipped == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert set(skipped) <= set(r.report["unquantized"])
    share = sum(p.numel() for n, p in model.named_parameters() if n in set(r.report["unquantized"]))
    assert r.report["unquantized_share"] == pytest.approx(share / sum(
        p.numel() for p in model.parameters() if p.dim() >= 2))
