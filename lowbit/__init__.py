"""lowbit: post-training quantization of LLMs to 2-8 bits (SignRound, RTN)."""
from lowbit.version import __version__  # noqa: E402

from lowbit.algorithms import RTN, SignRound, get_algorithm  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.schemes import PRESETS as SCHEMES, Scheme, get_scheme  # noqa: E402
from lowbit.quantized import QuantizedWeight, QuantizeResult  # noqa: E402
from lowbit.pipeline import quantize  # noqa: E402
from lowbit.api import evaluate, load  # noqa: E402

__all__ = [
    "RTN", "SignRound", "get_algorithm", "LowbitError", "SCHEMES", "Scheme", "get_scheme",
    "QuantizedWeight", "QuantizeResult", "quantize", "evaluate", "load", "__version__",
]
