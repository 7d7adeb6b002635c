"""Algorithms: each a frozen config with quantize_block(block, layers, data, seed) -> BlockResult."""
from __future__ import annotations

import dataclasses

from lowbit.algorithms.base import BlockData, BlockResult
from lowbit.algorithms.rtn import RTN
from lowbit.algorithms.signround import SignRound
from lowbit.errors import LowbitError

ALGORITHMS = {cls.name: cls for cls in (RTN, SignRound)}


def get_algorithm(name: str, **settings):
    """An algorithm config by name; settings it does not have are an error."""
    cls = ALGORITHMS.get(name.lower())
    if cls is None:
        raise LowbitError(f"unknown algorithm {name!r} (have: {', '.join(ALGORITHMS)})")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = {k for k, v in settings.items() if v is not None} - fields
    if unknown:
        raise LowbitError(f"algorithm {cls.name!r} has no setting(s) {sorted(unknown)}")
    return cls(**{k: v for k, v in settings.items() if v is not None})


__all__ = ["ALGORITHMS", "BlockData", "BlockResult", "RTN", "SignRound", "get_algorithm"]
