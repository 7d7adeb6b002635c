"""Every registered data type (lowbit.qdq.DTYPES), at every setting it takes: codes within its
levels, quantize / dequantize / fake-quantize agreeing, the tuning path matching the reference
with its gradients, the error falling with bits, and a storage cost. A new type is enrolled by
registering it."""
import dataclasses

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.qdq import DTYPES, from_groups, to_groups
from lowbit.qdq.kquant import FORMATS as KQUANT_FORMATS
from lowbit.quantized import QuantizedWeight, quantize_weight
from lowbit.schemes import Scheme

SETTINGS = [(name, bits, group, sym) for name, dt in DTYPES.items() for bits in range(2, 9) for group in (16, 32, -1)
            for sym in (True, False) if dt.check(bits, group, sym) is None]


def weight(out_f=48, in_f=100, seed=0):  # 100 inputs: a last partial group of 4 with groups of 32
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def width(dt, n: int) -> int:
    """n, or 512 for a type that needs whole blocks of weights per row (llama.cpp's k-quants)."""
    try:
        return n if dt.fallback(n) is None else 512
    except LowbitError:
        return 512


def test_every_type_takes_some_setting():
    assert {s[0] for s in SETTINGS} == set(DTYPES)


@pytest.mark.parametrize("name,bits,group,sym", SETTINGS)
def test_codes_levels_and_round_trip(name, bits, group, sym):
    dt, scheme = DTYPES[name], Scheme(bits, group, sym, dtype=name)
    w = weight(in_f=width(dt, 100))
    q = quantize_weight(w, scheme)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert int(q.codes.max()) < dt.levels(bits)
    # each group holds at most levels(bits) distinct values
    dq = q.dequantize()
    for row in to_groups(dq, group)[:4]:
        for g in row:
            assert len(torch.unique(g)) <= dt.levels(bits)
    # the differentiable reference computes the same values as quantize + dequantize
    fq = from_groups(dt.fake_quantize(to_groups(w, group), bits, sym), w.shape[1])
    assert torch.equal(fq, dq)
    # quantizing what was dequantized changes nothing (up to float rounding of the scale)
    again = quantize_weight(dq, scheme).dequantize()
    if name in KQUANT_FORMATS:  # its sub-block scales are re-fitted on a new super-block grid: close only
        assert (again - dq).pow(2).mean() <= (dq - w).pow(2).mean()
    else:
        torch.testing.assert_close(again, dq, rtol=0, atol=1e-5 * float(w.abs().max()))


@pytest.mark.parametrize("name,bits,group,sym", SETTINGS)
def test_tuned_path_matches_reference(name, bits, group, sym):
    dt = DTYPES[name]
    w = weight(16, width(dt, 64), seed=1)
    wg = to_groups(w, group)
    gen = torch.Generator().manual_seed(2)
    v0 = (torch.rand(wg.shape, generator=gen) - 0.5) * 0.8
    f0 = 0.7 + 0.3 * torch.rand((*wg.shape[:-1], 1), generator=gen)
    outs, grads = [], []
    for fn in (lambda *a: dt.fake_quantize(*a), lambda *a: dt.fake_quantize_tuned(*a)):
        v, mn, mx = v0.clone().requires_grad_(), f0.clone().requires_grad_(), f0.clone().requires_grad_()
        out = fn(wg, bits, sym, v, mn, mx, dt.init_range(wg))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([v.grad, mn.grad, mx.grad])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _bit_widths(dt):
    """(group, the bit widths the type takes at it), at the first group size that takes several."""
    for group in (32, 16):
        bits = [b for b in range(2, 9) if dt.check(b, group, True) is None]
        if len(bits) > 1:
            return group, bits
    return None


@pytest.mark.parametrize("name", sorted(n for n, d in DTYPES.items() if _bit_widths(d)))
def test_error_falls_with_bits(name):
    dt, w = DTYPES[name], weight(64, 256)
    group, bits = _bit_widths(dt)
    errs = [(quantize_weight(w, Scheme(b, group, True, dtype=name)).dequantize() - w).pow(2).mean().item() for b in bits]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0]


@pytest.mark.parametrize("name,bits,group,sym", SETTINGS)
def test_storage_cost(name, bits, group, sym):
    cost = DTYPES[name].storage_bits(64, 256, bits, group, sym)
    assert 64 * 256 * bits < cost < 64 * 256 * 16


def test_quantized_weight_is_frozen_and_checked():
    q = quantize_weight(weight(), Scheme(2, 32, True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.codes = q.codes
    with pytest.raises(ValueError, match="levels"):
        q.replace(codes=q.codes + 4)
    with pytest.raises(ValueError, match="scale has shape"):
        q.replace(scale=q.scale[:, :1])
    with pytest.raises(ValueError, match="zero points"):
        q.replace(zero=None)
    with pytest.raises(ValueError, match="uint8"):
        QuantizedWeight(q.scheme, q.codes.int(), q.scale, q.zero)
    assert (q.bits, q.group_size, q.sym) == (2, 32, True)
