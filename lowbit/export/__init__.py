"""Writing a quantized model in the formats other tools load, and reading back the ones lowbit
can load.

    export(result, "out", "auto_round,gguf:q4_0")

One format is written into the output folder itself; several go into one subfolder each
(out/auto_round, out/gguf-q4_0). All of it is written into a temporary sibling folder that is
renamed at the end, so a crash never leaves a folder that looks complete.

Each format is a class in its own module (base.py says what it implements); FORMATS below is the
registry. Adding a format is one new module plus its line here.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from lowbit.errors import LowbitError
from lowbit.export.base import MAX_SHARD_SIZE, Format, Layout, Writer
from lowbit.export.compressed import CompressedTensors
from lowbit.export.fake import Fake, check_out_dir
from lowbit.export.gguf import GGUF
from lowbit.export.packed import GPTQ, AutoRound
from lowbit.quantized import QuantizeResult

FORMATS: dict[str, type[Format]] = {f.name: f for f in (Fake, AutoRound, GPTQ, CompressedTensors, GGUF)}


def parse_formats(spec) -> list[Format]:
    """'auto_round,gguf:q4_k' -> [AutoRound(), GGUF('q4_k')]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, Format):
            out.append(item)
            continue
        name, _, option = item.strip().lower().replace("-", "_").partition(":")
        cls = FORMATS.get(name)
        if cls is None:
            raise LowbitError(f"unknown format {item!r}; formats: {', '.join(FORMATS)}")
        if option and not cls.options:
            raise LowbitError(f"format {name} takes no option (got {item!r})")
        if option and option not in cls.options:
            raise LowbitError(f"unknown {cls.__name__} type {option!r}; types: {', '.join(cls.options)}")
        out.append(cls(option or None))
    if not out:
        raise LowbitError("no format given")
    if len({f.tag for f in out}) != len(out):
        raise LowbitError(f"a format is named twice in {spec!r}")
    return out


def check_formats(formats: list[Format], schemes, model_type: str | None = None) -> None:
    """Refuse, before any work starts, a scheme or a model a format cannot store. schemes: the
    distinct Schemes the model's layers will get."""
    for f in formats:
        for s in schemes:
            reason = f.check(s)
            if reason:
                raise LowbitError(reason)
        reason = f.check_model(model_type)
        if reason:
            raise LowbitError(reason)


def export(result: QuantizeResult, out_dir: str, formats="fake", overwrite: bool = False,
           max_shard_size: int = MAX_SHARD_SIZE) -> str:
    """Write `result` in each format (weights in safetensors shards of at most max_shard_size
    bytes); returns the output folder."""
    formats = parse_formats(formats)
    check_out_dir(out_dir, overwrite)
    check_formats(formats, {q.scheme for q in result.layers.values()}, getattr(result.model.config, "model_type", None))
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
            fmt.write(result, folder, max_shard_size)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_fake(result: QuantizeResult, out_dir: str, overwrite: bool = False) -> str:
    return export(result, out_dir, "fake", overwrite)


def detect_format(folder: str) -> type[Format] | None:
    """The format lowbit can load that `folder` holds, or None (a plain model folder)."""
    return next((f for f in FORMATS.values() if f.loads and f.detect(folder)), None)


def read_quantized(folder: str) -> QuantizeResult:
    """A QuantizeResult from a folder lowbit wrote in a format it reads back (fake, auto_round,
    gptq or compressed_tensors), for re-export: the model holds dequantized float weights, `layers` the codes."""
    folder = model_folder(folder)
    fmt = detect_format(folder)
    if fmt is None:
        readable = ", ".join(n for n, f in FORMATS.items() if f.loads)
        raise LowbitError(f"{folder} holds no quantized model lowbit can re-export ({readable})")
    return fmt.read(folder)


def model_folder(folder: str) -> str:
    """The model folder in `folder`: itself, or for the parent folder of a multi-format export its
    `fake` subfolder (else the only one lowbit loads)."""
    if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    subs = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "config.json")))
    loadable = [d for d in subs if detect_format(os.path.join(folder, d)) is not None]
    if "fake" in loadable:
        return os.path.join(folder, "fake")
    if len(loadable) == 1:
        return os.path.join(folder, loadable[0])
    if loadable:
        raise LowbitError(f"{folder} holds several model folders ({', '.join(loadable)}): name one")
    return folder


def load(folder: str):
    """(model, tokenizer) of a local folder: a packed checkpoint with lowbit's QuantLinear (weights
    stay packed), a compressed-tensors folder, a fake folder or an original model as plain
    transformers models. The parent folder of a multi-format export loads its fake subfolder."""
    from lowbit.model import load_model

    folder = model_folder(folder)
    fmt = detect_format(folder)
    return fmt.load(folder) if fmt is not None else load_model(folder)


__all__ = ["FORMATS", "Format", "Layout", "Writer", "MAX_SHARD_SIZE", "parse_formats", "check_formats", "export", "save_fake", "read_quantized",
           "detect_format", "model_folder", "load"]
