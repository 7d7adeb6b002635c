"""MX floats (OCP Microscaling Formats v1.0): blocks of 32 elements sharing one E8M0 scale, a
power of two. MXFP4 has E2M1 elements, MXFP8 E4M3.

The spec's scale: X = 2^(floor(log2(amax)) - emax), emax the exponent of the element's largest
normal (2 for E2M1, 8 for E4M3), kept in E8M0's range 2^-127 .. 2^127; elements are amax-relative
values rounded to nearest even and saturated (block values between 6X and 8X store 6X in MXFP4).
A range factor multiplies amax before the exponent is taken (its gradient passes straight through
the floor). A weight's scale need not follow the spec's rule: RTN and SignRound take each block's
best of the three exponents around it (range_grid below), and SignRound tunes the rounding only.
"""
from __future__ import annotations

import torch

from lowbit.qdq.fp import TINY, ScaledFloat, element_params, floor_log2

BLOCK = 32


def mx_scale(amax: torch.Tensor, bits, rceil: bool = False) -> torch.Tensor:
    """2^(floor(log2(amax)) - emax) per block, straight-through in amax. rceil: the smallest power
    of two at which amax fits the element's range, 2^ceil(log2(amax / max)) (NVIDIA's rule for
    MX inputs, Transformer Engine's float_to_e8m0: the spec's exponent, or one more where the
    spec's would clip the block's largest values)."""
    _, _, vmax, emax = element_params(bits, amax)
    a = amax.clamp(min=TINY)
    if rceil:
        m, k = torch.frexp(a.detach() / vmax)  # a / vmax = m * 2^k, m in [0.5, 1): ceil(log2) is k unless m = 0.5
        exp = (k - (m == 0.5).to(k.dtype)).to(a.dtype).clamp(-127, 127)
    else:
        exp = (floor_log2(a.detach()) - emax).clamp(-127, 127)
    x = torch.exp2(exp)
    return x + (a - a.detach()) * (x / a).detach()  # exactly x forward; d x / d amax = x / amax


class MXType(ScaledFloat):
    name = "mxfp"
    bits_allowed = (4, 8)
    scale_bits = 8  # E8M0
    # Only the exponent of the factored amax matters, so a range search has three choices: the
    # spec's exponent, one lower, and one higher (2: the round-up, RCEIL, exponent where the spec's
    # clips the block's largest weights at the element's maximum). Any E8M0 scale is valid MX.
    # SignRound keeps the searched exponent: a sign step on a factor that only picks a power of
    # two would follow a straight-through gradient with no meaning.
    range_grid = (0.5, 1.0, 2.0)
    range_tuned = False

    def check(self, bits, group_size, sym):
        if group_size != BLOCK:
            return f"mxfp needs groups of {BLOCK} (the MX block), got {group_size}"
        return super().check(bits, group_size, sym)

    def scale(self, amax, bits, wrange):
        return mx_scale(amax, bits)
