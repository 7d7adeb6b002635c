"""What every algorithm takes and returns, and what the pipeline may ask of it.

An algorithm is a frozen config with the methods of `Algorithm`: one block in (its Linear layers,
their schemes, calibration data), quantized weights out. The pipeline never probes an algorithm
for optional attributes; everything it may ask is listed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import nn

from lowbit.quantized import QuantizedWeight
from lowbit.schemes import Scheme


@dataclass
class BlockData:
    """Calibration data for one block: its inputs (outputs of the blocks already quantized),
    the keyword arguments it is called with, and the full-precision block's outputs (the targets:
    on full-precision inputs, or on these inputs where the algorithm's target is "block"); and
    the statistics of the inputs of its Linear layers that the algorithm asked for ({statistic name: {layer name: tensor}}, see stats.py)."""

    inputs: torch.Tensor  # [n, seqlen, hidden]
    kwargs: dict
    targets: torch.Tensor  # [n, seqlen, hidden]
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class BlockResult:
    weights: dict[str, QuantizedWeight]
    stats: dict = field(default_factory=dict)
    # The weights tuning started from (round to nearest, or the pre-tuning scale search), when an
    # algorithm tunes: the pipeline keeps them instead if the tuned weights end with a higher loss
    # on all the calibration windows. None: nothing to compare with.
    start: dict[str, QuantizedWeight] | None = None


# name inside the block -> (the Linear, its scheme)
LayerMap = dict[str, tuple[nn.Linear, Scheme]]


class Algorithm(Protocol):
    name: ClassVar[str]
    needs_data: ClassVar[bool]  # calibration data: targets and inputs per block
    # The targets: "block", the float block's outputs on the quantized model's inputs
    # (BlockData.inputs); else ("model", None) on the float model's inputs.
    target: str | None

    @property
    def block_batch_size(self) -> int:
        """Windows per forward pass when the pipeline runs a block over the calibration data."""

    def tuning_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype the block runs in while it is tuned (None: the weights' own); the
        pipeline computes targets and next inputs under the same one."""

    def settings(self, schemes: list[Scheme], device: torch.device) -> dict:
        """The settings as they take effect for layers of these schemes on this device (every
        None default resolved), for the header line and quantization.json."""

    def statistics(self, schemes: list[Scheme]) -> tuple[str, ...]:
        """Names of the input statistics (stats.COLLECTORS) to gather for a block whose layers
        have these schemes."""

    def quantize_block(self, block: nn.Module, layers: LayerMap, data: BlockData | None, seed: int,
                       run: dict) -> BlockResult:
        """Quantize one block. `run` is a scratch dict the pipeline creates once per quantize call
        and hands to every block: what an algorithm learns on one block (a compile that failed)
        carries to the next blocks of the same run and no further. The pipeline sets its
        "progress" to a label ("block 3/30") when progress is shown, else None."""


def token_scales(target: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """1 / each token's root mean square (over the last dimension), float32, shape [..., 1]: a
    token's errors times this are relative to its size, which is how the next block sees them
    (through its RMSNorm/LayerNorm), so a few huge "attention sink" tokens do not outweigh the
    rest. Computed `chunk` windows at a time: a float32 copy of all targets can be gigabytes."""
    return torch.cat([t.float().pow(2).mean(-1, keepdim=True).clamp(min=1e-12).rsqrt() for t in target.split(chunk)])


def squared_errors(out: torch.Tensor, target: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """A block's squared output errors, in float32; relative: each token's divided by its target's
    mean square (`token_scales`)."""
    out, target = out.float(), target.float()
    if relative:
        s = token_scales(target)
        out, target = out * s, target * s
    return (out - target).pow(2)
