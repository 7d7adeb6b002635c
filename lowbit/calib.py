"""Calibration data: text from a local file (or a datasets name) -> token windows."""
from __future__ import annotations

import hashlib
import json
import os

import torch

from lowbit.errors import LowbitError


def check_source(source: str, what: str = "calibration text") -> None:
    """Refuse, before any model is loaded, a text file that is missing, a folder, unreadable or
    empty (errors name the file). A name that is no path is left to the datasets library."""
    if os.path.isdir(source):
        raise LowbitError(f"{what} {source} is a folder, not a file")
    if not os.path.exists(source):
        if os.sep in source or source.endswith((".txt", ".jsonl", ".parquet", ".json")):
            raise LowbitError(f"{what} not found: {source}")
        return
    try:
        with open(source, "rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        raise LowbitError(f"cannot read {what} {source}: {e.strerror or e}") from None
    if not head.strip():
        raise LowbitError(f"{what} {source} is empty")


def read_text(source: str, text_field: str = "text") -> str:
    """The text of a .txt file, the "text" field of each .jsonl line or .parquet row (joined by
    blank lines), or of a datasets name ("name" or "name:config", split train) when online."""
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext == ".jsonl":
            return _read_jsonl(source, text_field)
        if ext == ".parquet":
            return _read_parquet(source, text_field)
        with open(source, encoding="utf-8", errors="replace") as f:
            return f.read()
    if "\n" in source or len(source) > 1024:
        raise LowbitError(f"calibration source is a string of {len(source)} characters, not a file path or dataset "
                          "name (pass the file's path, or token windows)")
    if os.sep in source or source.endswith((".txt", ".jsonl", ".parquet", ".json")):
        raise LowbitError(f"calibration file not found: {source}")
    return _read_hub_dataset(source, text_field)


def _read_jsonl(path: str, field: str) -> str:
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise LowbitError(f"{path}:{i}: not valid JSON") from None
            if not isinstance(row, dict) or field not in row:
                raise LowbitError(f"{path}:{i}: no {field!r} field")
            docs.append(str(row[field]))
    return "\n\n".join(docs)


def _read_parquet(path: str, field: str) -> str:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LowbitError("reading .parquet needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    if field not in table.column_names:
        raise LowbitError(f"{path}: no {field!r} column (columns: {', '.join(table.column_names)})")
    return "\n\n".join(str(t) for t in table.column(field).to_pylist())


def _read_hub_dataset(name: str, field: str) -> str:
    try:
        import datasets
    except ImportError:
        raise LowbitError(f"{name!r} is not a file, and loading datasets by name needs: pip install datasets") from None
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as e:
        raise LowbitError(f"cannot load dataset {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return "\n\n".join(ds[field][:10000])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D stream of token ids (no special tokens)."""
    if not text.strip():
        raise LowbitError("the text is empty")
    from transformers.utils import logging

    # Tokenizing a long text warns that it exceeds the model's context: we cut it into windows.
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        logging.set_verbosity(level)
    return torch.tensor(ids, dtype=torch.long)


def make_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """nsamples non-overlapping windows of seqlen tokens, chosen at random (seeded) among all."""
    if nsamples < 1 or seqlen < 1:
        raise LowbitError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    available = len(tokens) // seqlen
    if available < nsamples:
        raise LowbitError(
            f"calibration text too short: {len(tokens)} tokens make {available} windows of {seqlen}, "
            f"{nsamples} requested (lower nsamples or seqlen, or give more text)"
        )
    grid = tokens[: available * seqlen].view(available, seqlen)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(available, generator=g)[:nsamples].sort().values
    return grid[pick].clone()


def calibration_windows(tokenizer, source, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Windows [nsamples, seqlen] from a file path or datasets name, or ready token windows."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.numel() == 0:
            raise LowbitError(f"token windows must be a non-empty 2-D tensor [n, seqlen], got shape {tuple(source.shape)}")
        return source.long()
    if not isinstance(source, (str, os.PathLike)):
        raise LowbitError(f"calibration data must be a file path, a dataset name or a token tensor, got {type(source).__name__}")
    return make_windows(tokenize(tokenizer, read_text(str(source))), nsamples, seqlen, seed)


def windows_hash(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
