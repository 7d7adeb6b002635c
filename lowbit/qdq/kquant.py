"""llama.cpp's block types as data types: the k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and the
legacy Q4_0, Q4_1, Q5_0, Q5_1, Q8_0. The values here are exactly the values llama.cpp decodes from the bytes
`ggml.py` packs (tests/test_kquant.py checks both against the `gguf` package's dequantizers).

k-quants group 256 weights into a super-block with an fp16 scale d (and, for the types with mins,
an fp16 dmin); each sub-block of 16 or 32 weights has its own small integer scale sc (and min m):

    Q2_K, Q4_K, Q5_K   y = (d * sc) * c - (dmin * m)    c in [0, 2^b - 1]; sc, m in [0, 15] (Q2_K) or [0, 63]
    Q3_K, Q6_K         y = (d * sc) * (c - 2^(b-1))     sc in [-32, 31] (Q3_K, 6 bits) or [-128, 127] (Q6_K)
    Q4_0, Q5_0, Q8_0   y = d * (c - 2^(b-1))            one fp16 d per block of 32
    Q4_1, Q5_1         y = d * c - m0                   one fp16 d and fp16 m0 (minus the min) per block

How a block's numbers are chosen (and tuned): each sub-block's float scale comes from its range as
for lowbit's int type (asymmetric: (max - min) / (2^b - 1) and min; symmetric: the largest
magnitude onto -2^(b-1)), SignRound's min/max factors shrinking that range. The super-block's d is
the largest sub-block scale over the sub-scale range, rounded to fp16; each sc is then the
sub-block scale rounded onto d's grid, and the codes are fitted to those quantized scales. Every
rounding passes gradients straight through, so SignRound tunes the weights the file stores.

QuantizedWeight holds the effective per-sub-block scale d * sc (`scale`) and, for types with mins,
offset dmin * m (`zero`, in weight units, not a zero point); extras["super_scale"] (and
"super_min") hold d (and dmin) per super-block, from which ggml.py recovers sc and m exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.qdq.base import DataType
from lowbit.qdq.groups import from_groups, round_ste, to_groups
from lowbit.qdq.int import group_range

QK_K = 256


@dataclass(frozen=True)
class KFormat:
    ggml: str  # llama.cpp's name
    bits: int  # element bits
    group: int  # weights per sub-block (legacy types: per block)
    sub_levels: int  # sub-scale codes: [0, sub_levels) with mins, [-sub_levels/2, sub_levels/2) without; 0: legacy
    mins: bool  # asymmetric, with a min per sub-block
    block_bytes: int  # bytes per super-block (legacy: per block)

    @property
    def weights_per_block(self) -> int:
        return QK_K if self.sub_levels else self.group

    @property
    def inputs(self) -> str:
        """The 8-bit type llama.cpp's CPU kernels round this type's layer inputs to before the
        integer dot product (an activation type of lowbit.qdq.act)."""
        return "q8_k" if self.sub_levels else "q8_0"

    @property
    def per(self) -> int:
        """Sub-blocks per super-block."""
        return self.weights_per_block // self.group


FORMATS = {
    "q2_k": KFormat("Q2_K", 2, 16, 16, True, 84),
    "q3_k": KFormat("Q3_K", 3, 16, 64, False, 110),
    "q4_k": KFormat("Q4_K", 4, 32, 64, True, 144),
    "q5_k": KFormat("Q5_K", 5, 32, 64, True, 176),
    "q6_k": KFormat("Q6_K", 6, 16, 256, False, 210),
    "q4_0": KFormat("Q4_0", 4, 32, 0, False, 18),
    "q4_1": KFormat("Q4_1", 4, 32, 0, True, 20),
    "q5_0": KFormat("Q5_0", 5, 32, 0, False, 22),
    "q5_1": KFormat("Q5_1", 5, 32, 0, True, 24),
    "q8_0": KFormat("Q8_0", 8, 32, 0, False, 34),
}


# What stands in for a type on a layer whose rows are not whole super-blocks: llama.cpp's own
# quantizer's choice (tensor_type_fallback in src/llama-quant.cpp).
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16 (saturating), straight-through."""
    r = x.detach().clamp(-65504.0, 65504.0).half().float()
    return x + (r - x).detach()


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """x with zeros replaced by 1 (a divisor; the results it scales are zero anyway)."""
    return x + (x == 0).to(x.dtype)


