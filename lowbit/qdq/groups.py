"""Groups of input columns, the unit every data type shares one scale over, and the rounding with
a straight-through gradient that every fake quantizer uses.

A group that does not fill the last columns (in_features % group_size != 0) is padded by repeating
its last column, which leaves that group's min, max and largest magnitude unchanged, and the
padding is cut off again.
"""
from __future__ import annotations

import torch


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
