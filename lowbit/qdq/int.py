"""Integer quantize-dequantize with groups, tunable rounding and a straight-through estimator.

Everything here is pure tensor math on a 2-D weight [out_features, in_features]; nothing knows
about models. Codes are stored unsigned in [0, 2^bits - 1] with a zero point, for both modes:

- asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale).
- symmetric "full range": the largest-magnitude weight of a group maps to -2^(b-1), so all 2^b
  levels are used; the scale carries the sign that makes this so, and zero = 2^(b-1).

A group that does not fill the last columns (in_features % group_size != 0) is padded by repeating
its last column, which leaves that group's min and max unchanged, and the padding is cut off again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-9


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (straight-through estimator)."""
    return x + (x.round() - x).detach()


def n_groups(in_features: int, group_size: int) -> int:
    g = in_features if group_size == -1 else group_size
    return -(-in_features // g)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, g], padding a last partial group by repeating its last column."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    pad = n_groups(in_f, group_size) * g - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, -1, g)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, n_groups, g] -> [out, in], dropping padding."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


@dataclass
class QuantizedWeight:
    """The one intermediate form between tuning and storing: codes, scales, zero points."""

    codes: torch.Tensor  # uint8 [out, in], values in [0, 2^bits - 1]
    scale: torch.Tensor  # [out, n_groups]
    zero: torch.Tensor  # [out, n_groups], integer-valued
    bits: int
    group_size: int
    sym: bool

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        in_f = self.codes.shape[1]
        qg = to_groups(self.codes.to(torch.float32), self.group_size)
        wg = (qg - self.zero.float().unsqueeze(-1)) * self.scale.float().unsqueeze(-1)
        return from_groups(wg, in_f).to(dtype)


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
) -> torch.Tensor:
    """Quantize-dequantize grouped weights [..., g], differentiable (STE) in wg, v and the factors.

    v: rounding offset, same shape as wg (SignRound's V, kept in [-0.5, 0.5]).
    """
    bits_t = torch.as_tensor(bits, device=wg.device, dtype=wg.dtype)
    maxq = 2**bits_t - 1
    scale, zero = group_params(wg, bits_t, sym, min_scale, max_scale)
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


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of a 2-D weight; returns a tensor shaped like w."""
    return from_groups(fake_quantize_groups(to_groups(w, group_size), bits, sym), w.shape[1])


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    v: torch.Tensor | None = None,
    min_scale: torch.Tensor | None = None,
    max_scale: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Integer codes of w [out, in] (v: [out, in]; factors: [out, n_groups])."""
    w = w.detach().float()
    wg = to_groups(w, group_size)
    ms = min_scale.detach().float().unsqueeze(-1) if min_scale is not None else None
    xs = max_scale.detach().float().unsqueeze(-1) if max_scale is not None else None
    scale, zero = group_params(wg, bits, sym, ms, xs)
    x = wg / scale
    if v is not None:
        x = x + to_groups(v.detach().float(), group_size)
    q = torch.clamp(x.round() + zero, 0, 2**bits - 1)
    codes = from_groups(q, w.shape[1]).to(torch.uint8)
    return QuantizedWeight(codes, scale.squeeze(-1), zero.squeeze(-1), bits, group_size, sym)
