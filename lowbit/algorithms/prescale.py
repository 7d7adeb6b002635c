"""Pre-tuning scale search (SignRoundV2): per group, the range that minimizes the quantization
error weighted by how strongly each input channel is driven.

The error of a weight matters in proportion to the energy of the input it multiplies, so each
group's range is chosen to minimize sum_j imp_j * (w_j - Q(w_j))^2, with imp_j the mean of x_j^2
over the calibration tokens (the "importance matrix"; all ones without data). The result is a
factor on each end of the group's min/max range, which is what SignRound's min/max factors start
from. Candidates, each scored by the data type's own quantize-dequantize (sub-block scales and
all):

- both ends shrunk by one factor from a grid (1.00, 0.98, ..., 0.40; MX types: the exponents
  around the spec's, mx.py);
- for types that store each group's min as a number (llama.cpp's Q2_K, Q4_K, Q5_K, Q4_1, Q5_1),
  also the weighted least-squares fit of a scale and a min to the codes that each of 21 trial
  scales gives (the way llama.cpp's quantizer fits its sub-blocks): the two ends move apart, which
  one shared factor cannot do (tests/test_prescale.py: its weighted error at least 3-10% below the
  grid's alone). An integer zero point rounds the fitted min away, so int types search the grid only.
"""
from __future__ import annotations

import torch

from lowbit.qdq import to_groups
from lowbit.schemes import Scheme

DEFAULT_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(31))  # 1.00, 0.98, ..., 0.40
TRIAL_STEPS = tuple(-1.0 + 0.1 * i for i in range(21))  # trial scales: range / (levels - 1 + step)


@torch.no_grad()
def search_range_factors(
    w: torch.Tensor,
    scheme: Scheme,
    importance: torch.Tensor | None = None,
    grid=None,
    least_squares: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (min factor, max factor) per group, each [out, n_groups], for weight w [out, in] and
    importance [in] (or one per weight, [out, in]); grid: the shared factors to try (None: the
    type's own range_grid, else DEFAULT_GRID); least_squares: add the fitted candidate where the
    type stores free mins."""
    group_size, dtype = scheme.group_size, scheme.data_type
    grid = grid or dtype.range_grid or DEFAULT_GRID
    wg = to_groups(w.detach().float(), group_size)  # [out, ng, g]
    if importance is None:
        imp = torch.ones_like(wg)
    else:
        imp = to_groups(importance.float().expand_as(w), group_size)
        imp = _mask_padding(imp, w.shape[1], group_size)
    candidates = [(a, a) for a in grid]
    if least_squares and not scheme.sym and dtype.free_offset:
        candidates.append(least_squares_factors(wg, imp, dtype.levels(scheme.bits) - 1, dtype.init_range(wg)))
    best_err = torch.full((*wg.shape[:-1], 1), float("inf"), device=wg.device)
    best_mn = torch.ones_like(best_err)
    best_mx = torch.ones_like(best_err)
    for mn, mx in candidates:
        mn = torch.full_like(best_err, mn) if isinstance(mn, float) else mn
        mx = torch.full_like(best_err, mx) if isinstance(mx, float) else mx
        qdq = dtype.fake_quantize(wg, scheme.bits, scheme.sym, min_scale=mn, max_scale=mx)
        err = dtype.pool_rows(((qdq - wg) ** 2 * imp).sum(-1, keepdim=True), group_size)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_mn = torch.where(better, mn, best_mn)
        best_mx = torch.where(better, mx, best_mx)
    return best_mn.squeeze(-1), best_mx.squeeze(-1)


@torch.no_grad()
def least_squares_factors(wg: torch.Tensor, imp: torch.Tensor, top: int, wrange) -> tuple[torch.Tensor, torch.Tensor]:
    """For asymmetric codes 0..top: per group [..., g], the min/max factors ([..., 1], on the range
    wrange = (min <= 0, max >= 0)) of the best weighted least-squares fit w ~ s * c + m (m <= 0)
    over the codes c that trial scales around range / top give."""
    wmin, wmax = wrange
    span = (wmax - wmin).clamp(min=1e-12)
    sw, swx = imp.sum(-1, keepdim=True), (imp * wg).sum(-1, keepdim=True)
    best_err = torch.full_like(wmin, float("inf"))
    lo, hi = wmin.clone(), wmax.clone()
    for step in TRIAL_STEPS:
        c = ((wg - wmin) * ((top + step) / span)).round_().clamp_(0, top)
        ic = imp * c
        swc, swcc, swcx = ic.sum(-1, keepdim=True), (ic * c).sum(-1, keepdim=True), (ic * wg).sum(-1, keepdim=True)
        det = sw * swcc - swc * swc
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s = (sw * swcx - swc * swx) / det
        m = (swcc * swx - swc * swcx) / det
        # the min is stored as an offset that cannot be positive: refit the scale alone at m = 0
        pos = m > 0
        s = torch.where(pos, swcx / swcc.clamp(min=1e-30), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        err = (imp * (s * c + m - wg) ** 2).sum(-1, keepdim=True)
        better = ok & (s > 0) & (err < best_err)
        best_err = torch.where(better, err, best_err)
        lo = torch.where(better, m, lo)
        hi = torch.where(better, m + s * top, hi)
    fmin = torch.where(wmin < 0, lo / wmin.clamp(max=-1e-30), torch.ones_like(wmin))
    fmax = torch.where(wmax > 0, hi / wmax.clamp(min=1e-30), torch.ones_like(wmax))
    return fmin.clamp(0, 1), fmax.clamp(0, 1)


def weight_importance(w: torch.Tensor) -> torch.Tensor:
    """Per-weight importance [out, in] where no inputs were seen: |w| plus its row's RMS, the
    weighting llama.cpp's quantizer uses without an importance matrix (for Q4_K/Q5_K): large
    weights matter more."""
    w = w.detach().float()
    return w.abs() + w.pow(2).mean(1, keepdim=True).sqrt()


def _mask_padding(imp_g: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Zero the importance of the padding columns of a last partial group."""
    flat = imp_g.reshape(imp_g.shape[0], -1).clone()
    flat[:, in_features:] = 0
    return flat.view_as(imp_g)
