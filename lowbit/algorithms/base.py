"""What every algorithm takes and returns: one block in, quantized weights out."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.qdq import QuantizedWeight
from lowbit.schemes import Scheme


@dataclass
class BlockData:
    """Calibration data for one block: its inputs (outputs of the blocks already quantized),
    the keyword arguments it is called with, and the full-precision block's outputs on
    full-precision inputs (the targets); optionally, per Linear, the mean x^2 of its input
    channels (for algorithms that weight errors by activation energy)."""

    inputs: torch.Tensor  # [n, seqlen, hidden]
    kwargs: dict
    targets: torch.Tensor  # [n, seqlen, hidden]
    importance: dict[str, torch.Tensor] | None = None  # layer name -> [in_features]


@dataclass
class BlockResult:
    weights: dict[str, QuantizedWeight]
    stats: dict = field(default_factory=dict)


# name inside the block -> (the Linear, its scheme)
LayerMap = dict[str, tuple[nn.Linear, Scheme]]
