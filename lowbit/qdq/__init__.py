"""Pure tensor math: the data types (quantize, dequantize, fake-quantize, storage cost), groups,
bit packing. Knows nothing about models, files or schemes; imports nothing of lowbit but its
errors."""
from lowbit.qdq.base import DataType
from lowbit.qdq.dtypes import DTYPES, get_dtype
from lowbit.qdq.groups import from_groups, n_groups, round_ste, to_groups

__all__ = ["DTYPES", "DataType", "get_dtype", "from_groups", "n_groups", "round_ste", "to_groups"]
