"""Pre-tuning scale search (SignRoundV2): per group, the range factor that minimizes the
quantization error weighted by how strongly each input channel is driven.

The error of a weight matters in proportion to the energy of the input it multiplies, so each
group's range is shrunk by the factor from a grid that minimizes sum_j imp_j * (w_j - Q(w_j))^2,
with imp_j the mean of x_j^2 over the calibration tokens (the "importance matrix"). The factor
multiplies both ends of the min/max range, which is what SignRound's min/max factors start from.
"""
from __future__ import annotations

import torch

from lowbit.qdq import to_groups
from lowbit.schemes import Scheme

DEFAULT_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(31))  # 1.00, 0.98, ..., 0.40


@torch.no_grad()
def search_range_factors(
    w: torch.Tensor,
    scheme: Scheme,
    importance: torch.Tensor | None = None,
    grid=DEFAULT_GRID,
) -> torch.Tensor:
    """Best factor per group, [out, n_groups], for weight w [out, in] and importance [in]."""
    group_size, dtype = scheme.group_size, scheme.data_type
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
        qdq = dtype.fake_quantize(wg, scheme.bits, scheme.sym, min_scale=f, max_scale=f)
        err = ((qdq - wg) ** 2 * imp).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, a), best)
    return best


def _mask_padding(imp_g: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Zero the importance of the padding columns of a last partial group."""
    flat = imp_g.reshape(imp_g.shape[0], -1).clone()
    flat[:, in_features:] = 0
    return flat.view_as(imp_g)
