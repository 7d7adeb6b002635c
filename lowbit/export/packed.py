"""GPTQ-layout checkpoints: the `auto_round` and `gptq` formats, written and loaded back.

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

Loading builds the model on the meta device and gives each packed layer a QuantLinear, so no
full-size float weight is ever allocated: memory is the packed tensors plus the float ones.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import torch
from torch import nn

from lowbit.checkpoint import Checkpoint, ShardWriter
from lowbit.errors import LowbitError
from lowbit.experts import checkpoint_name, model_name, split_experts
from lowbit.export.base import Format, Layout, Writer
from lowbit.export.fake import save_config
from lowbit.model import materialize_buffers
from lowbit.version import __version__
from lowbit.qdq import n_groups
from lowbit.qdq.pack import PACKED_BITS, pack_gptq, pack_rows, unpack_gptq
from lowbit.quantized import QuantizedWeight, QuantizeResult
from lowbit.runtime.quant_linear import QuantLinear, unpack_words
from lowbit.schemes import Scheme


def dense_reason(scheme: Scheme, shape) -> str | None:
    """Why a layer cannot be packed for standard kernels (None when it can)."""
    out_f, in_f = shape
    if in_f % 32 or out_f % 32:
        return f"shape {out_f}x{in_f} is not a multiple of 32"
    if scheme.group_size > 0 and in_f % scheme.group_size:
        return f"group size {scheme.group_size} does not divide {in_f} inputs"
    return None


def _setting(s: Scheme) -> dict:
    return {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}


def quantization_config(fmt: str, schemes: dict[str, Scheme], shapes: dict, blocks_name: str) -> dict:
    """config.json's quantization_config for layers {name: scheme} of shapes {name: (out, in)}:
    the most frequent setting is the global one, others become overrides."""
    packed = {n: s for n, s in schemes.items() if dense_reason(s, shapes[n]) is None}
    dense = sorted(n for n in schemes if n not in packed)
    counts = Counter((s.bits, s.group_size, s.sym) for s in (packed or schemes).values())
    bits, group, sym = counts.most_common(1)[0][0] if counts else (4, 128, True)
    all_sym = all(s.sym for s in packed.values())
    others = {n: _setting(s) for n, s in packed.items() if (s.bits, s.group_size, s.sym) != (bits, group, sym)}
    if fmt == "auto_round":
        extra = others | {n: {"bits": 16, "data_type": "float"} for n in dense}
        cfg = {
            "quant_method": "auto-round",
            "packing_format": "auto_round:auto_gptq" if all_sym else "auto_round",
            "bits": bits, "group_size": group, "sym": sym, "data_type": "int", "act_bits": 16,
            "block_name_to_quantize": blocks_name,
        }
        if extra:
            cfg["extra_config"] = extra
    else:
        dynamic = {f"+:^{re.escape(n)}$": s for n, s in others.items()} | {f"-:^{re.escape(n)}$": {} for n in dense}
        cfg = {
            "quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
            "desc_act": False, "true_sequential": True, "static_groups": False,
            "checkpoint_format": "gptq" if all_sym else "gptq_v2",
        }
        if dynamic:
            cfg["dynamic"] = dynamic
    cfg["quant_tool"] = f"lowbit {__version__}"
    return cfg


def zero_offset(config: dict) -> int:
    """What was added to the zero points on disk: -1 for GPTQ v1 conventions, else 0."""
    if config.get("quant_method") == "auto-round":
        return -1 if "gptq" in config.get("packing_format", "auto_round:auto_gptq") else 0
    if config.get("quant_method") == "gptq":
        return 0 if config.get("checkpoint_format", "gptq") == "gptq_v2" else -1
    return 0


def layer_scheme(config: dict, name: str) -> Scheme | None:
    """The scheme a checkpoint's config gives layer `name`: its override, else the global one;
    None for a layer the config keeps in float."""
    s = {"bits": config["bits"], "group_size": config["group_size"], "sym": config.get("sym", True)}
    if config.get("quant_method") == "auto-round":
        extra = config.get("extra_config", {}).get(name, {})
        if extra.get("bits", s["bits"]) >= 16:
            return None
        s |= {k: extra[k] for k in ("bits", "group_size", "sym") if k in extra}
    else:
        for pattern, override in config.get("dynamic", {}).items():
            sign, _, regex = pattern.partition(":") if pattern[:2] in ("+:", "-:") else ("+", "", pattern)
            if re.match(regex, name):
                if sign == "-":
                    return None
                s |= {k: override[k] for k in ("bits", "group_size", "sym") if k in override}
                break
    return Scheme(int(s["bits"]), int(s["group_size"]), bool(s["sym"]))


def packed_tensors(name: str, q: QuantizedWeight, offset: int, g_idx: bool) -> dict[str, torch.Tensor]:
    t = {f"{name}.{k}": v for k, v in pack_gptq(q.codes, q.zero + offset, q.scale, q.bits).items()}
    if not g_idx:
        return t
    in_f = q.codes.shape[1]
    g = q.group_size if q.group_size > 0 else in_f
    t[f"{name}.g_idx"] = (torch.arange(in_f, dtype=torch.int32) // g)
    return t


class ConfiguredWriter(Writer):
    """The writers of formats whose config.json carries a quantization_config: model*.safetensors,
    then config.json (in `dtype`) and quantization.json. Subclasses set folder, layout, fmt,
    dtype, config, model (a ShardWriter) and implement add."""

    def commit(self):
        return self.model.commit()

    def close(self, report):
        self.model.close()
        save_config(self.layout, self.folder, self.dtype, {"quantization_config": self.config})
        with open(os.path.join(self.folder, "quantization.json"), "w") as f:
            json.dump({"format": self.fmt, **report}, f, indent=2, default=str)


class PackedWriter(ConfiguredWriter):
    """model*.safetensors with X.qweight / X.qzeros / X.scales (/ X.g_idx) for each packed layer,
    every other float tensor in float16 (bfloat16 when the original is bfloat16)."""

    def __init__(self, folder: str, layout: Layout, fmt: str, state: dict | None = None):
        self.folder, self.layout, self.fmt = folder, layout, fmt
        self.config = quantization_config(fmt, layout.schemes, layout.shapes, layout.blocks_name)
        self.offset = zero_offset(self.config)
        self.dtype = torch.bfloat16 if layout.dtype == torch.bfloat16 else torch.float16
        self.model = (ShardWriter(folder, "model", layout.max_shard_size) if state is None
                      else ShardWriter.resume(folder, state))

    def add(self, name, tensor, q):
        if q is not None and dense_reason(q.scheme, q.shape) is None:
            layer = name.removesuffix(".weight")
            for k, v in packed_tensors(layer, q, self.offset, g_idx=self.fmt == "gptq").items():
                self.model.add(k, v)
            return
        self.model.add(name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)


# ---------------------------------------------------------------------------------------------
# loading


def checkpoint_config(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("quantization_config")
    except (OSError, ValueError):
        return None


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model*.safetensors checkpoint in `path` (sharded or not), by name."""
    ckpt = Checkpoint(path)
    return {n: ckpt.get(n) for n in ckpt.names}


