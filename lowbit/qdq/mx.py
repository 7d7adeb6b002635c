"""MX floats (OCP Microscaling Formats v1.0): blocks of 32 elements sharing one E8M0 scale, a
power of two. MXFP4 has E2M1 elements, MXFP8 E4M3.

The spec's scale: X = 2^(floor(log2(amax)) - emax), emax the exponent of the element's largest
normal (2 for E2M1, 8 for E4M3), kept in E8M0's range 2^-127 .. 2^127; elements are amax-relative
values rounded to nearest even and saturated (block values between 6X and 8X store 6X in MXFP4).
SignRound's range factor multiplies amax before the exponent is taken; its gradient passes
straight through the floor (the scale moves with amax between powers of two).
"""
from __future__ import annotations

import torch

from lowbit.qdq.fp import TINY, ScaledFloat, element_params, floor_log2

BLOCK = 32


def mx_scale(amax: torch.Tensor, bits) -> torch.Tensor:
    """2^(floor(log2(amax)) - emax) per block, straight-through in amax."""
    _, _, _, emax = element_params(bits, amax)
    a = amax.clamp(min=TINY)
    exp = (floor_log2(a.detach()) - emax).clamp(-127, 127)
    x = torch.exp2(exp)
    return x + (a - a.detach()) * (x / a).detach()  # exactly x forward; d x / d amax = x / amax


class MXType(ScaledFloat):
    name = "mxfp"
    bits_allowed = (4, 8)
    scale_bits = 8  # E8M0

    def check(self, bits, group_size, sym):
        if group_size != BLOCK:
            return f"mxfp needs groups of {BLOCK} (the MX block), got {group_size}"
        return super().check(bits, group_size, sym)

    def scale(self, amax, bits, wrange):
        return mx_scale(amax, bits)
