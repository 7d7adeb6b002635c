"""Top-level helpers that take folders: load a (quantized) model, evaluate it."""
from __future__ import annotations

import os

from lowbit.calib import read_text, tokenize
from lowbit.eval.perplexity import perplexity
from lowbit.progress import Progress


def context_length(model, default: int = 2048) -> int:
    return getattr(model.config, "max_position_embeddings", default) or default


def load(path: str):
    """(model, tokenizer) of a local folder: an original model, lowbit's fake format, or an
    auto_round / gptq checkpoint (loaded with lowbit's QuantLinear: weights stay packed)."""
    from lowbit.export import load as load_folder

    return load_folder(path)


def evaluate(model, text_file: str, *, tokenizer=None, seqlen: int = 2048, max_windows: int | None = None,
             progress: bool = False) -> dict:
    """Perplexity of a model (a module or a folder) on a text file: {"ppl", "nll", "windows", "tokens"}."""
    if isinstance(model, str):
        model, tokenizer = load(model)
    seqlen = min(seqlen, context_length(model))
    tokens = tokenize(tokenizer, read_text(text_file))
    n = len(tokens) // seqlen if max_windows is None else min(len(tokens) // seqlen, max_windows)
    with Progress(f"perplexity on {os.path.basename(text_file)}", total=n, enabled=progress, unit="windows") as p:
        return perplexity(model, tokens=tokens, seqlen=seqlen, max_windows=max_windows, on_batch=p.update)
