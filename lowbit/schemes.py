"""What to quantize to: a small frozen dataclass and named presets."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.qdq import get_dtype
from lowbit.qdq.act import get_activation
from lowbit.qdq.kquant import FORMATS as KQUANT_FORMATS

# The group size a float type's name implies (MX blocks of 32, NVFP4 of 16, FP8 per channel,
# FP8_BLOCK tiles of 128 x 128), and the names of the FP8 types (MX and NV: MXFP4, NVFP4, ...).
FLOAT_GROUPS = {"mxfp": 32, "nvfp": 16, "fp8": -1, "fp8_block": 128}
FP8_NAMES = {"fp8": ("FP8", "fp8"), "fp8_block": ("FP8_BLOCK", "fp8_g128")}  # dtype: (name, its own inputs)
RCEIL = "_rceil"  # MX inputs whose scale rounds up (qdq/act.py): a scheme name's "-rceil"


def _float_names(dtype: str, bits: int) -> tuple[str, str]:
    """(the name, the activation type it implies) of a float weight type at `bits`."""
    return FP8_NAMES.get(dtype, (f"{dtype.upper()}{bits}", f"{dtype}{bits}"))


@dataclass(frozen=True)
class Scheme:
    """How a Linear is quantized: its weights' bits, group size (-1 = per output channel),
    symmetry and data type (a name in lowbit.qdq.DTYPES, which says which combinations it takes);
    and the type its inputs are quantized to while it runs (a name in lowbit.qdq.act.ACTIVATIONS;
    None: they stay in 16 bits, weight-only)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    dtype: str = "int"
    act: str | None = None

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
        if self.act is not None:
            get_activation(self.act)
        if self.dtype in KQUANT_FORMATS:
            inputs = KQUANT_FORMATS[self.dtype].inputs
            if self.act not in (None, inputs):
                raise LowbitError(f"gguf:{self.dtype} layers take 16-bit inputs or llama.cpp's {inputs} "
                                  f"(gguf:{self.dtype}-q8), not {self.act}")
        elif self.act is not None and get_activation(self.act).family == "ggml":
            raise LowbitError(f"{self.act} inputs are llama.cpp's rounding for its own types (gguf:...-q8), "
                              f"not for {self.dtype} weights")

    @property
    def act_bits(self) -> int:
        return get_activation(self.act).bits if self.act else 16

    @property
    def data_type(self):
        """The registered data type object (lowbit.qdq.base.DataType) of the weights."""
        return get_dtype(self.dtype)

    @property
    def name(self) -> str:
        """The name get_scheme reads back: W4A16G64, W4A8 (int8 inputs), MXFP4 (W4A4),
        MXFP4A16 (weights only), NVFP4, FP8 (W8A8), FP8G128A16, MXFP8-rceil, ..."""
        if self.act is not None and self.act.endswith(RCEIL):
            return dataclasses.replace(self, act=self.act.removesuffix(RCEIL)).name + "-rceil"
        if self.dtype in KQUANT_FORMATS:
            return f"gguf:{self.dtype}" + ("" if self.act is None else "-q8")
        if self.dtype == "int":
            g = "" if self.group_size == 128 else (f"G{self.group_size}" if self.group_size > 0 else "PC")
            act = {None: "A16", "int8": "A8"}.get(self.act, f"A16-{self.act}")
            name = f"W{self.bits}{act[:3]}{g}" + act[3:]
            return name + ("" if self.sym else "-asym")
        base, own = _float_names(self.dtype, self.bits)
        g = "" if self.group_size == FLOAT_GROUPS[self.dtype] else (f"G{self.group_size}" if self.group_size > 0 else "PC")
        act = "A16" if self.act is None else "" if self.act == own else f"-{self.act}"
        return base + g + act

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
    # weights and inputs in the same float type (the MX and NVFP4 formats, FP8 W8A8)
    "MXFP4": Scheme(4, 32, dtype="mxfp", act="mxfp4"),
    "MXFP8": Scheme(8, 32, dtype="mxfp", act="mxfp8"),
    "NVFP4": Scheme(4, 16, dtype="nvfp", act="nvfp4"),
    "FP8": Scheme(8, -1, dtype="fp8", act="fp8"),
    "FP8_BLOCK": Scheme(8, 128, dtype="fp8_block", act="fp8_g128"),
    # integer weights, int8 inputs per token
    "W4A8": Scheme(4, 128, act="int8"),
    "W8A8": Scheme(8, -1, act="int8"),
    # weights only
    "W2A16": Scheme(2, 128),
    "W3A16": Scheme(3, 128),
    "W4A16": Scheme(4, 128),
    "W8A16": Scheme(8, 128),
    "W2A16G64": Scheme(2, 64),
    "W2A16G32": Scheme(2, 32),
    # llama.cpp's block types, tuned on their own grid (auto-round's spelling; Q2_K works too)
    **{f"GGUF:{k.upper()}": Scheme(f.bits, f.group, not f.mins, dtype=k) for k, f in KQUANT_FORMATS.items()},
}
PRESETS.update({k.upper(): PRESETS[f"GGUF:{k.upper()}"] for k in KQUANT_FORMATS})


