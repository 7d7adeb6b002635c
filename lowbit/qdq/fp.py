"""Small floating-point elements, E2M1 (FP4) and E4M3 (FP8), and what the scaled float types
(mx.py, nv.py, fp8.py) share: one scale per group, no zero point, elements rounded onto the
element's grid.

E2M1 (OCP MX spec): bias 1, no inf/NaN; the 8 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; code =
sign << 3 | magnitude index. E4M3 ("fn" variant, as torch.float8_e4m3fn): bias 7, largest 448,
no inf, S.1111.111 is NaN; the code is its byte.

Rounding is to nearest, ties to even mantissa, saturating at the largest magnitude (the MX spec's
conversion, and what the FP8 quantizers of vLLM and compressed-tensors do). On a binade
[2^e, 2^(e+1)) the grid spacing is ulp = 2^(e - mantissa bits) (e >= the smallest normal exponent,
below it the subnormals keep that spacing), so round(x / ulp) * ulp is the element: x / ulp is an
integer whose parity is the mantissa's last bit, and torch.round rounds ties to even.

SignRound's rounding offset v is in units of the local ulp: round(x / ulp + v) * ulp, so v = 0.5
moves any element one grid step up, whatever its binade.
"""
from __future__ import annotations

import torch

from lowbit.qdq.base import DataType
from lowbit.qdq.groups import from_groups, round_ste, to_groups

TINY = 2.0**-126  # the smallest normal float32: a floor for magnitudes whose exponent is taken

# bits -> (mantissa bits, smallest normal exponent, largest magnitude, exponent of the largest)
ELEMENTS = {4: (1, 0, 6.0, 2), 8: (3, -6, 448.0, 8)}
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def element_params(bits, like: torch.Tensor):
    """(mantissa bits, smallest normal exponent, largest magnitude, its exponent) of the element
    for `bits` (4: E2M1, 8: E4M3), as tensors broadcastable like bits (one element kind per row
    when bits is a column)."""
    b = torch.as_tensor(bits, device=like.device, dtype=like.dtype)
    four = b <= 4
    pick = lambda a, c: torch.where(four, torch.tensor(a, dtype=like.dtype, device=like.device),
                                    torch.tensor(c, dtype=like.dtype, device=like.device))
    (m4, e4, x4, k4), (m8, e8, x8, k8) = ELEMENTS[4], ELEMENTS[8]
    return pick(m4, m8), pick(e4, e8), pick(x4, x8), pick(k4, k8)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for a > 0, exactly (frexp: a = m * 2^k with m in [0.5, 1)); float result."""
    return (torch.frexp(a)[1] - 1).to(a.dtype)


def round_to_element(x: torch.Tensor, bits, v: torch.Tensor | None = None) -> torch.Tensor:
    """x (already divided by its scale) rounded onto the element grid: straight-through in x, and
    differentiable in the offset v (units of the local ulp). Saturates at the largest magnitude,
    where the gradient stops, as a clamp's does."""
    mbits, emin, vmax, _ = element_params(bits, x)
    e = torch.maximum(floor_log2(x.detach().abs().clamp(min=TINY)), emin)
    ulp = torch.exp2(e - mbits)
    y = x / ulp
    if v is not None:
        y = y + v
    q = round_ste(y) * ulp
    return torch.maximum(torch.minimum(q, vmax), -vmax)


def encode(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of values already on the element grid (round_to_element's output)."""
    q = q.float() + 0.0  # -0.0 -> +0.0: one code for zero
    if bits == 8:
        return q.to(torch.float8_e4m3fn).view(torch.uint8)
    a = q.abs()
    idx = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a / 2 + 4))
    return (idx + 8 * (q < 0)).to(torch.uint8)


def decode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 values of uint8 codes."""
    if bits == 8:
        return codes.view(torch.float8_e4m3fn).float()
    mag = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where(codes >= 8, -mag, mag)


class ScaledFloat(DataType):
    """A float element per weight, times one scale per group: what MXFP, NVFP and FP8 share.
    Subclasses say which bits and group sizes they take and how the scale follows from the group's
    largest magnitude (`scale`). Symmetric only: the element grid is."""

    has_zero = False
    bits_allowed: tuple[int, ...] = ()
    scale_bits = 0  # bits to store one group's scale

    def check(self, bits, group_size, sym):
        if bits not in self.bits_allowed:
            return f"{self.name} takes {' or '.join(map(str, self.bits_allowed))} bits, got {bits!r}"
        if not sym:
            return f"{self.name} is symmetric only (its elements are signed floats)"
        return None

    def levels(self, bits):
        return 2**bits

    def init_range(self, wg):
        return wg.amin(dim=-1, keepdim=True).clamp(max=0), wg.amax(dim=-1, keepdim=True).clamp(min=0)

    def scale(self, amax: torch.Tensor, bits, wrange) -> torch.Tensor:
        """The scale per group [..., 1] from the (factored) largest magnitude, differentiable in
        amax (straight-through where the scale itself is rounded)."""
        raise NotImplementedError

    def extras(self, wrange) -> dict[str, torch.Tensor]:
        """Tensors besides codes and scales a layer stores (NVFP4's global scale)."""
        return {}

    def _scale(self, wg, bits, min_scale, max_scale, wrange):
        wmin, wmax = wrange[0], wrange[1]
        neg = -wmin if min_scale is None else -wmin * min_scale
        pos = wmax if max_scale is None else wmax * max_scale
        return self.scale(torch.maximum(neg, pos), bits, wrange)

    def fake_quantize(self, wg, bits, sym, v=None, min_scale=None, max_scale=None, wrange=None):
        wrange = wrange if wrange is not None else self.init_range(wg)
        s = self._scale(wg, bits, min_scale, max_scale, wrange)
        safe = torch.where(s > 0, s, torch.ones_like(s))  # a zero scale (NVFP4) makes a zero group
        return round_to_element(wg / safe, bits, v) * s

    def quantize(self, w, bits, group_size, sym, v=None, min_scale=None, max_scale=None):
        w = w.detach().float()
        wg = to_groups(w, group_size)
        wrange = self.init_range(wg)
        ms = min_scale.detach().float().unsqueeze(-1) if min_scale is not None else None
        xs = max_scale.detach().float().unsqueeze(-1) if max_scale is not None else None
        s = self._scale(wg, bits, ms, xs, wrange).detach()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        vg = to_groups(v.detach().float(), group_size) if v is not None else None
        q = round_to_element(wg / safe, bits, vg) * (s > 0)
        codes = encode(from_groups(q, w.shape[1]), bits)
        return codes, s.squeeze(-1), None, self.extras(wrange)

    def dequantize(self, codes, scale, zero, bits, group_size, dtype=torch.float32):
        wg = to_groups(decode(codes, bits), group_size)
        return from_groups(wg.mul_(scale.float().unsqueeze(-1)), codes.shape[1]).to(dtype)

    def storage_bits(self, out_features, in_features, bits, group_size, sym):
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        return out_features * in_features * bits + out_features * groups * self.scale_bits
