"""Load an auto_round / gptq checkpoint with lowbit's QuantLinear (no auto-round or GPTQModel
needed). The model is built with its parameters on the meta device, so no full-size float
weight is ever allocated: memory is the packed tensors plus the float ones (embeddings, norms)."""
from __future__ import annotations

import glob
import json
import math
import os
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.packed import zero_offset
from lowbit.qdq.int import QuantizedWeight
from lowbit.qdq.pack import pack_rows
from lowbit.runtime.quant_linear import QuantLinear, unpack_words


def quantization_config(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("quantization_config")
    except (OSError, ValueError):
        return None


def is_packed(path: str) -> bool:
    cfg = quantization_config(path)
    return bool(cfg) and cfg.get("quant_method") in ("auto-round", "gptq")


@contextmanager
def params_on_meta():
    """Every nn.Parameter created inside goes to the meta device (buffers stay real, so rotary
    tables computed at construction are kept)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    files = [f for f in files if os.path.basename(f) != "quantized_weights.safetensors"]
    if not files:
        raise LowbitError(f"no .safetensors weights in {path}")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def _shift_zeros(qzeros: torch.Tensor, bits: int, delta: int) -> torch.Tensor:
    z = unpack_words(qzeros, bits, 1) + delta
    return pack_rows(z.clamp(0, (1 << bits) - 1), bits, dim=1)


def load_packed(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with a QuantLinear for every packed layer of an auto_round/gptq folder."""
    import transformers

    qcfg = quantization_config(path)
    if not qcfg or qcfg.get("quant_method") not in ("auto-round", "gptq"):
        raise LowbitError(f"{path} is not an auto_round or gptq checkpoint")
    if qcfg.get("desc_act"):
        raise LowbitError(f"{path}: act-order (desc_act) checkpoints are not supported")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # built as a plain model; the layers are swapped below
    with params_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors(path)
    offset = zero_offset(qcfg)
    for key in [k for k in tensors if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        lin = model.get_submodule(name)
        in_f, out_f = lin.in_features, lin.out_features
        qweight, qzeros, scales = (tensors.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales"))
        tensors.pop(f"{name}.g_idx", None)
        bits = qweight.shape[0] // math.ceil(in_f / 32)
        n_groups = scales.shape[0]
        group = in_f // n_groups if n_groups > 1 else -1
        q = QuantLinear(in_f, out_f, bits, group, bias=lin.bias is not None, dtype=dtype)
        q.qweight, q.scales = qweight, scales.to(torch.float16)
        q.qzeros = _shift_zeros(qzeros, bits, -offset) if offset else qzeros
        if lin.bias is not None:
            q.bias = tensors.pop(f"{name}.bias").to(dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(rest, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight.device.type == "meta":
            out.weight = inp.weight
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise LowbitError(f"{path} lacks weights for {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    model.eval()
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # a checkpoint without tokenizer files is still a model
        pass
    return model, tokenizer


def to_float(model) -> dict[str, QuantizedWeight]:
    """Swap every QuantLinear back for an nn.Linear holding its dequantized weight; returns the
    codes of each (for re-export)."""
    from lowbit.qdq.pack import unpack_gptq

    layers = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        codes, zero, scale = unpack_gptq(
            {"qweight": m.qweight, "qzeros": m.qzeros, "scales": m.scales}, m.bits, m.group_size, m.in_features, m.out_features
        )
        group = m.group_size if m.group_size < m.in_features else -1
        sym = bool((zero == 2 ** (m.bits - 1)).all())
        q = QuantizedWeight(codes, scale, zero, m.bits, group, sym)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)
        layers[name] = q
    return layers
