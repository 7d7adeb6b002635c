"""The "fake" format: a plain Hugging Face folder with the dequantized weights, which transformers
loads as is, plus quantization.json (what was done) and the integer codes, scales and zero points
(quantized_weights.safetensors) so packed formats can be written later without re-tuning."""
from __future__ import annotations

import json
import os

from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.export.base import Format
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


def write_fake(model, tokenizer, layers, report: dict, folder: str) -> None:
    """Into an existing (temporary) folder: the HF model, codes/scales/zeros, quantization.json."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    tensors = {}
    for name, q in layers.items():
        tensors[f"{name}.codes"] = q.codes.contiguous()
        tensors[f"{name}.scale"] = q.scale.float().contiguous()
        if q.zero is not None:
            tensors[f"{name}.zero"] = q.zero.to(q.codes.dtype).contiguous()
    save_file(tensors, os.path.join(folder, "quantized_weights.safetensors"))
    with open(os.path.join(folder, "quantization.json"), "w") as f:
        json.dump({"format": "fake", **report}, f, indent=2)


def read_fake_layers(folder: str) -> dict[str, QuantizedWeight]:
    """The QuantizedWeights a fake folder stores (inverse of write_fake's tensors)."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "quantization.json")) as f:
        meta = json.load(f)["layers"]
    t = load_file(os.path.join(folder, "quantized_weights.safetensors"))
    out = {}
    for n, m in meta.items():
        zero = t.get(f"{n}.zero")
        out[n] = QuantizedWeight(Scheme.from_dict(m), t[f"{n}.codes"], t[f"{n}.scale"],
                                 zero.float() if zero is not None else None)
    return out


class Fake(Format):
    name, loads = "fake", True

    def check(self, scheme):
        return None

    def write(self, result, folder):
        write_fake(result.model, result.tokenizer, result.layers, result.report, folder)

    @classmethod
    def detect(cls, folder):
        return os.path.isfile(os.path.join(folder, "quantized_weights.safetensors"))

    @classmethod
    def load(cls, folder):
        from lowbit.model import load_model

        return load_model(folder)

    @classmethod
    def read(cls, folder):
        model, tokenizer = cls.load(folder)
        with open(os.path.join(folder, "quantization.json")) as f:
            report = json.load(f)
        return QuantizeResult(model, tokenizer, read_fake_layers(folder), report)
