"""Pure tensor math: quantize-dequantize. Knows nothing about models or files."""
from lowbit.qdq.int import (
    QuantizedWeight,
    fake_quantize,
    fake_quantize_groups,
    fake_quantize_tuned,
    from_groups,
    group_params,
    group_range,
    n_groups,
    quantize,
    round_ste,
    to_groups,
)

__all__ = [
    "QuantizedWeight",
    "fake_quantize",
    "fake_quantize_groups",
    "fake_quantize_tuned",
    "from_groups",
    "group_params",
    "group_range",
    "n_groups",
    "quantize",
    "round_ste",
    "to_groups",
]
