"""Mixture-of-experts models (lowbit/experts.py): every expert quantized, in both the fused 3-D
layout transformers builds and per-expert checkpoints, streamed or in memory, exported per expert
and loaded back."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

import lowbit
from lowbit.experts import ExpertLinears, split_experts
from lowbit.export import export
from lowbit.model import load_model

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")
STORIES = os.path.join(ASSETS, "models", "stories260K")
TEXT = os.path.join(ASSETS, "text", "tinystories_valid_prefix.txt")

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/assets not present")

COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=64,
                                                     num_experts=8, num_experts_per_tok=2, head_dim=16,
                                                     decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=8,
                                                  num_experts_per_tok=2),
}


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def save(arch: str, folder) -> str:
    """A random model of `arch` saved by transformers (its own checkpoint naming), with
    stories260K's 512-token tokenizer."""
    build(arch).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(os.path.join(STORIES, f), folder)
    return str(folder)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_split_experts_computes_the_same(arch):
    model = build(arch)
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        assert split_experts(model) == 2
        after = model(ids).logits
    assert isinstance(model.model.layers[0].mlp.experts, ExpertLinears)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def _distinct_per_group(w: torch.Tensor, group: int) -> int:
    g = w.reshape(w.shape[0], -1, group)
    return max(len(torch.unique(g[r, j])) for r in range(g.shape[0]) for j in range(g.shape[1]))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_every_expert_is_quantized_exported_and_loads_back(arch, tmp_path):
    src = save(arch, tmp_path / "src")
    out = tmp_path / "out"
    args = ["quantize", src, "--scheme", "W4A16", "--group-size", "32", "--dataset", TEXT, "--seqlen", "64",
            "--nsamples", "8", "--iters", "5", "--format", "fake,auto_round", "--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "block by block" in r.stderr  # the checkpoint streamed, experts under their checkpoint names
    report = json.load(open(out / "fake" / "quantization.json"))
    experts = [n for n in report["layers"] if ".experts." in n]
    assert len(experts) == 2 * 8 * 3
    # Left in float: embeddings, lm_head and the routers; no expert.
    assert all("gate.weight" in n or "embed" in n or "lm_head" in n for n in report["unquantized"])
    assert sum(".gate.weight" in n for n in report["unquantized"]) == 2

    # transformers loads the fake folder (fusing the experts again): at most 16 values per group.
    fused = transformers.AutoModelForCausalLM.from_pretrained(out / "fake", local_files_only=True)
    for layer in fused.model.layers:
        ex = layer.mlp.experts
        for e in range(8):
            assert _distinct_per_group(ex.gate_up_proj[e].detach(), 32) <= 16
            assert _distinct_per_group(ex.down_proj[e].detach(), 32) <= 16

    # The packed checkpoint, loaded by lowbit (QuantLinear experts), computes what the fake one does.
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    packed, _ = lowbit.load(str(out / "auto_round"))
    fake, _ = lowbit.load(str(out / "fake"))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits.float(), fake(ids).logits.float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(fake(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_moe_streamed_matches_in_memory(arch, tmp_path):
    from lowbit.job import quantize_folder

    from test_stream import weight_hashes

    src = save(arch, tmp_path / "src")
    scheme, algo = lowbit.get_scheme("W4A16", group_size=32), lowbit.SignRound(iters=3)
    kw = dict(nsamples=4, seqlen=32, seed=1)
    model, tok = load_model(src)
    mem = lowbit.quantize(model, scheme, algo, TEXT, tokenizer=tok, progress=False, **kw)
    export(mem, tmp_path / "mem", "fake,gptq")
    _, out = quantize_folder(src, tmp_path / "stream", "fake,gptq", scheme, algo, TEXT, progress=False, **kw)
    assert weight_hashes(tmp_path / "mem") == weight_hashes(out)


def test_experts_with_few_tokens_keep_their_start(tmp_path):
    model = build("qwen3_moe")
    windows = torch.randint(3, 512, (2, 8), generator=torch.Generator().manual_seed(0))  # 16 tokens, 8 experts
    result = lowbit.quantize(model, lowbit.get_scheme("W4A16", group_size=32), lowbit.SignRound(iters=3), windows,
                             progress=False, nsamples=2, seqlen=8)
    few = result.report["experts_few_tokens"]
    assert few and all(".experts." in n and c < 32 for n, c in few.items())
    assert len([n for n in few if n.endswith("gate_proj")]) >= 8  # every expert of both layers
