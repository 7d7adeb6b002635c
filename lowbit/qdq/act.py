"""Activation quantizers: what a Linear's input becomes on hardware that multiplies in a low-bit
format (W4A4, W8A8). Dynamic: every scale comes from the tensor at hand, as the kernels compute it.

    mxfp4 / mxfp8  blocks of 32 along the input features, E8M0 scale, E2M1 / E4M3 elements
                   (the scale by the OCP spec's rule, which clips a block's largest values at the
                   element's maximum when amax / 2^floor(log2 amax) > 1.5 (E2M1) or 1.75 (E4M3))
    mxfp4_rceil    the same with the scale rounded up so nothing clips (RCEIL: NVIDIA's kernels,
    mxfp8_rceil    Transformer Engine; auto-round's MXFP4_RCEIL / MXFP8_RCEIL inputs)
    nvfp4          blocks of 16, E4M3 block scales under a float32 global scale, 448 * 6 / amax:
                   calibrated (the largest input magnitude the layer saw on the calibration data,
                   static, as NVFP4 kernels take it), or the tensor at hand's when not calibrated
    fp8            E4M3 per token, float32 scale amax / 448
    fp8_g128       E4M3 per token and group of 128 features (FP8_BLOCK's inputs, DeepSeek-V3's)
    int8           integers per token, symmetric, scale amax / 127
    q8_k / q8_0    llama.cpp's CPU kernels: before the integer dot product with a k-quant weight
                   the input is rounded to 8-bit integers per block of 256 (q8_K, float32 scale
                   amax / 127); with a legacy type (Q4_0 ... Q8_0) per block of 32, the scale
                   stored in float16 (q8_0, q8_1). Declaring them makes lowbit tune and evaluate
                   what llama.cpp computes (`--scheme Q4_K_M-q8`)

Each is a quantize-dequantize with a straight-through gradient (the input passes it unchanged),
so SignRound tunes the weights under it. Inputs whose features are not a whole number of blocks
are padded as weight groups are (groups.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.qdq.fp import TINY, round_to_element
from lowbit.qdq.groups import from_groups, to_groups
from lowbit.qdq.mx import mx_scale
from lowbit.qdq.nv import e4m3, global_scale


def _mx(x, bits, rceil=False):
    g = to_groups(x, 32)
    s = mx_scale(g.abs().amax(-1, keepdim=True), bits, rceil)
    return from_groups(round_to_element(g / s, bits) * s, x.shape[1])


def _nvfp4(x, gs=None):
    g = to_groups(x, 16)
    gs = global_scale(x.abs().amax()) if gs is None else gs.to(x.device, torch.float32)
    s = e4m3(g.abs().amax(-1, keepdim=True) / 6 * gs) / gs
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return from_groups(round_to_element(g / safe, 4) * s, x.shape[1])


def _fp8(x, block=-1):  # -1: a scale per token
    g = to_groups(x, block)
    s = g.abs().amax(-1, keepdim=True).clamp(min=TINY) / 448
    return from_groups(round_to_element(g / s, 8) * s, x.shape[1])


def _int8(x, gs=None):
    s = x.abs().amax(-1, keepdim=True).clamp(min=TINY) / 127
    return (x / s).round().clamp(-127, 127) * s


def _ggml_q8(x, block, half_scale):
    # as quantize_row_q8_K / q8_0: codes round(x * 127 / amax) (ties to even, as the SIMD paths
    # round), value code * amax / 127, that scale rounded to float16 for q8_0
    g = to_groups(x, block)
    amax = g.abs().amax(-1, keepdim=True)
    d = amax / 127
    codes = (g * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))).round()  # an empty block: 0
    return from_groups(codes * (d.half().float() if half_scale else d), x.shape[1])


@dataclass(frozen=True)
class Activation:
    name: str
    bits: int
    block: int  # features sharing a scale; 0: a scale per token
    family: str  # types one model may mix (one kernel family: MX, MX with RCEIL scales, NVFP4 with FP8, int8)
    fn: object
    calibrated: bool = False  # takes a global scale calibrated on the layer's inputs (calibrate())

    def calibrate(self, amax: torch.Tensor) -> torch.Tensor | None:
        """The static scale a layer whose inputs reached `amax` on the calibration data keeps
        (None for a type without one)."""
        return global_scale(amax.float().reshape(())) if self.calibrated else None

    def __call__(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantize x [..., features] (straight-through), in x's dtype, with the layer's
        calibrated scale if it has one."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        q = self.fn(flat, scale).reshape(x.shape).to(x.dtype)
        return x + (q - x).detach() if x.requires_grad else q


ACTIVATIONS = {a.name: a for a in (
    Activation("mxfp4", 4, 32, "mx", lambda x, gs=None: _mx(x, 4)),
    Activation("mxfp8", 8, 32, "mx", lambda x, gs=None: _mx(x, 8)),
    Activation("mxfp4_rceil", 4, 32, "mx_rceil", lambda x, gs=None: _mx(x, 4, rceil=True)),
    Activation("mxfp8_rceil", 8, 32, "mx_rceil", lambda x, gs=None: _mx(x, 8, rceil=True)),
    Activation("nvfp4", 4, 16, "nv", _nvfp4, calibrated=True),
    Activation("fp8", 8, 0, "nv", lambda x, gs=None: _fp8(x)),
    Activation("fp8_g128", 8, 128, "nv", lambda x, gs=None: _fp8(x, 128)),
    Activation("int8", 8, 0, "int", _int8),
    Activation("q8_k", 8, 256, "ggml", lambda x, gs=None: _ggml_q8(x, 256, False)),
    Activation("q8_0", 8, 32, "ggml", lambda x, gs=None: _ggml_q8(x, 32, True)),
)}


def check_mix(acts) -> str | None:
    """Why layers with these activation types (None: 16-bit inputs) cannot be in one model, or
    None: every layer quantizes its inputs or none does, all in one family."""
    acts = set(acts)
    if len(acts) <= 1:
        return None
    if None in acts:
        return f"options mix 16-bit inputs with quantized ones ({', '.join(sorted(a for a in acts if a))})"
    families = {get_activation(a).family for a in acts}
    if len(families) > 1:
        return f"options mix activation types of different kinds: {', '.join(sorted(acts))}"
    return None


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise LowbitError(f"activation type {name!r} is not supported (have: {', '.join(ACTIVATIONS)})") from None
