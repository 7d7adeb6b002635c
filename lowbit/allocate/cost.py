"""Storage cost of quantized Linear weights, in bits, as the packed checkpoint stores them."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from lowbit.errors import LowbitError
from lowbit.schemes import Scheme

SCALE_BITS = 16  # one fp16 scale per group and output row


def layer_bits(out_features: int, in_features: int, scheme: Scheme) -> int:
    """Bits needed to store one [out_features, in_features] Linear weight under `scheme`.

    Each weight takes `scheme.bits`; each group of `group_size` input channels (the whole row
    when group_size is -1) of each output row adds a 16-bit fp16 scale and a `bits`-bit zero
    point. The zero point is counted even for symmetric schemes because the GPTQ/auto-round
    packed layout (qweight, scales, qzeros) always stores qzeros, so a symmetric layer is not
    cheaper on disk or in GPU memory. A partial last group costs as much as a full one.
    """
    if out_features <= 0 or in_features <= 0:
        raise LowbitError(f"a Linear needs positive shape, got {out_features}x{in_features}")
    groups = 1 if scheme.group_size == -1 else math.ceil(in_features / scheme.group_size)
    return out_features * in_features * scheme.bits + out_features * groups * (SCALE_BITS + scheme.bits)


def average_bits(plan_costs: Mapping[str, int] | Iterable[int], n_weights: int) -> float:
    """Bits per weight of a plan: its summed cost (a layer -> bits mapping or plain numbers),
    over the number of weights it covers. Includes the scale and zero-point overhead."""
    if n_weights <= 0:
        raise LowbitError(f"n_weights must be positive, got {n_weights}")
    costs = plan_costs.values() if isinstance(plan_costs, Mapping) else plan_costs
    return sum(costs) / n_weights
