import pytest
import torch
from torch import nn

from lowbit.algorithms.prescale import DEFAULT_GRID, search_range_factors
from lowbit.algorithms.stats import InputEnergy
from lowbit.qdq import from_groups, to_groups
from lowbit.qdq.int import fake_quantize_groups
from lowbit.schemes import Scheme


def weighted_err(w, factors, imp, bits=2, group=32, sym=True):
    wg = to_groups(w, group)
    mn, mx = factors if isinstance(factors, tuple) else (factors, factors)
    dq = from_groups(fake_quantize_groups(wg, bits, sym, min_scale=mn.unsqueeze(-1), max_scale=mx.unsqueeze(-1)),
                     w.shape[1])
    return (((dq - w) ** 2) * imp).sum().item()


def test_search_never_worse_than_plain_and_usually_better():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    imp = torch.rand(128, generator=g) ** 4  # a few channels dominate, as in real activations
    for sym in (True, False):
        f = search_range_factors(w, Scheme(2, 32, sym), imp)
        assert all(x.shape == (32, 4) and (x <= 1).all() and (x >= 0).all() for x in f)
        if sym:  # one factor from the grid on both ends
            assert torch.equal(f[0], f[1]) and (f[0] >= min(DEFAULT_GRID)).all()
        plain = weighted_err(w, torch.ones(32, 4), imp, sym=sym)
        searched = weighted_err(w, f, imp, sym=sym)
        assert searched < 0.9 * plain


def test_importance_changes_the_choice():
    """A channel whose input is always zero should not hold the range open for an outlier."""
    w = torch.randn(1, 32, generator=torch.Generator().manual_seed(1)) * 0.1
    w[0, 0] = 3.0  # outlier
    imp = torch.ones(32)
    imp[0] = 0.0
    uniform = search_range_factors(w, Scheme(3, 32, True), None)[0]
    weighted = search_range_factors(w, Scheme(3, 32, True), imp)[0]
    assert weighted.item() < uniform.item()


def test_partial_group_padding_ignored():
    w = torch.randn(4, 40, generator=torch.Generator().manual_seed(2))
    f = search_range_factors(w, Scheme(2, 32, False), torch.ones(40))
    assert f[0].shape == (4, 2)
    # The last group (8 real columns) gets the same factors as searching those columns alone.
    alone = search_range_factors(w[:, 32:], Scheme(2, -1, False), torch.ones(8))
    for a, b in zip(f, alone):
        assert torch.equal(a[:, 1], b[:, 0])


@pytest.mark.parametrize("dtype,bits,group,most", [("q2_k", 2, 16, 0.9), ("q4_k", 4, 32, 0.96), ("q5_k", 5, 32, 0.97),
                                                  ("q4_1", 4, 32, 0.96)])
def test_least_squares_fit_moves_the_ends_apart(dtype, bits, group, most):
    """Where a type stores each group's min as a number, the fitted candidate moves the two ends
    of many groups apart and lowers the weighted error below the one-factor grid's by a margin."""
    from lowbit.qdq import get_dtype

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 512, generator=g) * 0.02 + (torch.rand(64, 512, generator=g) ** 6) * 0.08
    imp = torch.rand(512, generator=g) * 2
    scheme = Scheme(bits, group, False, dtype=dtype)
    mn, mx = search_range_factors(w, scheme, imp)
    grid = search_range_factors(w, scheme, imp, least_squares=False)
    assert torch.equal(grid[0], grid[1]) and (mn != mx).float().mean() > 0.3
    err = lambda f: (((from_groups(get_dtype(dtype).fake_quantize(  # noqa: E731
        to_groups(w, group), bits, False, min_scale=f[0].unsqueeze(-1), max_scale=f[1].unsqueeze(-1)), 512) - w) ** 2)
        * imp).sum().item()
    assert err((mn, mx)) < most * err(grid)


def test_integer_zero_points_search_the_grid_only():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    f = search_range_factors(w, Scheme(2, 16, False), None)
    assert torch.equal(f[0], f[1])


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