def _shift_zeros(qzeros: torch.Tensor, bits: int, delta: int) -> torch.Tensor:
    z = unpack_words(qzeros, bits, 1) + delta
    return pack_rows(z.clamp(0, (1 << bits) - 1), bits, dim=1)


def _quant_linear(name: str, lin: nn.Linear, tensors: dict, qcfg: dict, dtype, cfg_name: str) -> QuantLinear:
    """The QuantLinear for model layer `name` (cfg_name in the checkpoint's config)."""
    in_f, out_f = lin.in_features, lin.out_features
    qweight, qzeros, scales = (tensors.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales"))
    tensors.pop(f"{name}.g_idx", None)
    declared = layer_scheme(qcfg, cfg_name)
    bits = qweight.shape[0] // math.ceil(in_f / 32)
    if declared is None or declared.bits != bits or n_groups(in_f, declared.group_size) != scales.shape[0]:
        raise LowbitError(f"{name}: the packed tensors do not match the scheme the config declares")
    q = QuantLinear(in_f, out_f, bits, declared.group_size, bias=lin.bias is not None, dtype=dtype, sym=declared.sym)
    offset = zero_offset(qcfg)
    q.qweight, q.scales = qweight, scales.to(torch.float16)
    q.qzeros = _shift_zeros(qzeros, bits, -offset) if offset else qzeros
    if lin.bias is not None:
        q.bias = tensors.pop(f"{name}.bias").to(dtype)
    return q


def finish_loading(model, config, tensors: dict, path: str, dtype: torch.dtype):
    """Give a model built on the meta device its remaining float tensors (in dtype), re-tie a
    tied output embedding, refuse a checkpoint that leaves any weight out; the folder's tokenizer
    (None without one)."""
    import transformers

    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(rest, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight.device.type == "meta":
            out.weight = inp.weight
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise LowbitError(f"{path} lacks weights for {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    materialize_buffers(model)
    model.eval()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # a checkpoint without tokenizer files is still a model
        return None


def load_packed(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with a QuantLinear for every packed layer of an auto_round/gptq folder."""
    import transformers

    qcfg = checkpoint_config(path)
    if not qcfg or qcfg.get("quant_method") not in ("auto-round", "gptq"):
        raise LowbitError(f"{path} is not an auto_round or gptq checkpoint")
    if qcfg.get("desc_act"):
        raise LowbitError(f"{path}: act-order (desc_act) checkpoints are not supported")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # built as a plain model; the layers are swapped below
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    split_experts(model)
    tensors = {model_name(config.model_type, k): v for k, v in read_tensors(path).items()}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _quant_linear(name, model.get_submodule(name), tensors, qcfg, dtype,
                                                                 checkpoint_name(config.model_type, name)))
    return model, finish_loading(model, config, tensors, path, dtype)


def to_float(model) -> dict[str, QuantizedWeight]:
    """Swap every QuantLinear back for an nn.Linear holding its dequantized weight; returns the
    codes of each (for re-export)."""
    layers = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        codes, zero, scale = unpack_gptq(
            {"qweight": m.qweight, "qzeros": m.qzeros, "scales": m.scales}, m.bits, m.group_size, m.in_features, m.out_features
        )
        q = QuantizedWeight(m.scheme, codes, scale, zero)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)
        layers[name] = q
    return layers


class _Packed(Format):
    loads = True
    quant_method = ""

    def check(self, scheme):
        if scheme.dtype != "int":
            return f"format {self.name} stores integer weights, not {scheme.dtype} ({scheme.name}); use --format fake"
        if scheme.act is not None:
            return (f"format {self.name} stores weight-only schemes; {scheme.name} quantizes inputs to "
                    f"{scheme.act}; use --format fake")
        if scheme.bits not in PACKED_BITS:
            return f"format {self.name} has no {scheme.bits}-bit layout; it packs {', '.join(map(str, PACKED_BITS))} bits"
        return None

    def open(self, folder, layout, state=None):
        return PackedWriter(folder, layout, self.name, state)

    @classmethod
    def detect(cls, folder):
        cfg = checkpoint_config(folder)
        return bool(cfg) and cfg.get("quant_method") == cls.quant_method

    @classmethod
    def load(cls, folder):
        return load_packed(folder)

    @classmethod
    def read(cls, folder):
        model, tokenizer = load_packed(folder)
        layers = to_float(model)
        report = {"layers": {n: q.scheme.to_dict() for n, q in layers.items()}, "source": folder}
        return QuantizeResult(model, tokenizer, layers, report)


class AutoRound(_Packed):
    name, quant_method = "auto_round", "auto-round"
    loaded_by = "transformers with auto-round, vLLM, lowbit eval"


class GPTQ(_Packed):
    name, quant_method = "gptq", "gptq"
    loaded_by = "GPTQModel, vLLM, lowbit eval"
