"""Writing a quantized model in the formats other tools load.

    export(result, "out", "auto_round,gguf:q4_0")

One format is written into the output folder itself; several go into one subfolder each
(out/auto_round, out/gguf-q4_0). All of it is written into a temporary sibling folder that is
renamed at the end, so a crash never leaves a folder that looks complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.export.fake import check_out_dir, read_fake_layers, write_fake

FORMATS = ("fake", "auto_round", "gptq", "gguf")
GGUF_TYPES = {  # qtype -> (bits, block size the groups must be a multiple of, sym) for an exact copy
    "q4_0": (4, 32, True),
    "q8_0": (8, 32, True),
    "q4_k": (4, None, None),  # requantized to llama.cpp's 6-bit sub-block scales: any 4-bit scheme
    "f16": None,
    "f32": None,
}


@dataclass(frozen=True)
class Format:
    name: str
    option: str | None = None

    @property
    def tag(self) -> str:
        return f"{self.name}-{self.option}" if self.option else self.name


def parse_formats(spec) -> list[Format]:
    """'auto_round,gguf:q4_k' -> [Format('auto_round'), Format('gguf', 'q4_k')]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, Format):
            out.append(item)
            continue
        name, _, option = item.strip().lower().replace("-", "_").partition(":")
        if name not in FORMATS:
            raise LowbitError(f"unknown format {item!r}; formats: {', '.join(FORMATS)}")
        if name == "gguf":
            option = option or "q4_0"
            if option not in GGUF_TYPES:
                raise LowbitError(f"unknown GGUF type {option!r}; types: {', '.join(GGUF_TYPES)}")
        elif option:
            raise LowbitError(f"format {name} takes no option (got {item!r})")
        out.append(Format(name, option or None))
    if not out:
        raise LowbitError("no format given")
    if len({f.tag for f in out}) != len(out):
        raise LowbitError(f"a format is named twice in {spec!r}")
    return out


def check_formats(formats: list[Format], schemes, model_type: str | None = None) -> None:
    """Refuse, before any work starts, a scheme a format cannot store. schemes: the distinct
    Schemes (or dicts with bits/group_size/sym) the model's layers will get."""
    from lowbit.export.packed import PACKED_BITS

    schemes = [s if isinstance(s, dict) else {"bits": s.bits, "group_size": s.group_size, "sym": s.sym} for s in schemes]
    for f in formats:
        for s in schemes:
            if f.name in ("auto_round", "gptq") and s["bits"] not in PACKED_BITS:
                raise LowbitError(f"format {f.name} has no {s['bits']}-bit layout; it packs {', '.join(map(str, PACKED_BITS))} bits")
            if f.name == "gguf" and GGUF_TYPES[f.option] is not None:
                bits, group, sym = GGUF_TYPES[f.option]
                name = f"gguf:{f.option}"
                if s["bits"] != bits:
                    raise LowbitError(f"{name} stores {bits}-bit weights, the scheme has {s['bits']} bits")
                if group is not None and s["group_size"] != -1 and s["group_size"] % group:
                    raise LowbitError(f"{name} needs groups of a multiple of {group} (or per channel), "
                                      f"the scheme has {s['group_size']}")
                if sym is not None and s["sym"] != sym:
                    raise LowbitError(f"{name} is symmetric only; the scheme is asymmetric (use gguf:q4_k)")
        if f.name == "gguf" and model_type is not None and model_type != "llama":
            raise LowbitError(f"GGUF export supports the llama architecture, not {model_type}")


def _write(fmt: Format, result, folder: str) -> None:
    if fmt.name == "fake":
        write_fake(result.model, result.tokenizer, result.layers, result.report, folder)
    elif fmt.name in ("auto_round", "gptq"):
        from lowbit.export.packed import write_packed

        write_packed(result, folder, fmt.name)
    elif fmt.name == "gguf":
        from lowbit.export.gguf import write_gguf

        os.makedirs(folder, exist_ok=True)
        write_gguf(result.model, result.tokenizer, result.layers, os.path.join(folder, f"model-{fmt.option}.gguf"), fmt.option)


def export(result, out_dir: str, formats="fake", overwrite: bool = False) -> str:
    """Write `result` (a QuantizeResult) in each format; returns the output folder."""
    formats = parse_formats(formats)
    check_out_dir(out_dir, overwrite)
    check_formats(formats, [{"bits": q.bits, "group_size": q.group_size, "sym": q.sym} for q in result.layers.values()],
                  getattr(result.model.config, "model_type", None))
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lowbit-tmp-", dir=os.path.dirname(out_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would survive the rename
    try:
        for fmt in formats:
            folder = tmp if len(formats) == 1 else os.path.join(tmp, fmt.tag)
            os.makedirs(folder, exist_ok=True)
            _write(fmt, result, folder)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_fake(result, out_dir: str, overwrite: bool = False) -> str:
    return export(result, out_dir, "fake", overwrite)


def read_quantized(folder: str):
    """A QuantizeResult from a folder lowbit wrote (fake, auto_round or gptq), for re-export:
    the model holds dequantized float weights, `layers` the codes."""
    import json

    from lowbit.model import load_model
    from lowbit.pipeline import QuantizeResult

    if os.path.isfile(os.path.join(folder, "quantized_weights.safetensors")):
        model, tokenizer = load_model(folder)
        with open(os.path.join(folder, "quantization.json")) as f:
            report = json.load(f)
        return QuantizeResult(model, tokenizer, read_fake_layers(folder), report)
    from lowbit.runtime.load import is_packed, load_packed, to_float

    if not is_packed(folder):
        raise LowbitError(f"{folder} holds no quantized model lowbit can re-export (fake, auto_round or gptq)")
    model, tokenizer = load_packed(folder)
    layers = to_float(model)
    report = {"layers": {n: {"bits": q.bits, "group_size": q.group_size, "sym": q.sym} for n, q in layers.items()},
              "source": folder}
    return QuantizeResult(model, tokenizer, layers, report)


__all__ = ["FORMATS", "Format", "parse_formats", "check_formats", "export", "save_fake", "read_quantized"]