_FLOAT_INPUTS = "-MXFP4|-MXFP8|-NVFP4|-FP8_G128|-FP8"
_INT = re.compile(rf"W(\d+)A(16|8)(?:G(\d+)|(PC))?({_FLOAT_INPUTS})?(-ASYM)?")
_FLOAT = re.compile(rf"(?:(MXFP|NVFP)(\d+)|FP8(_BLOCK)?)(?:G(\d+)|(PC))?(A16|{_FLOAT_INPUTS}|-INT8)?")


def _parse(key: str) -> Scheme | None:
    m = _INT.fullmatch(key)
    if m:
        act = "int8" if m.group(2) == "8" else m.group(5)[1:].lower() if m.group(5) else None
        group = int(m.group(3)) if m.group(3) else (-1 if m.group(4) else 128)
        return Scheme(int(m.group(1)), group, not m.group(6), act=act)
    m = _FLOAT.fullmatch(key)
    if not m:
        return None
    kind, bits, block, group, pc, act = m.groups()
    dtype, bits = (kind.lower(), int(bits)) if kind else ("fp8_block" if block else "fp8", 8)
    own = _float_names(dtype, bits)[1]
    act = own if act is None else None if act == "A16" else act[1:].lower()
    group = int(group) if group else (-1 if pc else FLOAT_GROUPS[dtype])
    return Scheme(bits, group, dtype=dtype, act=act)


def as_scheme(s: "Scheme | str") -> Scheme:
    """A Scheme given as itself or by name."""
    return get_scheme(s) if isinstance(s, str) else s


def get_scheme(name: str, group_size: int | None = None, sym: bool | None = None) -> Scheme:
    """A scheme by name (case-insensitive): a preset, W<bits>A16|A8[G<group>|PC][-asym] (group 128
    when not named; A8: int8 inputs per token), or a float type MXFP4|MXFP8|NVFP4|FP8|FP8_BLOCK with its
    own inputs, A16 for weights only (MXFP4A16), or -<act> for other inputs (-rceil after MX
    inputs: their scale rounded up, as NVIDIA's kernels do: MXFP8-rceil); llama.cpp's types
    gguf:q4_k (Q4_K), with -q8 for inputs rounded as llama.cpp's CPU kernels round them; with the
    group size or symmetry overridden if given."""
    key = name.strip().upper()
    if key.endswith("-RCEIL"):  # MXFP8-rceil, W4A16-MXFP4-rceil: MX inputs, scale rounded up
        base = get_scheme(key.removesuffix("-RCEIL"), group_size, sym)
        if base.act not in ("mxfp4", "mxfp8"):
            raise LowbitError(f"{name}: -rceil rounds up the scale of MX inputs; {base.name} has "
                              f"{base.act or '16-bit'} inputs")
        return base.replace(act=base.act + RCEIL)
    base = PRESETS.get(key) or _parse(key)
    plain = PRESETS.get(key.removesuffix("-Q8"))
    if base is None and plain is not None and plain.dtype in KQUANT_FORMATS:  # gguf:q4_k-q8
        base = plain.replace(act=KQUANT_FORMATS[plain.dtype].inputs)
    if base is None:
        raise LowbitError(f"unknown scheme {name!r} (presets: {', '.join(k for k in PRESETS if k.lower() not in KQUANT_FORMATS)}; or e.g. W3A16G64, W4A16PC-asym, "
                          "MXFP4A16, gguf:q4_k-q8, Q4_K_M)")
    return base.replace(group_size=group_size, sym=sym)
