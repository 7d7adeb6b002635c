"""Attention for SignRound's tuning steps on a CPU with fast bfloat16 (AVX512-BF16 / AMX).

At tuning shapes (a few hundred tokens, small heads) torch's fused CPU attention kernel computes
in float32 whatever the input, and its backward recomputes the softmax: it costs more than three
plain bf16 batched matmuls with the scores kept (bench/cpu_speed.py measures both). While a block is
tuned, `bf16_attention(block)` points the block's attention modules that use transformers' "sdpa"
at `ATTENTION_NAME`, registered with transformers' AttentionInterface: `attention` below for CPU
inputs whose score matrix is small enough to hold, transformers' own SDPA for everything else.
Nothing outside the block's configs is changed, and they are restored on exit.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch

# Beyond this many attention scores per call (batch x heads x queries x keys) torch's kernel,
# which never holds them all, is used instead: the scores and their softmax are kept for backward,
# and past a few tens of millions of them the plain matmuls stop winning.
MAX_SCORES = 32 * 1024 * 1024
CAUSAL_CHUNKS = 2
ATTENTION_NAME = "lowbit_cpu_bf16"


def attention_context(dtype: torch.dtype | None, device: torch.device, block: torch.nn.Module):
    """bf16_attention(block) for a bf16 block on the CPU, else nothing."""
    return bf16_attention(block) if dtype == torch.bfloat16 and device.type == "cpu" else nullcontext()


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: query [B, H, L, D], key/value [B, Hkv, S, D];
    returns ([B, L, H, D], None), as its "sdpa" does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.device.type != "cpu" or dropout > 0 or not _small(query, key)
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    out = attention(query, key, value, attention_mask, causal, scaling)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, hf_attention)


@contextmanager
def bf16_attention(block: torch.nn.Module):
    """Within, the block's modules whose config selects "sdpa" select `hf_attention` instead.
    The same module-level function each time, so a compiled step traced under it stays valid for
    every block."""
    _register()
    configs = {id(c): c for m in block.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_attn_implementation_internal", None) == "sdpa"}
    for c in configs.values():
        c._attn_implementation_internal = ATTENTION_NAME  # the attribute itself: no recursion into sub-configs
    try:
        yield
    finally:
        for c in configs.values():
            c._attn_implementation_internal = "sdpa"


def _small(query, key) -> bool:
    return query.shape[:-2].numel() * query.shape[-2] * key.shape[-2] <= MAX_SCORES


def attention(query, key, value, attn_mask=None, is_causal=False, scale=None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in bf16, the output in the query's dtype. query [..., H, L, D];
    key/value [..., Hkv, S, D] with H a multiple of Hkv (grouped-query heads share a key/value head,
    as repeat_interleave would give them, without copying it). attn_mask: bool (True = attend) or
    additive, broadcastable to [..., H, L, S]."""
    dtype, bf = query.dtype, torch.bfloat16
    *lead, h, length, d = query.shape
    hk, s = key.shape[-3], key.shape[-2]
    rep = h // hk
    scale = scale if scale is not None else d**-0.5
    q, k, v = query.to(bf), key.to(bf), value.to(bf)
    if attn_mask is None:
        # The heads sharing a key/value head become one taller matrix of queries: [B*Hkv, rep*L, D].
        n = torch.Size(lead).numel() * hk
        q, k, v = q.reshape(n, rep, length, d), k.reshape(n, s, d), v.reshape(n, s, d)
        # Causal: queries in chunks, each against the keys up to its last position only. Two chunks
        # skip a quarter of the scores (all masked) and keep each softmax small enough to stay in
        # cache; more chunks cost more in calls than they save.
        chunked = is_causal and length == s
        chunks = max(1, min(CAUSAL_CHUNKS, length // 64)) if chunked else 1
        bounds = [length * i // chunks for i in range(chunks + 1)]
        outs = []
        for a, b in zip(bounds, bounds[1:]):
            end = b if chunked else s
            qc = q[:, :, a:b].reshape(n, rep * (b - a), d)
            out, _ = _attention_chunk(qc, k[:, :end], v[:, :end], a, is_causal, rep, scale)
            outs.append(out.view(n, rep, b - a, d))
        out = outs[0] if chunks == 1 else torch.cat(outs, dim=2)
        return out.view(*lead, h, length, d).to(dtype)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=bf, device=attn_mask.device).masked_fill_(~attn_mask, float("-inf"))
    scores = (q * scale) @ k.transpose(-1, -2) + attn_mask.to(bf)
    if is_causal:
        scores = scores + _causal_bias(0, length, s, 1, query.device)
    return (scores.softmax(-1) @ v).to(dtype)


# One opaque op per chunk, with its backward written out: torch.compile keeps it whole (it does not
# fuse matmuls into anything anyway) and traces the block around it without a graph break.
@torch.library.custom_op("lowbit::attention_chunk", mutates_args=())
def _attention_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, causal: bool, rep: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, rep*Lc, D] (rep heads' queries at positions start..start+Lc-1, stacked) against k, v
    [n, S, D]. Returns the output [n, rep*Lc, D] and the softmax [n, rep*Lc, S], kept for backward."""
    if causal:
        bias = _causal_bias(start, start + q.shape[1] // rep, k.shape[1], rep, q.device)
        # alpha scales in the matmul's fp32 accumulation: no pass over q, no rounding of q * scale
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    else:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    p = scores.softmax(-1)
    return torch.bmm(p, v), p


@_attention_chunk.register_fake
def _(q, k, v, start, causal, rep, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[0], q.shape[1], k.shape[1])


def _attention_chunk_setup(ctx, inputs, output):
    q, k, v, _, _, _, scale = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.scale = scale


def _attention_chunk_backward(ctx, d_out, _d_p):
    q, k, v, p = ctx.saved_tensors
    d_v = torch.bmm(p.transpose(1, 2), d_out)
    d_scores = torch.ops.aten._softmax_backward_data(torch.bmm(d_out, v.transpose(1, 2)), p, -1, p.dtype)
    d_q = torch.bmm(d_scores, k).mul_(ctx.scale)
    d_k = torch.bmm(d_scores.transpose(1, 2), q).mul_(ctx.scale)
    return d_q, d_k, d_v, None, None, None, None


_attention_chunk.register_autograd(_attention_chunk_backward, setup_context=_attention_chunk_setup)


@functools.lru_cache(maxsize=16)
def _causal_bias(a: int, b: int, s: int, rep: int, device: torch.device) -> torch.Tensor:
    """[rep*(b-a), S] additive bf16 mask for query positions a..b-1 (of each of rep stacked heads):
    query i sees keys <= i (upper-left aligned, as torch's is_causal)."""
    i = torch.arange(a, b, device=device)[:, None]
    bias = torch.zeros(b - a, s, device=device).masked_fill_(torch.arange(s, device=device) > i, float("-inf"))
    return bias.to(torch.bfloat16).repeat(rep, 1)