def _super_blocks(t: torch.Tensor, fmt: KFormat, last: int) -> torch.Tensor:
    """[..., last] -> [n_super, per, last] (consecutive sub-blocks form a super-block)."""
    if t.numel() // last % fmt.per:
        raise LowbitError(f"{fmt.ggml} needs whole super-blocks of {fmt.weights_per_block} weights per row "
                          f"(input features a multiple of {fmt.weights_per_block})")
    return t.reshape(-1, fmt.per, last)


def block_numbers(fmt: KFormat, wmin, wmax, min_scale=None, max_scale=None):
    """From each sub-block's range [n_super, per, 1] (and the tuned factors): (dl, ml, d, dmin),
    the effective scale d * sc and offset dmin * m per sub-block, and d and dmin per super-block
    ([n_super, 1, 1]; dmin and ml None without mins). Differentiable, straight-through roundings."""
    if min_scale is not None:
        wmin = wmin * min_scale
    if max_scale is not None:
        wmax = wmax * max_scale
    half = 2 ** (fmt.bits - 1)
    if fmt.mins and not fmt.sub_levels:  # Q4_1, Q5_1: an fp16 scale and an fp16 offset per block
        d = fp16_ste((wmax - wmin) / (2**fmt.bits - 1))
        ml = fp16_ste(-wmin)
        return d, ml, d, ml
    if fmt.mins:
        top = fmt.sub_levels - 1
        s = (wmax - wmin) / (2**fmt.bits - 1)
        mn = -wmin
        d = fp16_ste(s.amax(dim=1, keepdim=True) / top)
        dmin = fp16_ste(mn.amax(dim=1, keepdim=True) / top)
        sc = round_ste(s / _nonzero(d)).clamp(0, top)
        m = round_ste(mn / _nonzero(dmin)).clamp(0, top)
        return d * sc, dmin * m, d, dmin
    # symmetric: the larger side maps to -half, so the scale carries the sign
    s = -torch.where(-wmin >= wmax, wmin, wmax) / half
    if not fmt.sub_levels:
        d = fp16_ste(s)
        return d, None, d, None
    sh = fmt.sub_levels // 2
    biggest = s.gather(1, s.detach().abs().argmax(dim=1, keepdim=True))
    d = fp16_ste(-biggest / sh)  # the largest sub-scale becomes -sh
    sc = round_ste(s / _nonzero(d)).clamp(-sh, sh - 1)
    return d * sc, None, d, None


def fake_quantize(fmt: KFormat, wg: torch.Tensor, v=None, min_scale=None, max_scale=None, wrange=None) -> torch.Tensor:
    """Quantize-dequantize sub-blocks wg [..., group] onto the format's grid, scales included."""
    shape = wg.shape
    w = _super_blocks(wg, fmt, fmt.group)
    wmin, wmax = wrange if wrange is not None else group_range(wg)
    wmin, wmax = _super_blocks(wmin, fmt, 1), _super_blocks(wmax, fmt, 1)
    factors = [None if f is None else _super_blocks(f, fmt, 1) for f in (min_scale, max_scale)]
    dl, ml, _, _ = block_numbers(fmt, wmin, wmax, *factors)
    if fmt.mins:
        x = (w + ml) / _nonzero(dl)
        if v is not None:
            x = x + _super_blocks(v, fmt, fmt.group)
        c = round_ste(x).clamp(0, 2**fmt.bits - 1)
        return (dl * c - ml).reshape(shape)
    half = 2 ** (fmt.bits - 1)
    x = w / _nonzero(dl)
    if v is not None:
        x = x + _super_blocks(v, fmt, fmt.group)
    q = round_ste(x).clamp(-half, half - 1)
    return (dl * q).reshape(shape)


