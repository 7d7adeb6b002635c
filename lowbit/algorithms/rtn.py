"""Round to nearest: each weight to its nearest level, no data needed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lowbit.algorithms.base import BlockData, BlockResult, LayerMap
from lowbit.algorithms.prescale import search_range_factors, weight_importance
from lowbit.qdq.kquant import FORMATS as LLAMA_CPP_TYPES
from lowbit.quantized import quantize_weight


@dataclass(frozen=True)
class RTN:
    # Before rounding, choose each group's range for the least weighted squared weight error
    # (prescale.search_range_factors, weighted by prescale.weight_importance: no data). None: for
    # llama.cpp's block types, whose own quantizer searches too, and types with a grid of their own
    # (MX: which exponent each block's scale takes); other types keep the plain min/max rounding,
    # the textbook baseline.
    search: bool | None = None

    name: ClassVar[str] = "rtn"
    needs_data: ClassVar[bool] = False
    block_batch_size: ClassVar[int] = 8
    target: ClassVar[str] = "model"

    def searches(self, scheme) -> bool:
        if self.search is not None:
            return self.search
        return scheme.dtype in LLAMA_CPP_TYPES or scheme.data_type.range_grid is not None

    def tuning_dtype(self, device):
        return None

    def settings(self, schemes, device):
        return {"search": sorted({s.name for s in schemes if self.searches(s)}) or False}

    def statistics(self, schemes):
        return ()

    def quantize_block(self, block, layers: LayerMap, data: BlockData | None = None, seed: int = 0,
                       run: dict | None = None) -> BlockResult:
        out = {}
        for name, (lin, s) in layers.items():
            mn, mx = (search_range_factors(lin.weight, s, weight_importance(lin.weight)) if self.searches(s)
                      else (None, None))
            out[name] = quantize_weight(lin.weight, s, min_scale=mn, max_scale=mx)
        return BlockResult(out)
