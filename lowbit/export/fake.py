"""The "fake" format: a plain Hugging Face folder with the dequantized weights (sharded like any
checkpoint), which transformers loads as is, plus quantization.json (what was done) and the integer
codes, scales and zero points (quantized_weights*.safetensors) so packed formats can be written
later without re-tuning."""
from __future__ import annotations

import copy
import json
import os

import torch

from lowbit.activations import INPUT_SCALE, quantize_model_inputs
from lowbit.checkpoint import Checkpoint, ShardWriter
from lowbit.errors import LowbitError
from lowbit.experts import checkpoint_name
from lowbit.export.base import Format, Layout, Writer
from lowbit.quantized import QuantizedWeight, QuantizeResult
from lowbit.schemes import Scheme


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse an existing output folder before any work starts (unless overwrite)."""
    if os.path.exists(out_dir) and not overwrite:
        raise LowbitError(f"output folder already exists: {out_dir} (use --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):  # missing parents are created when writing
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise LowbitError(f"cannot create the output folder under {parent}")


def save_config(layout: Layout, folder: str, dtype: torch.dtype, extra: dict | None = None) -> None:
    """config.json (in `dtype`, plus `extra` keys), generation_config.json and the tokenizer."""
    config = copy.deepcopy(layout.config)
    config.dtype = dtype
    for k, v in (extra or {}).items():
        setattr(config, k, v)
    config.save_pretrained(folder)
    generation = getattr(layout.model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if layout.tokenizer is not None:
        layout.tokenizer.save_pretrained(folder)


class FakeWriter(Writer):
    """model*.safetensors: every tensor in the original's dtype (quantized layers dequantized);
    quantized_weights*.safetensors: each layer's codes, scale and zero points."""

    def __init__(self, folder: str, layout: Layout, state: dict | None = None):
        self.folder, self.layout = folder, layout
        if state is None:
            self.model = ShardWriter(folder, "model", layout.max_shard_size)
            self.codes = ShardWriter(folder, "quantized_weights", layout.max_shard_size)
        else:
            self.model = ShardWriter.resume(folder, state["model"])
            self.codes = ShardWriter.resume(folder, state["codes"])

    def add(self, name, tensor, q):
        self.model.add(name, tensor.to(self.layout.dtype) if tensor.is_floating_point() else tensor)
        if q is not None:
            layer = name.removesuffix(".weight")
            self.codes.add(f"{layer}.codes", q.codes)
            self.codes.add(f"{layer}.scale", q.scale.float())
            if q.zero is not None:  # zero points in the codes' dtype; offsets (k-quant mins) in float
                zero = q.zero.to(q.codes.dtype)
                self.codes.add(f"{layer}.zero", zero if torch.equal(zero.to(q.zero.dtype), q.zero) else q.zero.float())
            for key in sorted(q.extras):  # the data type's, and a calibrated input scale
                self.codes.add(f"{layer}.{key}", q.extras[key].float())

    def commit(self):
        return {"model": self.model.commit(), "codes": self.codes.commit()}

    def close(self, report):
        self.model.close()
        self.codes.close()
        save_config(self.layout, self.folder, self.layout.dtype)
        with open(os.path.join(self.folder, "quantization.json"), "w") as f:
            json.dump({"format": "fake", **report}, f, indent=2, default=str)


def read_fake_layers(folder: str) -> dict[str, QuantizedWeight]:
    """The QuantizedWeights a fake folder stores (inverse of FakeWriter's tensors)."""
    with open(os.path.join(folder, "quantization.json")) as f:
        meta = json.load(f)["layers"]
    with open(os.path.join(folder, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    t = Checkpoint(folder, "quantized_weights")
    out = {}
    for n, m in meta.items():
        c = checkpoint_name(model_type, n)
        zero = t.get(f"{c}.zero") if f"{c}.zero" in t else None
        scheme = Scheme.from_dict(m)
        keys = [*scheme.data_type.extra_names, *([INPUT_SCALE] if f"{c}.{INPUT_SCALE}" in t else [])]
        extras = {k: t.get(f"{c}.{k}") for k in keys}
        out[n] = QuantizedWeight(scheme, t.get(f"{c}.codes"), t.get(f"{c}.scale"),
                                 zero.float() if zero is not None else None, extras)
    return out


def input_types(folder: str) -> dict[str, str]:
    """{layer: activation type} of the layers of a fake folder whose inputs are quantized."""
    with open(os.path.join(folder, "quantization.json")) as f:
        layers = json.load(f).get("layers", {})
    return {n: m["act"] for n, m in layers.items() if m.get("act")}


def _input_scales(folder: str, acts: dict[str, str]) -> dict:
    """{layer: calibrated input scale} of the layers of a fake folder that have one."""
    if not acts:
        return {}
    with open(os.path.join(folder, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    t = Checkpoint(folder, "quantized_weights")
    keys = {n: f"{checkpoint_name(model_type, n)}.{INPUT_SCALE}" for n in acts}
    return {n: t.get(k) for n, k in keys.items() if k in t}


class Fake(Format):
    name, loads = "fake", True
    loaded_by = "transformers, lowbit eval"

    def check(self, scheme):
        return None

    def open(self, folder, layout, state=None):
        return FakeWriter(folder, layout, state)

    @classmethod
    def detect(cls, folder):
        return any(os.path.isfile(os.path.join(folder, f"quantized_weights.safetensors{s}")) for s in ("", ".index.json"))

    @classmethod
    def load(cls, folder):
        """The model with its dequantized weights, its quantized inputs hooked back on."""
        from lowbit.model import load_model

        model, tokenizer = load_model(folder)
        acts = input_types(folder)
        quantize_model_inputs(model, acts, _input_scales(folder, acts))
        return model, tokenizer

    @classmethod
    def read(cls, folder):
        model, tokenizer = cls.load(folder)
        with open(os.path.join(folder, "quantization.json")) as f:
            report = json.load(f)
        return QuantizeResult(model, tokenizer, read_fake_layers(folder), report)
