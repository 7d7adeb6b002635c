"""Perplexity, the standard protocol: tokenize the whole text, cut it into non-overlapping windows
of seqlen tokens, average the next-token NLL over all windows, exp."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowbit.calib import tokenize
from lowbit.errors import LowbitError


@torch.no_grad()
def perplexity(
    model,
    tokenizer=None,
    text: str | None = None,
    *,
    tokens: torch.Tensor | None = None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 8,
    device=None,
    on_batch=None,
) -> dict:
    """{"ppl", "nll", "windows", "tokens"} of `model` on `text` (a string) or `tokens` (1-D ids);
    on_batch(windows) is called after each batch (progress)."""
    if tokens is None:
        if text is None or tokenizer is None:
            raise LowbitError("perplexity needs a text and a tokenizer, or tokens")
        tokens = tokenize(tokenizer, text)
    n = len(tokens) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise LowbitError(f"evaluation text too short: {len(tokens)} tokens, one window needs {seqlen}")
    windows = tokens[: n * seqlen].view(n, seqlen)
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
        if on_batch is not None:
            on_batch(len(ids))
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "windows": n, "tokens": count}

