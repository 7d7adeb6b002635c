"""What a format is: a class per format, an instance per choice of it (with its option, e.g. the
GGUF block type). The registry in __init__.py maps names to these classes."""
from __future__ import annotations

from lowbit.quantized import QuantizeResult
from lowbit.schemes import Scheme


class Format:
    """Subclasses set `name` (and `options` / `default_option` if the format takes an option) and
    implement `check` and `write`; formats lowbit can load back implement `detect`, `load` and
    `read` too."""

    name: str = ""
    loads: bool = False  # lowbit can load it back (detect, load and read are implemented)
    options: tuple[str, ...] = ()  # the values of "name:option"; empty: the format takes none
    default_option: str | None = None

    def __init__(self, option: str | None = None):
        self.option = option if option is not None else self.default_option

    @property
    def tag(self) -> str:
        """The subfolder name when several formats are written at once."""
        return f"{self.name}-{self.option}" if self.option else self.name

    def check(self, scheme: Scheme) -> str | None:
        """Why this format cannot store a layer of this scheme, or None when it can."""
        raise NotImplementedError

    def check_model(self, model_type: str | None) -> str | None:
        """Why this format cannot hold this kind of model, or None when it can."""
        return None

    def write(self, result: QuantizeResult, folder: str) -> None:
        """Write `result` into `folder` (which exists and is empty)."""
        raise NotImplementedError

    @classmethod
    def detect(cls, folder: str) -> bool:
        """Whether `folder` holds this format, for lowbit to load."""
        return False

    @classmethod
    def load(cls, folder: str):
        """(model, tokenizer) ready to run."""
        raise NotImplementedError(f"lowbit cannot load the {cls.name} format")

    @classmethod
    def read(cls, folder: str) -> QuantizeResult:
        """The model with dequantized float weights and each layer's codes, for re-export."""
        raise NotImplementedError(f"lowbit cannot read the {cls.name} format back")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.option!r})" if self.option else f"{type(self).__name__}()"
