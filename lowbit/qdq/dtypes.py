"""The registry of data types: name -> the one object that knows that type (base.py). Adding a
type is one new module in this folder plus its line here."""
from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.qdq.base import DataType
from lowbit.qdq.fp8 import FP8BlockType, FP8Type
from lowbit.qdq.int import IntType
from lowbit.qdq.kquant import KQUANT_TYPES
from lowbit.qdq.mx import MXType
from lowbit.qdq.nv import NVType

DTYPES: dict[str, DataType] = {t.name: t for t in (IntType(), MXType(), NVType(), FP8Type(), FP8BlockType(), *KQUANT_TYPES)}


def get_dtype(name: str) -> DataType:
    try:
        return DTYPES[name]
    except KeyError:
        raise LowbitError(f"data type {name!r} is not supported (have: {', '.join(DTYPES)})") from None
