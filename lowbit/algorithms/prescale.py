"""Pre-tuning scale search (SignRoundV2): per group, the range factor that minimizes the
quantization error weighted by how strongly each input channel is driven.

The error of a weight matters in proportion to the energy of the input it multiplies, so each
group's range is shrunk by the factor from a grid that minimizes sum_j imp_j * (w_j - Q(w_j))^2,
with imp_j the mean of x_j^2 over the calibration tokens (the "importance matrix"). The factor
multiplies both ends of the min/max range, which is what SignRound's min/max factors start from.
"""
from __future__ import annotations

import torch

from lowbit.qdq import fake_quantize_groups, to_groups

DEFAULT_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(31))  # 1.00, 0.98, ..., 0.40


@torch.no_grad()
def search_range_factors(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    importance: torch.Tensor | None = None,
    grid=DEFAULT_GRID,
) -> torch.Tensor:
    """Best factor per group, [out, n_groups], for weight w [out, in] and importance [in]."""
    wg = to_groups(w.detach().float(), group_size)  # [out, ng, g]
    if importance is None:
        imp = torch.ones_like(wg)
    else:
        imp = to_groups(importance.float().expand_as(w), group_size)
        imp = _mask_padding(imp, w.shape[1], group_size)
    best_err = torch.full(wg.shape[:-1], float("inf"), device=wg.device)
    best = torch.ones(wg.shape[:-1], device=wg.device)
    for a in grid:
        f = torch.full((*wg.shape[:-1], 1), a, device=wg.device)
        err = ((fake_quantize_groups(wg, bits, sym, min_scale=f, max_scale=f) - wg) ** 2 * imp).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, a), best)
    return best


def _mask_padding(imp_g: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Zero the importance of the padding columns of a last partial group."""
    flat = imp_g.reshape(imp_g.shape[0], -1).clone()
    flat[:, in_features:] = 0
    return flat.view_as(imp_g)


class InputEnergy:
    """Forward hooks that accumulate, per Linear, the mean of x^2 over all input tokens."""

    def __init__(self, layers: dict):
        self.sums = {n: None for n in layers}
        self.counts = dict.fromkeys(layers, 0)
        self.handles = [lin.register_forward_hook(self._hook(n)) for n, lin in layers.items()]

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = x.pow(2).sum(0)
            self.sums[name] = s if self.sums[name] is None else self.sums[name] + s
            self.counts[name] += x.shape[0]

        return hook

    def remove(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {n: s / max(self.counts[n], 1) for n, s in self.sums.items() if s is not None}

