"""What a format is: a class per format, an instance per choice of it (with its option, e.g. the
GGUF block type). The registry in __init__.py maps names to these classes.

Every format writes through a Writer that takes the model's tensors one at a time, in one order
(before the blocks, block by block, after them: model.stream_order), so a model quantized in
memory and one streamed block by block from its checkpoint give the same files, and a streamed
run can commit its writers after each block and resume them after a crash."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.model import ckpt_name, find_blocks, stored_names, stream_order
from lowbit.quantized import QuantizedWeight, QuantizeResult
from lowbit.schemes import Scheme

MAX_SHARD_SIZE = 5_000_000_000  # bytes; the Hugging Face default


@dataclass
class Layout:
    """What a writer knows before the first tensor: the model's config (its structure; the
    weights may be on the meta device), each quantized layer's scheme and shape, and the dtype
    the original stored its float weights in (float tensors are written in it, or derived from it).
    Layers and tensors are named as in the model's checkpoints (model.ckpt_name)."""

    model: object  # the model, for its config and shapes only
    tokenizer: object
    schemes: dict[str, Scheme]  # module name -> scheme, every layer that will be quantized
    shapes: dict[str, tuple[int, int]]  # module name -> (out, in)
    dtype: torch.dtype
    blocks_name: str
    max_shard_size: int = MAX_SHARD_SIZE
    recipe: str | None = None  # the llama.cpp mix the layers' types follow (lowbit/mixes.py), if any

    @property
    def config(self):
        return self.model.config

    @classmethod
    def of(cls, result: QuantizeResult, max_shard_size: int = MAX_SHARD_SIZE) -> "Layout":
        dtype = result.dtype or next(result.model.parameters()).dtype
        m = result.model
        return cls(m, result.tokenizer, {ckpt_name(m, n): q.scheme for n, q in result.layers.items()},
                   {ckpt_name(m, n): tuple(q.codes.shape) for n, q in result.layers.items()}, dtype,
                   find_blocks(m)[0], max_shard_size, result.report.get("recipe"))


class Writer:
    """One format being written into one folder: `add` each tensor in stream order (with its
    QuantizedWeight if it is a quantized layer's weight), `commit` after a block (a state to
    resume from), `close` with the report."""

    def add(self, name: str, tensor: torch.Tensor, q: QuantizedWeight | None) -> None:
        raise NotImplementedError

    def commit(self) -> dict:
        raise NotImplementedError

    def close(self, report: dict) -> None:
        raise NotImplementedError


class Format:
    """Subclasses set `name` (and `options` / `default_option` if the format takes an option) and
    implement `check` and `write`; formats lowbit can load back implement `detect`, `load` and
    `read` too."""

    name: str = ""
    loads: bool = False  # lowbit can load it back (detect, load and read are implemented)
    options: tuple[str, ...] = ()  # the values of "name:option"; empty: the format takes none
    default_option: str | None = None
    loaded_by: str = ""  # the tools that load it, for the summary a run ends with

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

    def open(self, folder: str, layout: Layout, state: dict | None = None) -> Writer:
        """A writer into `folder`: a new one, or the one a commit's state describes."""
        raise NotImplementedError

    def write(self, result: QuantizeResult, folder: str, max_shard_size: int = MAX_SHARD_SIZE) -> None:
        """Write `result` into `folder` (which exists and is empty)."""
        layout = Layout.of(result, max_shard_size)
        writer = self.open(folder, layout)
        for name, tensor in ordered_tensors(result.model, layout.blocks_name):
            writer.add(ckpt_name(result.model, name), tensor, result.layers.get(name.removesuffix(".weight")))
        writer.close(result.report)

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


def ordered_tensors(model, blocks_name: str):
    """(model name, tensor) of everything a checkpoint of `model` stores, in stream order."""
    state = model.state_dict()
    n_blocks = len(model.get_submodule(blocks_name))
    before, blocks, after = stream_order(stored_names(model), blocks_name, n_blocks)
    for name in before + [n for b in blocks for n in b] + after:
        yield name, state[name].detach()
