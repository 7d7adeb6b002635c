"""Quantized inputs while a model runs: a forward pre-hook on each Linear whose scheme names an
activation type replaces its input by the fake-quantized one (lowbit.qdq.act), so the model
computes what W4A4 / W8A8 hardware computes. The pipeline turns them on while a block is tuned and
its outputs computed (never for the full-precision targets); a quantized model keeps them, and a
fake folder gets them back when loaded. A type with a calibrated scale (NVFP4's input global
scale) takes the layer's from `scales` (the pipeline measures it on the calibration data and keeps
it in the layer's QuantizedWeight.extras["input_global_scale"]).
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.qdq.act import get_activation

INPUT_SCALE = "input_global_scale"  # the QuantizedWeight.extras key of a calibrated input scale


def _hook(act, scale):
    def pre_hook(module, args):
        return (act(args[0], scale), *args[1:])

    return pre_hook


def quantize_inputs(layers: Mapping[str, tuple[nn.Module, str | None]],
                    scales: Mapping[str, torch.Tensor] | None = None) -> list:
    """Hook every (module, activation type) of `layers` whose type is not None, with its
    calibrated scale from `scales` if any; returns the hook handles (handle.remove() takes one off)."""
    scales = scales or {}
    return [module.register_forward_pre_hook(_hook(get_activation(act), scales.get(n)))
            for n, (module, act) in layers.items() if act is not None]


@contextmanager
def inputs_quantized(layers: Mapping[str, tuple[nn.Module, str | None]],
                     scales: Mapping[str, torch.Tensor] | None = None):
    """quantize_inputs for the duration of a with-block."""
    handles = quantize_inputs(layers, scales)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def quantize_model_inputs(model: nn.Module, acts: Mapping[str, str | None],
                          scales: Mapping[str, torch.Tensor] | None = None) -> int:
    """Hook the layers {full module name: activation type} of a whole model (calibrated scales
    {full module name: scale}); returns how many."""
    modules = dict(model.named_modules())
    return len(quantize_inputs({n: (modules[n], a) for n, a in acts.items() if a is not None}, scales))


def input_scales(weights: Mapping) -> dict[str, torch.Tensor]:
    """{layer: calibrated input scale} of QuantizedWeights that carry one."""
    return {n: q.extras[INPUT_SCALE] for n, q in weights.items() if INPUT_SCALE in q.extras}
