"""Storage cost of quantized Linear weights, in bits, as the packed checkpoint stores them."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from lowbit.errors import LowbitError
from lowbit.schemes import Scheme


def layer_bits(out_features: int, in_features: int, scheme: Scheme) -> int:
    """Bits needed to store one [out_features, in_features] Linear weight under `scheme`, scales
    and zero points included: what its data type says it costs (DataType.storage_bits)."""
    if out_features <= 0 or in_features <= 0:
        raise LowbitError(f"a Linear needs positive shape, got {out_features}x{in_features}")
    return scheme.data_type.storage_bits(out_features, in_features, scheme.bits, scheme.group_size, scheme.sym)


def average_bits(plan_costs: Mapping[str, int] | Iterable[int], n_weights: int) -> float:
    """Bits per weight of a plan: its summed cost (a layer -> bits mapping or plain numbers),
    over the number of weights it covers. Includes the scale and zero-point overhead."""
    if n_weights <= 0:
        raise LowbitError(f"n_weights must be positive, got {n_weights}")
    costs = plan_costs.values() if isinstance(plan_costs, Mapping) else plan_costs
    return sum(costs) / n_weights