def test_rtn_searches_llama_cpp_and_mx_types_by_default():
    """RTN's range search is on for llama.cpp's types (as llama.cpp's quantizer searches) and MX
    (each block's exponent), and lowers their magnitude-weighted error; integer schemes keep the
    plain min/max rounding."""
    import lowbit
    from lowbit.algorithms.prescale import weight_importance
    from lowbit.quantized import quantize_weight
    from lowbit.schemes import get_scheme

    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(512, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 512, generator=g) * 0.02)
    imp = weight_importance(lin.weight)
    for name, searched in [("gguf:q2_k", True), ("gguf:q4_k", True), ("gguf:q3_k", True), ("MXFP4A16", True),
                           ("MXFP8A16", True), ("W4A16", False), ("NVFP4A16", False)]:
        s = get_scheme(name)
        assert lowbit.RTN().searches(s) is searched
        got = lowbit.RTN().quantize_block(None, {"lin": (lin, s)}).weights["lin"]
        plain = quantize_weight(lin.weight, s)
        err = lambda q: (((q.dequantize() - lin.weight) ** 2) * imp).sum().item()  # noqa: E731
        if searched:
            assert err(got) < (0.995 if name.startswith("MXFP8") else 0.97) * err(plain), name
        else:
            assert torch.equal(got.codes, plain.codes) and torch.equal(got.scale, plain.scale)
    assert lowbit.RTN(search=True).searches(get_scheme("W4A16"))


def test_mx_search_picks_each_blocks_exponent():
    """On MX only the exponent of the factored amax matters: the search tries the spec's, one
    below and one above, never does worse than the spec's, and takes the one above where the spec
    clips the block's largest weight (E4M3: amax in (1.75, 2) x 2^k stores 1.75 x 2^k)."""
    from lowbit.schemes import get_scheme

    s = get_scheme("MXFP8A16")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 256, generator=g) * 0.05
    w[0, 0] = 0.98  # block (0, 0): amax 0.98 = 1.96 x 2^-1, beyond E4M3's 448 = 1.75 x 2^8 at the spec's scale
    mn, mx = search_range_factors(w, s)
    assert set(mx.unique().tolist()) <= {0.5, 1.0, 2.0} and torch.equal(mn, mx)
    assert mx[0, 0] == 2.0
    wg = to_groups(w, 32)
    err = lambda f: ((s.data_type.fake_quantize(wg, 8, True, min_scale=f, max_scale=f) - wg) ** 2).sum(-1)  # noqa: E731
    assert torch.all(err(mx.unsqueeze(-1)) <= err(torch.ones_like(mx).unsqueeze(-1)))
    assert err(mx.unsqueeze(-1))[0, 0] < 0.1 * err(torch.ones_like(mx).unsqueeze(-1))[0, 0]


def test_fp8_block_search_scores_whole_tiles():
    """A tile of FP8_BLOCK shares one scale across its rows, so the search picks one factor per
    tile, by the tile's summed error: never above the plain scale's, below it somewhere."""
    from lowbit.schemes import get_scheme

    s = get_scheme("FP8_BLOCKG32A16")
    w = torch.randn(80, 96, generator=torch.Generator().manual_seed(6)) * 0.05
    w[3, 5] = 2.0  # an outlier whose clipping would cost its tile more than any shift of the grid wins
    mn, mx = search_range_factors(w, s)
    assert torch.equal(mn, mx) and mx.shape == (80, 3)
    assert torch.equal(mx, mx[::32].repeat_interleave(32, dim=0)[:80])  # constant within each tile
    assert mx[0, 0] == 1.0  # the outlier's tile keeps its whole range
    wg = to_groups(w, 32)
    tile_err = lambda f: s.data_type.pool_rows(((s.data_type.fake_quantize(  # noqa: E731
        wg, 8, True, min_scale=f, max_scale=f) - wg) ** 2).sum(-1, keepdim=True), 32)
    best, plain = tile_err(mx.unsqueeze(-1)), tile_err(torch.ones_like(mx).unsqueeze(-1))
    assert torch.all(best <= plain) and torch.any(best < plain)
