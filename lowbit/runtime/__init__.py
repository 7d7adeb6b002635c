"""Running packed models: QuantLinear and the loader for auto_round / gptq folders."""
from lowbit.runtime.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
