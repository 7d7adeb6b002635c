"""What to quantize to: a small frozen dataclass and named presets."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.qdq import get_dtype


@dataclass(frozen=True)
class Scheme:
    """Weight-only quantization scheme: bits, group size (-1 = per output channel), symmetry, and
    the data type (a name in lowbit.qdq.DTYPES), which says which combinations it takes."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    dtype: str = "int"

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise LowbitError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size == 0 or self.group_size < -1:
            raise LowbitError(
                f"group_size must be a positive integer or -1 (per channel), got {self.group_size!r}"
            )
        reason = get_dtype(self.dtype).check(self.bits, self.group_size, self.sym)
        if reason:
            raise LowbitError(reason)

    @property
    def data_type(self):
        """The registered data type object (lowbit.qdq.base.DataType) of the weights."""
        return get_dtype(self.dtype)

    @property
    def name(self) -> str:
        g = "" if self.group_size == 128 else (f"G{self.group_size}" if self.group_size > 0 else "PC")
        return f"W{self.bits}A16{g}" + ("" if self.sym else "-asym")

    def replace(self, **changes) -> "Scheme":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise LowbitError(f"unknown scheme keys: {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    "W2A16": Scheme(2, 128),
    "W3A16": Scheme(3, 128),
    "W4A16": Scheme(4, 128),
    "W8A16": Scheme(8, 128),
    "W2A16G64": Scheme(2, 64),
    "W2A16G32": Scheme(2, 32),
}


_NAME = re.compile(r"W(\d+)A16(?:G(\d+)|(PC))?(-ASYM)?")


def get_scheme(name: str, group_size: int | None = None, sym: bool | None = None) -> Scheme:
    """A scheme by name (case-insensitive): a preset, or any W<bits>A16[G<group>|PC][-asym]
    (group 128 when not named), with the group size or symmetry overridden if given."""
    key = name.strip().upper()
    m = _NAME.fullmatch(key)
    if key not in PRESETS and not m:
        raise LowbitError(f"unknown scheme {name!r} (presets: {', '.join(PRESETS)}; or e.g. W3A16G64, W4A16PC-asym)")
    if key in PRESETS:
        base = PRESETS[key]
    else:
        base = Scheme(int(m.group(1)), int(m.group(2)) if m.group(2) else (-1 if m.group(3) else 128), not m.group(4))
    return base.replace(group_size=group_size, sym=sym)
