"""Round to nearest: each weight to its nearest level, no data needed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lowbit.algorithms.base import BlockData, BlockResult, LayerMap
from lowbit.qdq import quantize


@dataclass(frozen=True)
class RTN:
    name: ClassVar[str] = "rtn"
    needs_data: ClassVar[bool] = False

    def quantize_block(self, block, layers: LayerMap, data: BlockData | None = None, seed: int = 0) -> BlockResult:
        weights = {
            name: quantize(lin.weight, s.bits, s.group_size, s.sym) for name, (lin, s) in layers.items()
        }
        return BlockResult(weights)
