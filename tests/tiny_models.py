"""Tiny random models of several architectures, built offline from their configs, for the tests
that run every architecture (test_architectures.py, test_formats.py).

The models are small (hidden 32-64, 2 layers, vocabulary 128) and some have input widths that are
not a multiple of the group size (hidden 48, intermediate 72/80 with groups of 32), so the partial
last group is exercised. Some use eager attention so that the causal mask is a real tensor
[1, 1, seq, seq] captured from one window and broadcast over a minibatch (with SDPA and no padding
it is usually None); Mistral's sliding window (8 < seqlen 16) gives a real mask as well.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

BITS, GROUP = 4, 32
NSAMPLES, SEQLEN = 5, 16  # 5 windows with batch 2: run_block also sees a last batch of 1
VOCAB = 128
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Arch:
    name: str
    make_config: object  # layers -> config
    blocks: str  # where the transformer blocks are
    per_block: int  # Linear layers per block
    attn: str = "sdpa"
    extra: dict = field(default_factory=dict)


def _decoder(cls, hidden, inter, heads=4, kv=2, **kw):
    def make(layers):
        return cls(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64, **IDS, **kw,
        )

    return make


ARCHS = [
    Arch("llama", _decoder(transformers.LlamaConfig, 64, 72), "model.layers", 7, attn="eager"),
    Arch("qwen2", _decoder(transformers.Qwen2Config, 48, 96), "model.layers", 7),
    Arch("qwen3", _decoder(transformers.Qwen3Config, 64, 72, head_dim=16), "model.layers", 7),
    Arch("mistral", _decoder(transformers.MistralConfig, 32, 72, sliding_window=8), "model.layers", 7),
    Arch("phi3", _decoder(transformers.Phi3Config, 64, 72), "model.layers", 4, attn="eager"),
    Arch("gemma", _decoder(transformers.GemmaConfig, 48, 80, kv=1, head_dim=16), "model.layers", 7),
    Arch(
        "opt",
        lambda layers: transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=48, word_embed_proj_dim=48, ffn_dim=72, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        ),
        "model.decoder.layers", 6, attn="eager",
    ),
    Arch(
        "gpt_neox",
        lambda layers: transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=72, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        ),
        "gpt_neox.layers", 4, attn="eager",
    ),
]
BY_NAME = {a.name: a for a in ARCHS}


def build(arch: Arch, layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(arch.make_config(layers), attn_implementation=arch.attn)
    return model.eval()


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows [NSAMPLES, SEQLEN] and other token ids to compare logits on."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (NSAMPLES, SEQLEN), generator=g), torch.randint(3, VOCAB, (3, SEQLEN), generator=g)