@torch.no_grad()
def quantize(fmt: KFormat, w: torch.Tensor, v=None, min_scale=None, max_scale=None):
    """(codes uint8 [out, in], dl [out, n_groups], ml [out, n_groups] or None, extras) of w [out, in]."""
    out_f, in_f = w.shape
    if in_f % fmt.weights_per_block:
        raise LowbitError(f"{fmt.ggml} needs input features a multiple of {fmt.weights_per_block}, got {in_f}")
    wg = to_groups(w.detach().float(), fmt.group)
    wmin, wmax = group_range(wg)
    factors = [None if f is None else _super_blocks(f.detach().float(), fmt, 1) for f in (min_scale, max_scale)]
    dl, ml, d, dmin = block_numbers(fmt, _super_blocks(wmin, fmt, 1), _super_blocks(wmax, fmt, 1), *factors)
    x = _super_blocks(wg, fmt, fmt.group)
    if fmt.mins:
        x = (x + ml) / _nonzero(dl)
    else:
        x = x / _nonzero(dl)
    if v is not None:
        x = x + _super_blocks(to_groups(v.detach().float(), fmt.group), fmt, fmt.group)
    half = 0 if fmt.mins else 2 ** (fmt.bits - 1)
    c = (x.round() + half).clamp(0, 2**fmt.bits - 1)
    codes = from_groups(c.reshape(out_f, -1, fmt.group), in_f).to(torch.uint8)
    ng = in_f // fmt.group
    extras = {"super_scale": d.reshape(out_f, -1)}
    if fmt.mins:
        extras["super_min"] = dmin.reshape(out_f, -1)
    return codes, dl.reshape(out_f, ng), None if ml is None else ml.reshape(out_f, ng), extras


def dequantize(fmt: KFormat, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values llama.cpp decodes: dl * c - ml, or dl * (c - 2^(b-1))."""
    in_f = codes.shape[1]
    c = to_groups(codes.to(torch.float32), fmt.group)
    if fmt.mins:
        y = scale.float().unsqueeze(-1) * c - zero.float().unsqueeze(-1)
    else:
        y = scale.float().unsqueeze(-1) * (c - 2 ** (fmt.bits - 1))
    return from_groups(y, in_f).to(dtype)


class KQuantType(DataType):
    """One llama.cpp block type (FORMATS); its bits, group size and symmetry are fixed by it."""

    def __init__(self, name: str):
        self.name = name
        self.fmt = FORMATS[name]
        self.has_zero = self.free_offset = self.fmt.mins
        self.extra_names = ("super_scale", "super_min") if self.fmt.mins else ("super_scale",)

    def check(self, bits, group_size, sym):
        f = self.fmt
        if (bits, group_size, sym) != (f.bits, f.group, not f.mins):
            return (f"{f.ggml} is {f.bits}-bit, groups of {f.group}, {'asymmetric' if f.mins else 'symmetric'} "
                    f"(got bits {bits}, group {group_size}, {'symmetric' if sym else 'asymmetric'})")
        return None

    def fallback(self, in_features):
        if in_features % self.fmt.weights_per_block == 0:
            return None
        other = FALLBACK.get(self.name)
        if other is None or in_features % FORMATS[other].weights_per_block:
            raise LowbitError(f"{self.fmt.ggml} cannot store rows of {in_features} weights (not whole blocks of "
                              f"{self.fmt.weights_per_block}), and no llama.cpp block type lowbit has can")
        return other

    def levels(self, bits):
        return 2**self.fmt.bits

    def init_range(self, wg):
        return group_range(wg)

    def fake_quantize(self, wg, bits, sym, v=None, min_scale=None, max_scale=None, wrange=None):
        return fake_quantize(self.fmt, wg, v, min_scale, max_scale, wrange)

    def quantize(self, w, bits, group_size, sym, v=None, min_scale=None, max_scale=None):
        return quantize(self.fmt, w, v, min_scale, max_scale)

    def dequantize(self, codes, scale, zero, bits, group_size, dtype=torch.float32):
        return dequantize(self.fmt, codes, scale, zero, dtype)

    def storage_bits(self, out_features, in_features, bits, group_size, sym):
        blocks = out_features * math.ceil(in_features / self.fmt.weights_per_block)
        return blocks * self.fmt.block_bytes * 8


KQUANT_TYPES = tuple(KQuantType(name) for name in FORMATS)
