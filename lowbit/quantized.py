"""The one form between tuning and storing: a quantized weight with its scheme.

Every algorithm returns it, every writer reads it and every reader builds it; nothing re-derives
its fields. It is frozen and checked on construction, so a writer can trust what it holds.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.qdq import n_groups
from lowbit.schemes import Scheme


@dataclass(frozen=True)
class QuantizedWeight:
    """codes uint8 [out, in] (values below the data type's level count); scale [out, n_groups];
    zero [out, n_groups] integer-valued, or None for a type without zero points; extras: optional
    tensors some types or formats carry (a global scale, a g_idx)."""

    scheme: Scheme
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8 [out, in], got {self.codes.dtype} {tuple(self.codes.shape)}")
        out_f, in_f = self.codes.shape
        groups = (out_f, n_groups(in_f, self.scheme.group_size))
        if tuple(self.scale.shape) != groups:
            raise ValueError(f"scale has shape {tuple(self.scale.shape)}, expected {groups}")
        dtype = self.scheme.data_type
        if (self.zero is None) == dtype.has_zero:
            raise ValueError(f"data type {dtype.name} {'needs' if dtype.has_zero else 'has no'} zero points")
        if self.zero is not None and tuple(self.zero.shape) != groups:
            raise ValueError(f"zero has shape {tuple(self.zero.shape)}, expected {groups}")
        missing = set(dtype.extra_names) - set(self.extras)
        if missing:
            raise ValueError(f"data type {dtype.name} needs extras {sorted(missing)}")
        if self.codes.numel() and int(self.codes.max()) >= dtype.levels(self.scheme.bits):
            raise ValueError(f"codes exceed the {dtype.levels(self.scheme.bits)} levels of {self.scheme.name}")

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def group_size(self) -> int:
        return self.scheme.group_size

    @property
    def sym(self) -> bool:
        return self.scheme.sym

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scheme.data_type.dequantize(self.codes, self.scale, self.zero, self.bits, self.group_size, dtype)

    def replace(self, **changes) -> "QuantizedWeight":
        return dataclasses.replace(self, **changes)


def quantize_weight(w: torch.Tensor, scheme: Scheme, v: torch.Tensor | None = None,
                    min_scale: torch.Tensor | None = None, max_scale: torch.Tensor | None = None) -> QuantizedWeight:
    """The codes of w [out, in] under `scheme`: round to nearest, or with a tuned rounding offset v
    [out, in] and range factors [out, n_groups]."""
    codes, scale, zero, extras = scheme.data_type.quantize(w, scheme.bits, scheme.group_size, scheme.sym, v,
                                                           min_scale, max_scale)
    return QuantizedWeight(scheme, codes, scale, zero, extras)


@dataclass
class QuantizeResult:
    """A quantized model: the model (its quantized layers hold their dequantized weights), its
    tokenizer, each quantized layer's codes (full module name -> QuantizedWeight), and the report of
    what was done. What `lowbit.quantize` returns and what every format writes."""

    model: nn.Module
    tokenizer: object
    layers: dict[str, QuantizedWeight]
    report: dict = field(default_factory=dict)
    dtype: torch.dtype | None = None  # the original's float dtype, which writers keep; None: the model's
