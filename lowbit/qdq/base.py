"""What a data type is: the one object the rest of lowbit asks about a kind of quantized number.

Every method works on plain tensors; weights are 2-D [out_features, in_features] and grouped
along the input dimension ([out, n_groups, g], see groups.py). A type stores a weight as codes
(uint8 [out, in]), a scale per group and, if the type has one, a zero point per group.
"""
from __future__ import annotations

import torch


class DataType:
    """Subclasses fill in every method; `name` is the key in the registry (dtypes.py)."""

    name: str = ""
    has_zero: bool = True  # whether codes are stored with a zero point per group
    # whether that offset is stored as a number of its own (llama.cpp's mins), not an integer zero
    # point: then any min can be fitted, not only a whole number of steps
    free_offset: bool = False
    extra_names: tuple[str, ...] = ()  # the extras quantize returns (NVFP4: its global scale)
    # Whether init_range of some rows depends on those rows only; False (NVFP4's per-tensor scale):
    # the range of a layer's rows is computed on the layer and passed in (wrange) wherever the
    # rows of several layers are quantized together.
    range_is_local: bool = True
    # The range factors a search tries on this type (prescale.search_range_factors); None: the
    # search's default grid (1.00 ... 0.40). range_tuned: whether SignRound tunes them further.
    range_grid: tuple[float, ...] | None = None
    range_tuned: bool = True

    def check(self, bits: int, group_size: int, sym: bool) -> str | None:
        """Why this type cannot take these settings, or None when it can."""
        raise NotImplementedError

    def pool_rows(self, x: torch.Tensor, group_size: int) -> torch.Tensor:
        """x [out, n_groups, 1], a value per group (a search's error), summed over the groups that
        share one scale, for each of them; a scale per group (most types): x itself."""
        return x

    def fallback(self, in_features: int) -> str | None:
        """None when this type stores rows of in_features weights; else the name of the data type
        that stands in for it on such a layer (llama.cpp's block types need whole blocks)."""
        return None

    def levels(self, bits: int) -> int:
        """How many distinct codes a weight can take."""
        raise NotImplementedError

    def init_range(self, wg: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The per-group statistics ([..., 1] each) the scale is computed from before any tuning;
        tuning keeps them fixed and learns factors on them."""
        raise NotImplementedError

    def fake_quantize(self, wg: torch.Tensor, bits, sym: bool, v=None, min_scale=None, max_scale=None,
                      wrange=None) -> torch.Tensor:
        """Quantize-dequantize grouped weights [..., g], differentiable (straight-through rounding)
        in wg, the rounding offset v ([..., g]) and the range factors ([..., 1]). bits may be a
        tensor broadcastable to [..., 1]. The reference formula; torch.compile fuses it."""
        raise NotImplementedError

    def fake_quantize_tuned(self, wg: torch.Tensor, bits, sym: bool, v, min_scale, max_scale, wrange=None,
                            dtype: torch.dtype | None = None) -> torch.Tensor:
        """fake_quantize's values and its gradients in v and the factors (none in wg), for eager
        tuning loops; the result in dtype. A type may override it with a faster version."""
        return self.fake_quantize(wg.detach(), bits, sym, v, min_scale, max_scale, wrange).to(dtype or wg.dtype)

    def quantize(self, w: torch.Tensor, bits: int, group_size: int, sym: bool, v=None, min_scale=None,
                 max_scale=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
        """(codes uint8 [out, in], scale [out, n_groups], zero [out, n_groups] or None, extras) of
        w [out, in]; v [out, in] and the factors [out, n_groups] as tuned. extras: the other
        tensors a layer of this type stores ({} for most; `extra_names` lists them)."""
        raise NotImplementedError

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                   group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def storage_bits(self, out_features: int, in_features: int, bits: int, group_size: int, sym: bool) -> int:
        """Bits to store one [out, in] weight, scales and zero points included, as the packed
        checkpoints store them."""
        raise NotImplementedError
