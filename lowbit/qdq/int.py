"""Integers with a zero point per group: the "int" data type.

Codes are stored unsigned in [0, 2^bits - 1] with a zero point, for both modes:

- asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale).
- symmetric "full range": the largest-magnitude weight of a group maps to -2^(b-1), so all 2^b
  levels are used; the scale carries the sign that makes this so, and zero = 2^(b-1).
"""
from __future__ import annotations

import math

import torch

from lowbit.qdq.base import DataType
from lowbit.qdq.groups import from_groups, round_ste, to_groups

EPS = 1e-9
SCALE_BITS = 16  # the packed checkpoints store one fp16 scale per group and output row


def group_range(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's min (<= 0) and max (>= 0), [..., 1]: the range before any shrinking."""
    return wg.amin(dim=-1, keepdim=True).clamp(max=0), wg.amax(dim=-1, keepdim=True).clamp(min=0)


def group_params(
    wg: torch.Tensor,
    bits: torch.Tensor | int,
    sym: bool,
    min_scale: torch.Tensor | None = None,
    max_scale: torch.Tensor | None = None,
    wrange: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group of wg [..., g]; shapes [..., 1].

    bits may be a tensor broadcastable to [..., 1] (several bit widths in one call).
    min_scale / max_scale shrink the group's range (SignRound's learnable factors), [..., 1].
    wrange: group_range(wg) if already known (wg is then not read).
    """
    wmin, wmax = wrange if wrange is not None else group_range(wg)
    bits = torch.as_tensor(bits, device=wmin.device, dtype=wmin.dtype)
    if min_scale is not None:
        wmin = wmin * min_scale
    if max_scale is not None:
        wmax = wmax * max_scale
    if sym:
        half = 2 ** (bits - 1)
        # The larger magnitude maps to -half: sign(scale) = -1 when max dominates.
        neg_dominates = -wmin >= wmax
        mag = torch.where(neg_dominates, -wmin, wmax).clamp(min=EPS)
        scale = torch.where(neg_dominates, mag, -mag) / half
        zero = torch.zeros_like(scale) + half
    else:
        scale = ((wmax - wmin) / (2**bits - 1)).clamp(min=EPS)
        zero = (-wmin / scale).round()
    return scale, zero


def fake_quantize_groups(
    wg: torch.Tensor,
    bits: torch.Tensor | int,
    sym: bool,
    v: torch.Tensor | None = None,
    min_scale: torch.Tensor | None = None,
    max_scale: torch.Tensor | None = None,
    wrange: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Quantize-dequantize grouped weights [..., g], differentiable (STE) in wg, v and the factors.

    v: rounding offset, same shape as wg (SignRound's V, kept in [-0.5, 0.5]).
    """
    bits_t = torch.as_tensor(bits, device=wg.device, dtype=wg.dtype)
    maxq = 2**bits_t - 1
    scale, zero = group_params(wg, bits_t, sym, min_scale, max_scale, wrange)
    x = wg / scale
    if v is not None:
        x = x + v
    q = (round_ste(x) + zero).clamp(min=0).clamp(max=maxq)
    return (q - zero) * scale


def fake_quantize_tuned(
    wg: torch.Tensor,
    bits: torch.Tensor | int,
    sym: bool,
    v: torch.Tensor,
    min_scale: torch.Tensor,
    max_scale: torch.Tensor,
    wrange: tuple[torch.Tensor, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """fake_quantize_groups for tuning: the same values, and the same gradients in v and the
    factors (none in wg, which is fixed), in about a third of the passes over the weights. The
    per-group part (tiny) stays with autograd; the per-weight part has its backward written out,
    where autograd would keep and replay a chain of ~20 elementwise ops. The result is cast to
    dtype in the same pass."""
    bits_t = torch.as_tensor(bits, device=wg.device, dtype=wg.dtype)
    scale, zero = group_params(wg, bits_t, sym, min_scale, max_scale, wrange)
    return _RoundTrip.apply(wg, v, scale, zero, 2**bits_t - 1, dtype or wg.dtype)


class _RoundTrip(torch.autograd.Function):
    """(clamp(round(w / scale + v) + zero, 0, maxq) - zero) * scale, straight-through round.
    Boolean masks are avoided: on CPUs, where/masked_fill with them cost 10-20x a float multiply."""

    @staticmethod
    def forward(ctx, w, v, scale, zero, maxq, dtype):
        t = torch.div(w, scale).add_(v).round_().add_(zero)
        q = t.clamp(min=0).clamp_(max=maxq)
        inside = torch.eq(q, t, out=t)  # 1.0 where not clamped (the gradient passes), else 0.0
        qz = q.sub_(zero)
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
        torch.mul(qz, scale, out=out)
        ctx.save_for_backward(w, scale, qz, inside)
        return out

    @staticmethod
    def backward(ctx, g):
        w, scale, qz, inside = ctx.saved_tensors
        g = g.float() if g.dtype != torch.float32 else g.clone()
        gin = g * inside
        grad_v = gin * scale
        # d out / d scale = (q - zero) - inside * w / scale, summed over the group (in place: no
        # more weight-sized buffers than needed).
        grad_scale = g.mul_(qz).sum(-1, keepdim=True) - gin.mul_(w).sum(-1, keepdim=True) / scale
        return None, grad_v, grad_scale, None, None, None


def quantize_codes(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    v: torch.Tensor | None = None,
    min_scale: torch.Tensor | None = None,
    max_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [out, in], scale, zero [out, n_groups]) of w [out, in] (v: [out, in]; factors:
    [out, n_groups])."""
    w = w.detach().float()
    wg = to_groups(w, group_size)
    ms = min_scale.detach().float().unsqueeze(-1) if min_scale is not None else None
    xs = max_scale.detach().float().unsqueeze(-1) if max_scale is not None else None
    scale, zero = group_params(wg, bits, sym, ms, xs)
    x = wg / scale  # in place from here: one weight-sized temporary, not five (big layers)
    if v is not None:
        x.add_(to_groups(v.detach().float(), group_size))
    q = x.round_().add_(zero).clamp_(0, 2**bits - 1)
    codes = from_groups(q, w.shape[1]).to(torch.uint8)
    return codes, scale.squeeze(-1), zero.squeeze(-1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    in_f = codes.shape[1]
    qg = to_groups(codes.to(torch.float32), group_size)
    wg = qg.sub_(zero.float().unsqueeze(-1)).mul_(scale.float().unsqueeze(-1))
    return from_groups(wg, in_f).to(dtype)


class IntType(DataType):
    name = "int"
    has_zero = True

    def check(self, bits, group_size, sym):
        if not 2 <= bits <= 8:
            return f"bits must be an integer from 2 to 8, got {bits!r}"
        return None

    def levels(self, bits):
        return 2**bits

    def init_range(self, wg):
        return group_range(wg)

    def fake_quantize(self, wg, bits, sym, v=None, min_scale=None, max_scale=None, wrange=None):
        return fake_quantize_groups(wg, bits, sym, v, min_scale, max_scale, wrange)

    def fake_quantize_tuned(self, wg, bits, sym, v, min_scale, max_scale, wrange=None, dtype=None):
        return fake_quantize_tuned(wg, bits, sym, v, min_scale, max_scale, wrange, dtype)

    def quantize(self, w, bits, group_size, sym, v=None, min_scale=None, max_scale=None):
        return (*quantize_codes(w, bits, group_size, sym, v, min_scale, max_scale), {})

    def dequantize(self, codes, scale, zero, bits, group_size, dtype=torch.float32):
        return dequantize_codes(codes, scale, zero, group_size, dtype)

    def storage_bits(self, out_features, in_features, bits, group_size, sym):
        # The zero point is counted for symmetric layers too: the GPTQ/auto-round layout (qweight,
        # scales, qzeros) always stores qzeros. A partial last group costs as much as a full one.
        groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
        return out_features * in_features * bits + out_features * groups * (SCALE_BITS + bits)
