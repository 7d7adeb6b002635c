"""llama.cpp's named mixes (Q4_K_M, Q3_K_M, Q2_K_S, Q2_K_MIX, ...) as lowbit plans: which k-quant type each
tensor gets, by the rules of llama.cpp's own quantizer (src/llama-quant.cpp, llama_tensor_get_type),
so that `--scheme Q4_K_M` tunes every layer on the grid the Q4_K_M file stores it in.

A mix names a base type and bumps some tensors to more bits: attn_v and ffn_down in a pattern over
the layers (use_more_bits: the first and last eighth and every third layer between), attn_output
for some mixes. The output layer gets Q6_K; the token embedding gets the base type, or the
output's type when the two are tied (llama.cpp then stores one tensor for both). Those two are
outside the blocks and are rounded to nearest (with a range search), as llama.cpp does, not tuned.

A mix's name with -q8 (`Q4_K_M-q8`) also rounds each block layer's inputs as llama.cpp's CPU
kernels do (8-bit integers per block: lowbit.qdq.act's q8_k / q8_0), while tuning and when
evaluating, so lowbit tunes for, and reports, what llama.cpp computes. The output layer's input
stays in float (it is rounded to nearest outside the blocks, with no input type).

Rules lowbit does not apply: the 70B model-size bump (llama.cpp detects the size by name) and the
Falcon architecture's own rules.
"""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.schemes import Scheme, get_scheme

# mix -> (base type, llama.cpp's LlamaFileType name)
# "q2_k_mix" is llama.cpp's file type Q2_K; lowbit's plain "Q2_K" names the type on every layer.
MIXES = {
    "q2_k_mix": ("q2_k", "MOSTLY_Q2_K"),
    "q2_k_s": ("q2_k", "MOSTLY_Q2_K_S"),
    "q3_k_s": ("q3_k", "MOSTLY_Q3_K_S"),
    "q3_k_m": ("q3_k", "MOSTLY_Q3_K_M"),
    "q3_k_l": ("q3_k", "MOSTLY_Q3_K_L"),
    "q4_k_s": ("q4_k", "MOSTLY_Q4_K_S"),
    "q4_k_m": ("q4_k", "MOSTLY_Q4_K_M"),
    "q5_k_s": ("q5_k", "MOSTLY_Q5_K_S"),
    "q5_k_m": ("q5_k", "MOSTLY_Q5_K_M"),
}

# A block Linear's last name -> llama.cpp's tensor category
CATEGORIES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "qkv_proj": "attn_qkv",
    "o_proj": "attn_output", "out_proj": "attn_output", "dense": "attn_output",
    "gate_proj": "ffn_gate", "w1": "ffn_gate", "up_proj": "ffn_up", "w3": "ffn_up", "gate_up_proj": "ffn_up",
    "down_proj": "ffn_down", "w2": "ffn_down",
}


Q8 = "-q8"  # a mix's suffix: inputs rounded as llama.cpp rounds them


def mix_name(name: str) -> str | None:
    """The mix a scheme name asks for ("Q4_K_M", "gguf:q4_k_m" -> "q4_k_m"; "Q4_K_M-q8" ->
    "q4_k_m-q8"), None if it names none."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower().removeprefix("gguf:")
    return key if mix_base(key) in MIXES else None


def mix_base(mix: str) -> str:
    """A mix without its -q8: its key in MIXES, the types and the file it makes."""
    return mix.removesuffix(Q8)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's pattern of layers that get more bits: the first and last eighth, and every
    third layer between (integer division, as in C)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(mix: str, category: str, layer: int, n_layers: int, gqa: int, n_expert: int = 1) -> str:
    """The type llama.cpp's `mix` gives a block tensor of `category` in block `layer`."""
    base = MIXES[mix][0]
    if category in ("attn_v", "attn_qkv"):
        if category == "attn_qkv":  # fused attention (phi3): its own rules
            return {"q3_k_m": "q4_k", "q3_k_l": "q4_k", "q4_k_m": "q5_k", "q5_k_m": "q6_k"}.get(mix, base)
        if n_expert == 8:
            return "q8_0"
        if mix == "q2_k_mix":
            return "q4_k" if gqa >= 4 else "q3_k"
        if mix == "q2_k_s" and gqa >= 4:
            return "q4_k"
        if mix == "q3_k_m":
            return "q5_k" if layer < 2 else "q4_k"
        if mix == "q3_k_l":
            return "q5_k"
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            return "q6_k"
        if mix == "q4_k_s" and layer < 4:
            return "q5_k"
        return base
    if category == "attn_k" and n_expert == 8:
        return "q8_0"
    if category == "ffn_down":
        if mix == "q2_k_mix":
            return "q3_k"
        if mix == "q2_k_s":
            return "q4_k" if layer < n_layers // 8 else base
        if mix == "q3_k_m":
            return "q5_k" if layer < n_layers // 16 else "q4_k"
        if mix == "q3_k_l":
            return "q5_k"
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            return "q6_k"
        if mix == "q4_k_s" and layer < n_layers // 8:
            return "q5_k"
        return base
    if category == "attn_output":
        if n_expert == 8:
            return "q5_k" if mix in ("q2_k_mix", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m") else base
        return {"q2_k_mix": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(mix, base)
    return base


@dataclass
class Mix:
    """A mix laid over one model: the base scheme, every block layer's scheme, and the schemes of
    the layers outside the blocks (module name -> scheme: the embedding, the output layer)."""

    name: str
    file_type: str
    scheme: Scheme
    layers: dict[str, Scheme]
    outside: dict[str, Scheme]


def expand_mix(name: str, model, layer_names: list[str], blocks_name: str) -> Mix:
    """The mix `name` for `model` (its config and module names; weights may be on meta), whose
    block layers are `layer_names` ("model.layers.3.mlp.down_proj")."""
    from lowbit.model import find_lm_head

    mix = mix_name(name)
    if mix is None:
        raise LowbitError(f"unknown llama.cpp mix {name!r} (choose from {', '.join(m.upper() for m in MIXES)})")
    base, q8 = mix_base(mix), Q8 if mix.endswith(Q8) else ""
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    n_head = int(cfg.num_attention_heads)
    gqa = n_head // int(getattr(cfg, "num_key_value_heads", None) or n_head)
    n_expert = int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 1)
    layers = {}
    for full in layer_names:
        rest = full[len(blocks_name) + 1:]
        layer = int(rest.split(".", 1)[0])
        category = CATEGORIES.get(rest.rsplit(".", 1)[-1], "other")
        layers[full] = get_scheme(f"gguf:{tensor_type(base, category, layer, n_layers, gqa, n_expert)}{q8}")

    outside = {}
    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    head = find_lm_head(model)
    width = int(emb.weight.shape[1])
    # the output (and a tied embedding): Q6_K, or Q8_0 for rows that are not whole super-blocks
    out_type = get_scheme("gguf:q6_k" if width % 256 == 0 else "gguf:q8_0")
    tied = head is None or head[1].weight is emb.weight or bool(getattr(cfg, "tie_word_embeddings", False))
    if tied:
        outside[emb_name] = out_type
    else:
        outside[emb_name] = get_scheme(f"gguf:{MIXES[base][0]}")
        if head is not None:
            outside[head[0]] = out_type
    return Mix(mix, MIXES[base][1], get_scheme(f"gguf:{MIXES[base][0]}{q8}"), layers, outside)
