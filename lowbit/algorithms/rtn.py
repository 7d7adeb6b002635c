"""Round to nearest: each weight to its nearest level, no data needed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lowbit.algorithms.base import BlockData, BlockResult, LayerMap
from lowbit.quantized import quantize_weight


@dataclass(frozen=True)
class RTN:
    name: ClassVar[str] = "rtn"
    needs_data: ClassVar[bool] = False
    block_batch_size: ClassVar[int] = 8

    def tuning_dtype(self, device):
        return None

    def settings(self, schemes, device):
        return {}

    def statistics(self, schemes):
        return ()

    def quantize_block(self, block, layers: LayerMap, data: BlockData | None = None, seed: int = 0,
                       run: dict | None = None) -> BlockResult:
        return BlockResult({name: quantize_weight(lin.weight, s) for name, (lin, s) in layers.items()})
