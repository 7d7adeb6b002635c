"""Top-level helpers that take folders: load a (quantized) model, evaluate it."""
from __future__ import annotations

from lowbit.calib import read_text
from lowbit.eval.perplexity import perplexity


def context_length(model, default: int = 2048) -> int:
    return getattr(model.config, "max_position_embeddings", default) or default


def load(path: str):
    """(model, tokenizer) of a local folder: an original model, lowbit's fake format, or an
    auto_round / gptq checkpoint (loaded with lowbit's QuantLinear: weights stay packed)."""
    from lowbit.export import load as load_folder

    return load_folder(path)


def evaluate(model, text_file: str, *, tokenizer=None, seqlen: int = 2048, max_windows: int | None = None) -> dict:
    """Perplexity of a model (a module or a folder) on a text file: {"ppl", "nll", "windows", "tokens"}."""
    if isinstance(model, str):
        model, tokenizer = load(model)
    seqlen = min(seqlen, context_length(model))
    return perplexity(model, tokenizer, read_text(text_file), seqlen=seqlen, max_windows=max_windows)
