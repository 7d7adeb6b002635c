"""FP8 E4M3 weights with a float32 scale per output channel (group -1) or per group: scale =
amax / 448, elements rounded to nearest even (the FP8 of vLLM's and compressed-tensors' W8A8)."""
from __future__ import annotations

from lowbit.qdq.fp import TINY, ScaledFloat

E4M3_MAX = 448.0


class FP8Type(ScaledFloat):
    name = "fp8"
    bits_allowed = (8,)
    scale_bits = 32

    def scale(self, amax, bits, wrange):
        return amax.clamp(min=TINY) / E4M3_MAX
