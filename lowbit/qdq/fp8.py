"""FP8 E4M3 weights with a float32 scale amax / 448, elements rounded to nearest even (the FP8 of
vLLM's and compressed-tensors' W8A8):

    fp8        a scale per output channel (group -1) or per group of input columns
    fp8_block  a scale per g x g tile of the weight (g = the group size; 128: DeepSeek-V3's and
               compressed-tensors' FP8_BLOCK), the last tiles partial where the sizes are not
               multiples of g. A tile spans g rows, so its range is not local to a row
               (range_is_local), a range search scores whole tiles (pool_rows), and SignRound
               keeps the searched range (range_tuned): only the rounding is tuned.
"""
from __future__ import annotations

import torch

from lowbit.qdq.fp import TINY, ScaledFloat

E4M3_MAX = 448.0


class FP8Type(ScaledFloat):
    name = "fp8"
    bits_allowed = (8,)
    scale_bits = 32

    def scale(self, amax, bits, wrange):
        return amax.clamp(min=TINY) / E4M3_MAX


def per_tile(x: torch.Tensor, rows: int, reduce: str) -> torch.Tensor:
    """x [out, n_groups, 1] (a value per group) reduced ("amax", "amin", "sum") over each tile of
    `rows` consecutive rows and given back to every row of the tile."""
    tile = torch.arange(x.shape[0], device=x.device) // rows
    idx = tile.view(-1, 1, 1).expand_as(x)
    pooled = torch.zeros((int(tile[-1]) + 1, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return pooled.scatter_reduce(0, idx, x, reduce, include_self=False)[tile]


class FP8BlockType(FP8Type):
    name = "fp8_block"
    range_is_local = False
    range_tuned = False

    def check(self, bits, group_size, sym):
        if group_size <= 0:
            return "fp8_block needs a tile size (128: tiles of 128 x 128 weights), not per channel"
        return super().check(bits, group_size, sym)

    def init_range(self, wg):
        """(min, max) of each group's tile, [out, n_groups, 1]: wg must be [out, n_groups, g]."""
        if wg.dim() != 3:
            raise ValueError(f"fp8_block needs weights grouped as [out, n_groups, g], got shape {tuple(wg.shape)}")
        wmin, wmax = super().init_range(wg)
        return per_tile(wmin, wg.shape[-1], "amin"), per_tile(wmax, wg.shape[-1], "amax")

    def pool_rows(self, x, group_size):
        return per_tile(x, group_size, "sum")

    def quantize(self, w, bits, group_size, sym, v=None, min_scale=None, max_scale=None):
        codes, scale, zero, extras = super().quantize(w, bits, group_size, sym, v, min_scale, max_scale)
        tiled = scale[:: group_size].repeat_interleave(group_size, dim=0)[: scale.shape[0]]
        if not torch.equal(scale, tiled):
            raise ValueError("fp8_block: range factors differ within a tile, so its rows cannot share one scale")
        return codes, scale, zero, extras

    def storage_bits(self, out_features, in_features, bits, group_size, sym):
        tiles = -(-out_features // group_size) * -(-in_features // group_size)
        return out_features * in_features * bits + tiles * self.scale_bits
