"""Quantized inputs while a model runs: a forward pre-hook on each Linear whose scheme names an
activation type replaces its input by the fake-quantized one (lowbit.qdq.act), so the model
computes what W4A4 / W8A8 hardware computes. The pipeline turns them on while a block is tuned and
its outputs computed (never for the full-precision targets); a quantized model keeps them, and a
fake folder gets them back when loaded.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

from torch import nn

from lowbit.qdq.act import get_activation


def _hook(act):
    def pre_hook(module, args):
        return (act(args[0]), *args[1:])

    return pre_hook


def quantize_inputs(layers: Mapping[str, tuple[nn.Module, str | None]]) -> list:
    """Hook every (module, activation type) of `layers` whose type is not None; returns the hook
    handles (handle.remove() takes one off)."""
    return [module.register_forward_pre_hook(_hook(get_activation(act)))
            for module, act in layers.values() if act is not None]


@contextmanager
def inputs_quantized(layers: Mapping[str, tuple[nn.Module, str | None]]):
    """quantize_inputs for the duration of a with-block."""
    handles = quantize_inputs(layers)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def quantize_model_inputs(model: nn.Module, acts: Mapping[str, str | None]) -> int:
    """Hook the layers {full module name: activation type} of a whole model; returns how many."""
    modules = dict(model.named_modules())
    return len(quantize_inputs({n: (modules[n], a) for n, a in acts.items() if a is not None}))
