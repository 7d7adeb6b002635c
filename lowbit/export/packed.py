"""GPTQ-layout checkpoints: the `auto_round` and `gptq` formats.

Both store, per quantized Linear `X`, the tensors X.qweight / X.qzeros / X.scales (lowbit.qdq.pack)
and differ only in config.json's quantization_config and in the zero-point convention:
  - auto_round, all layers symmetric: packing_format "auto_round:auto_gptq", zero points stored
    minus one (GPTQ v1), which every GPTQ kernel reads. With asymmetric layers: packing_format
    "auto_round", zero points as is (v1 cannot store a zero point of 0).
  - gptq: checkpoint_format "gptq" (v1) when symmetric, "gptq_v2" otherwise; desc_act false,
    per-layer overrides in "dynamic" (GPTQModel / vLLM), and a g_idx per layer.
Layers the standard kernels cannot hold (input or output size not a multiple of 32, or a group
size that does not divide the input size) are written dense in the file's float dtype, holding
their dequantized weights, and marked unquantized in the config, so every loader computes the
same function. Everything else (embeddings, norms, lm_head unless quantized) is float16 (bfloat16
models stay bfloat16).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch

from lowbit.qdq.int import QuantizedWeight
from lowbit.qdq.pack import pack_gptq

PACKED_BITS = (2, 3, 4, 8)


def dense_reason(q: QuantizedWeight) -> str | None:
    """Why a layer cannot be packed for standard kernels (None when it can)."""
    out_f, in_f = q.codes.shape
    if in_f % 32 or out_f % 32:
        return f"shape {out_f}x{in_f} is not a multiple of 32"
    if q.group_size > 0 and in_f % q.group_size:
        return f"group size {q.group_size} does not divide {in_f} inputs"
    return None


def _common(layers: dict[str, QuantizedWeight]) -> tuple[int, int, bool]:
    """The most frequent (bits, group_size, sym): the global setting, others become overrides."""
    counts = Counter((q.bits, q.group_size, q.sym) for q in layers.values())
    return counts.most_common(1)[0][0]


def quantization_config(fmt: str, layers: dict[str, QuantizedWeight], blocks_name: str) -> dict:
    packed = {n: q for n, q in layers.items() if dense_reason(q) is None}
    dense = sorted(n for n in layers if n not in packed)
    bits, group, sym = _common(packed or layers)
    all_sym = all(q.sym for q in packed.values())
    if fmt == "auto_round":
        extra = {}
        for n, q in packed.items():
            if (q.bits, q.group_size, q.sym) != (bits, group, sym):
                extra[n] = {"bits": q.bits, "group_size": q.group_size, "sym": q.sym}
        for n in dense:
            extra[n] = {"bits": 16, "data_type": "float"}
        cfg = {
            "quant_method": "auto-round",
            "packing_format": "auto_round:auto_gptq" if all_sym else "auto_round",
            "bits": bits, "group_size": group, "sym": sym, "data_type": "int", "act_bits": 16,
            "block_name_to_quantize": blocks_name,
        }
        if extra:
            cfg["extra_config"] = extra
        return cfg
    if fmt == "gptq":
        dynamic = {}
        for n, q in packed.items():
            if (q.bits, q.group_size, q.sym) != (bits, group, sym):
                dynamic[f"+:^{re.escape(n)}$"] = {"bits": q.bits, "group_size": q.group_size, "sym": q.sym}
        for n in dense:
            dynamic[f"-:^{re.escape(n)}$"] = {}
        cfg = {
            "quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
            "desc_act": False, "true_sequential": True, "static_groups": False,
            "checkpoint_format": "gptq" if all_sym else "gptq_v2",
        }
        if dynamic:
            cfg["dynamic"] = dynamic
        return cfg
    raise ValueError(f"not a packed format: {fmt}")


def zero_offset(config: dict) -> int:
    """What was added to the zero points on disk: -1 for GPTQ v1 conventions, else 0."""
    if config.get("quant_method") == "auto-round":
        return -1 if "gptq" in config.get("packing_format", "auto_round:auto_gptq") else 0
    if config.get("quant_method") == "gptq":
        return 0 if config.get("checkpoint_format", "gptq") == "gptq_v2" else -1
    return 0


def packed_tensors(name: str, q: QuantizedWeight, offset: int, g_idx: bool) -> dict[str, torch.Tensor]:
    if offset:
        q = QuantizedWeight(q.codes, q.scale, q.zero + offset, q.bits, q.group_size, q.sym)
    t = {f"{name}.{k}": v for k, v in pack_gptq(q).items()}
    if not g_idx:
        return t
    in_f = q.codes.shape[1]
    g = q.group_size if q.group_size > 0 else in_f
    t[f"{name}.g_idx"] = (torch.arange(in_f, dtype=torch.int32) // g)
    return t


def state_dict(model, layers: dict[str, QuantizedWeight], config: dict, dtype: torch.dtype) -> dict:
    """The checkpoint's tensors: packed layers replace their .weight; the rest cast to dtype."""
    offset = zero_offset(config)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for name, q in layers.items():
        if dense_reason(q) is None:
            del sd[f"{name}.weight"]
            sd.update(packed_tensors(name, q, offset, g_idx=config["quant_method"] == "gptq"))
    return {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v).contiguous()
            for k, v in sd.items()}


def write_packed(result, folder: str, fmt: str) -> None:
    """Write `result` (a QuantizeResult) as an auto_round or gptq checkpoint into `folder`."""
    from safetensors.torch import save_file

    from lowbit.model import find_blocks

    model = result.model
    blocks_name, _ = find_blocks(model)
    cfg = quantization_config(fmt, result.layers, blocks_name)
    cfg["quant_tool"] = f"lowbit {result.report.get('lowbit_version', '')}".strip()
    dtype = torch.bfloat16 if next(model.parameters()).dtype == torch.bfloat16 else torch.float16
    sd = state_dict(model, result.layers, cfg, dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        for k in [k for k in sd if out is not None and k.endswith(".weight") and model.get_submodule(k[:-7]) is out]:
            del sd[k]  # tied to the input embedding: stored once
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = cfg
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if result.tokenizer is not None:
        result.tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "quantization.json"), "w") as f:
        json.dump({"format": fmt, **result.report}, f, indent=2, default=str)
