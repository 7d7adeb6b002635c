"""Running packed models: QuantLinear (a Linear whose weight stays packed) and its kernels.
Loading a packed folder is its format's job (lowbit.export.packed)."""
from lowbit.runtime.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
