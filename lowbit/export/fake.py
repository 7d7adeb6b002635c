"""The "fake" format: a plain Hugging Face folder with the dequantized weights, which transformers
loads as is, plus quantization.json (what was done) and the integer codes, scales and zero points
(quantized_weights.safetensors) so packed formats can be written later without re-tuning."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from safetensors.torch import save_file

from lowbit.errors import LowbitError


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse an existing output folder before any work starts (unless overwrite)."""
    if os.path.exists(out_dir) and not overwrite:
        raise LowbitError(f"output folder already exists: {out_dir} (use --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):  # missing parents are created when writing
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise LowbitError(f"cannot create the output folder under {parent}")


def save_fake(result, out_dir: str, overwrite: bool = False) -> str:
    """Write the folder atomically: into a temporary sibling, renamed at the end."""
    check_out_dir(out_dir, overwrite)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lowbit-tmp-", dir=os.path.dirname(out_dir))
    try:
        result.model.save_pretrained(tmp)
        if result.tokenizer is not None:
            result.tokenizer.save_pretrained(tmp)
        tensors = {}
        for name, q in result.layers.items():
            tensors[f"{name}.codes"] = q.codes.contiguous()
            tensors[f"{name}.scale"] = q.scale.float().contiguous()
            tensors[f"{name}.zero"] = q.zero.to(q.codes.dtype).contiguous()
        save_file(tensors, os.path.join(tmp, "quantized_weights.safetensors"))
        with open(os.path.join(tmp, "quantization.json"), "w") as f:
            json.dump({"format": "fake", **result.report}, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
