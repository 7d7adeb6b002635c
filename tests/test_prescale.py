import torch
from torch import nn

from lowbit.algorithms.prescale import DEFAULT_GRID, search_range_factors
from lowbit.algorithms.stats import InputEnergy
from lowbit.qdq import from_groups, to_groups
from lowbit.qdq.int import fake_quantize_groups
from lowbit.schemes import Scheme


def weighted_err(w, factors, imp, bits=2, group=32, sym=True):
    wg = to_groups(w, group)
    f = factors.unsqueeze(-1)
    dq = from_groups(fake_quantize_groups(wg, bits, sym, min_scale=f, max_scale=f), w.shape[1])
    return (((dq - w) ** 2) * imp).sum().item()


def test_search_never_worse_than_plain_and_usually_better():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    imp = torch.rand(128, generator=g) ** 4  # a few channels dominate, as in real activations
    for sym in (True, False):
        f = search_range_factors(w, Scheme(2, 32, sym), imp)
        assert f.shape == (32, 4) and (f <= 1).all() and (f >= min(DEFAULT_GRID)).all()
        plain = weighted_err(w, torch.ones(32, 4), imp, sym=sym)
        searched = weighted_err(w, f, imp, sym=sym)
        assert searched < 0.9 * plain


def test_importance_changes_the_choice():
    """A channel whose input is always zero should not hold the range open for an outlier."""
    w = torch.randn(1, 32, generator=torch.Generator().manual_seed(1)) * 0.1
    w[0, 0] = 3.0  # outlier
    imp = torch.ones(32)
    imp[0] = 0.0
    uniform = search_range_factors(w, Scheme(3, 32, True), None)
    weighted = search_range_factors(w, Scheme(3, 32, True), imp)
    assert weighted.item() < uniform.item()


def test_partial_group_padding_ignored():
    w = torch.randn(4, 40, generator=torch.Generator().manual_seed(2))
    f = search_range_factors(w, Scheme(2, 32, False), torch.ones(40))
    assert f.shape == (4, 2)
    # The last group (8 real columns) gets the same factor as searching those columns alone.
    alone = search_range_factors(w[:, 32:], Scheme(2, -1, False), torch.ones(8))
    assert torch.equal(f[:, 1], alone[:, 0])


def test_input_energy_is_mean_square():
    lin = nn.Linear(6, 3)
    energy = InputEnergy({"lin": lin})
    xs = [torch.randn(2, 5, 6), torch.randn(1, 5, 6)]
    for x in xs:
        lin(x)
    imp = energy.remove()["lin"]
    flat = torch.cat([x.reshape(-1, 6) for x in xs])
    torch.testing.assert_close(imp, flat.pow(2).mean(0))
    lin(torch.randn(1, 6))  # hooks removed: no error, nothing more collected
    assert len(lin._forward_hooks) == 0
