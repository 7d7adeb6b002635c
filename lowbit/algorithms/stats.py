"""Statistics of the inputs of Linear layers, gathered by forward hooks while the pipeline runs a
block on the calibration data. An algorithm names the ones it needs (Algorithm.statistics)."""
from __future__ import annotations

import torch
from torch import nn


class _Collector:
    """Forward hooks on each Linear; `remove()` takes them off and returns {layer: statistic}."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor | None] = {n: None for n in layers}
        self.counts = dict.fromkeys(layers, 0)
        self.handles = [lin.register_forward_hook(self._hook(n)) for n, lin in layers.items()]

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = self.accumulate(x)
            self.sums[name] = s if self.sums[name] is None else self.combine(self.sums[name], s)
            self.counts[name] += x.shape[0]

        return hook

    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the tokens x [tokens, in_features] of what is averaged."""
        raise NotImplementedError

    def combine(self, total: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return total + s

    def remove(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {n: s / max(self.counts[n], 1) for n, s in self.sums.items() if s is not None}


class InputEnergy(_Collector):
    """Per input channel, the mean of x^2 over all tokens [in_features]: how strongly each channel
    is driven (the weighting of SignRoundV2's scale search, and the diagonal of X^T X)."""

    def accumulate(self, x):
        return x.pow(2).sum(0)


class InputGram(_Collector):
    """The mean of x x^T over all tokens [in_features, in_features]: X^T X / n, the Hessian of a
    layer's squared output error (what GPTQ-style solvers need)."""

    def accumulate(self, x):
        return x.T @ x


class TokenCount(_Collector):
    """How many tokens each layer saw: for a MoE expert, the tokens routed to it."""

    def accumulate(self, x):
        return torch.zeros(())

    def remove(self) -> dict[str, int]:
        for h in self.handles:
            h.remove()
        return dict(self.counts)


class InputAmax(_Collector):
    """The largest input magnitude each layer saw (a calibrated input scale's measure)."""

    def accumulate(self, x):
        return x.abs().amax() if x.numel() else torch.zeros(())

    def combine(self, total, s):
        return torch.maximum(total, s)

    def remove(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {n: s for n, s in self.sums.items() if s is not None}


COLLECTORS = {"input_energy": InputEnergy, "input_gram": InputGram, "tokens": TokenCount, "input_amax": InputAmax}
