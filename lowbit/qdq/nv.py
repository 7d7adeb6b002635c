"""NVFP4: E2M1 elements in blocks of 16, each block scale stored in FP8 E4M3, times one float32
global scale per tensor (NVIDIA's format; compressed-tensors and TensorRT-ModelOpt store it so).

The global scale maps the tensor's largest magnitude onto the product of the two formats' ranges:
global = 448 * 6 / amax(tensor). A block's E4M3 scale is e4m3(amax(block) / 6 * global) and its
elements are round(w / (e4m3 scale / global)) in E2M1. A block whose E4M3 scale rounds to zero
stores zeros. QuantizedWeight.scale holds the effective float scale (e4m3 / global); the stored
E4M3 byte is e4m3(scale * global), exact, and extras["global_scale"] holds global.
"""
from __future__ import annotations

import torch

from lowbit.qdq.fp import TINY, ScaledFloat

BLOCK = 16
E4M3_MAX, E2M1_MAX = 448.0, 6.0


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to FP8 E4M3 (to nearest even, saturating at 448), back in x's dtype."""
    return x.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def global_scale(tensor_amax: torch.Tensor) -> torch.Tensor:
    return (E4M3_MAX * E2M1_MAX) / tensor_amax.clamp(min=TINY)


class NVType(ScaledFloat):
    name = "nvfp"
    bits_allowed = (4,)
    scale_bits = 8  # E4M3 per block (and 32 bits per tensor, counted in storage_bits)
    extra_names = ("global_scale",)
    range_is_local = False

    def check(self, bits, group_size, sym):
        if group_size != BLOCK:
            return f"nvfp needs groups of {BLOCK} (the NVFP4 block), got {group_size}"
        return super().check(bits, group_size, sym)

    def init_range(self, wg):
        """(min, max) per group and the whole tensor's largest magnitude, broadcast to [..., 1]."""
        wmin, wmax = super().init_range(wg)
        amax = torch.maximum(-wmin, wmax).amax().expand_as(wmax)
        return wmin, wmax, amax

    def scale(self, amax, bits, wrange):
        g = global_scale(wrange[2])
        s = amax / E2M1_MAX * g  # the block scale in E4M3's units, straight-through its rounding
        return (e4m3(s.detach()) + (s - s.detach())) / g

    def extras(self, wrange):
        return {"global_scale": global_scale(wrange[2].reshape(-1)[:1]).reshape(())}

    def storage_bits(self, out_features, in_features, bits, group_size, sym):
        return super().storage_bits(out_features, in_features, bits, group_size, sym) + 32
