import pytest
import torch

from lowbit.qdq import from_groups, round_ste, to_groups
from lowbit.qdq.int import fake_quantize_groups, fake_quantize_tuned, group_range
from lowbit.quantized import quantize_weight
from lowbit.schemes import Scheme


def quantize(w, bits, group_size, sym, **tuned):
    return quantize_weight(w, Scheme(bits, group_size, sym), **tuned)


def fake_quantize(w, bits, group_size, sym):
    """Round-to-nearest quantize-dequantize of a 2-D weight, shaped like w."""
    return from_groups(fake_quantize_groups(to_groups(w, group_size), bits, sym), w.shape[1])

BITS = [2, 3, 4, 8]


def rand_w(out_f=16, in_f=96, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_levels_and_codes(bits, sym, group_size):
    w = rand_w(256, 256)
    q = quantize(w, bits, group_size, sym)
    assert q.codes.dtype == torch.uint8
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    groups = to_groups(q.codes.int(), group_size)
    for row in groups.reshape(-1, groups.shape[-1])[:20]:
        assert len(row.unique()) <= 2**bits
    # Over many groups, every level gets used at least once.
    assert len(q.codes.unique()) == 2**bits


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_error_bound(bits, sym):
    """Round to nearest: each weight within half a step of its dequantized value. Symmetric full
    range has one level fewer on the side opposite the largest magnitude, so weights there that
    land on the last code may be clipped by up to one step."""
    w = rand_w()
    q = quantize(w, bits, 32, sym)
    err = (q.dequantize() - w).abs()
    step = from_groups(to_groups(torch.ones_like(w), 32) * q.scale.abs().unsqueeze(-1), w.shape[1])
    clipped_side = (q.codes == 2**bits - 1) if sym else torch.zeros_like(w, dtype=torch.bool)
    assert (err[~clipped_side] <= step[~clipped_side] / 2 + 1e-6).all()
    assert (err <= step + 1e-6).all()
    # And the fake path gives exactly what codes + scales give.
    assert torch.equal(fake_quantize(w, bits, 32, sym), q.dequantize())


def test_error_shrinks_with_bits():
    w = rand_w()
    errs = [(fake_quantize(w, b, 32, True) - w).pow(2).mean().item() for b in BITS]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_full_range(bits):
    """Largest-magnitude weight of a group maps exactly to the extreme level -2^(b-1)."""
    w = rand_w(in_f=64)
    w[3, 5] = 10.0  # positive max dominates its group
    w[4, 40] = -10.0  # negative dominates
    q = quantize(w, bits, 32, sym=True)
    half = 2 ** (bits - 1)
    assert (q.zero == half).all()
    assert int(q.codes[3, 5]) - half == -half
    assert int(q.codes[4, 40]) - half == -half
    assert torch.allclose(q.dequantize()[3, 5], torch.tensor(10.0))
    assert torch.allclose(q.dequantize()[4, 40], torch.tensor(-10.0))
    # 2^b levels are used: both codes 0 and 2^b - 1 occur in a large random matrix
    big = quantize(rand_w(64, 512), bits, 32, True)
    assert int(big.codes.min()) == 0 and int(big.codes.max()) == 2**bits - 1


def test_asymmetric_keeps_min_and_max():
    w = rand_w(in_f=32)
    q = quantize(w, 4, 32, sym=False)
    dq = q.dequantize()
    # Zero lies in the range, so min and max are represented to within half a step.
    assert torch.allclose(dq.amin(1), w.amin(1), atol=float(q.scale.max()) / 2 + 1e-6)
    assert torch.allclose(dq.amax(1), w.amax(1), atol=float(q.scale.max()) / 2 + 1e-6)


def test_straight_through_gradient():
    x = torch.tensor([0.2, 0.7, -1.4], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 1.0, -1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_gradients_reach_v_and_scales():
    wg = to_groups(rand_w(), 32)
    v = torch.zeros_like(wg, requires_grad=True)
    mn = torch.ones(*wg.shape[:-1], 1, requires_grad=True)
    mx = torch.ones(*wg.shape[:-1], 1, requires_grad=True)
    out = fake_quantize_groups(wg, 2, False, v, mn, mx)
    (out - wg).pow(2).sum().backward()
    for p in (v, mn, mx):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_v_changes_rounding():
    """V = +-0.5 pushes a weight to the other neighbouring level."""
    w = torch.tensor([[0.1, 0.4, -0.3, 1.0]])
    base = quantize(w, 4, -1, False)
    up = quantize(w, 4, -1, False, v=torch.full_like(w, 0.49))
    assert (up.codes.int() - base.codes.int()).ge(0).all() and (up.codes != base.codes).any()


@pytest.mark.parametrize("in_f,group_size", [(172, 32), (172, 64), (172, 128), (100, 7), (5, 32)])
@pytest.mark.parametrize("sym", [True, False])
def test_partial_groups(in_f, group_size, sym):
    """In widths that do not divide into groups: every column is quantized, the last group is
    quantized by its own range (padding does not change it), shapes come back as given."""
    w = rand_w(8, in_f)
    q = quantize(w, 4, group_size, sym)
    ng = -(-in_f // group_size)
    assert q.codes.shape == w.shape and q.scale.shape == (8, ng)
    dq = q.dequantize()
    assert dq.shape == w.shape
    start = (ng - 1) * group_size
    tail = w[:, start:]
    alone = quantize(tail, 4, -1, sym)
    assert torch.equal(dq[:, start:], alone.dequantize())
    assert (dq - w).abs().max() < 0.5


def test_bits_tensor_matches_int_bits():
    """One call with per-row bits (used to tune several layers at once) equals per-layer calls."""
    w2, w4 = to_groups(rand_w(seed=1), 32), to_groups(rand_w(seed=2), 32)
    rows = torch.cat([w2.reshape(-1, 32), w4.reshape(-1, 32)])
    bits = torch.cat([torch.full((w2.numel() // 32, 1), 2.0), torch.full((w4.numel() // 32, 1), 4.0)])
    both = fake_quantize_groups(rows, bits, True)
    n2 = w2.numel() // 32
    assert torch.equal(both[:n2], fake_quantize_groups(w2, 2, True).reshape(-1, 32))
    assert torch.equal(both[n2:], fake_quantize_groups(w4, 4, True).reshape(-1, 32))


@pytest.mark.parametrize("sym", [True, False])
def test_tuned_qdq_matches_autograd_reference(sym):
    """SignRound's fused quantize-dequantize gives the reference's values, and its hand-written
    backward the gradients autograd gets from the reference, in V and both factors; with several
    bit widths in one tensor, groups clamped at both ends, and a bf16 output."""
    gen = torch.Generator().manual_seed(3)
    rows = 64
    wg = torch.randn(rows, 32, generator=gen)
    bits = torch.tensor([2.0, 3.0, 4.0, 8.0]).repeat(rows // 4)[:, None]
    g = torch.randn(rows, 32, generator=gen)
    results = []
    for fused in (False, True):
        v = (torch.rand(rows, 32, generator=gen.manual_seed(4)) - 0.5).requires_grad_()
        mn = (0.5 + 0.5 * torch.rand(rows, 1, generator=gen.manual_seed(5))).requires_grad_()
        mx = (0.5 + 0.5 * torch.rand(rows, 1, generator=gen.manual_seed(6))).requires_grad_()
        if fused:
            out = fake_quantize_tuned(wg, bits, sym, v, mn, mx, group_range(wg))
        else:
            out = fake_quantize_groups(wg, bits, sym, v, mn, mx)
        out.backward(g)
        results.append((out.detach(), v.grad, mn.grad, mx.grad))
    (ref, *ref_grads), (got, *got_grads) = results
    assert torch.equal(got, ref)
    for a, b in zip(got_grads, ref_grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # shrunk ranges clamp some weights: their V gets no gradient
    assert (results[1][1] == 0).any()
    half = fake_quantize_tuned(wg, bits, sym, v, mn, mx, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, got.to(torch.bfloat16))


def test_scheme_names_round_trip():
    from lowbit.schemes import PRESETS, Scheme, get_scheme

    for s in [Scheme(3, 64), Scheme(8, 32, False), Scheme(2, -1), Scheme(4, 128, False), *PRESETS.values()]:
        assert get_scheme(s.name) == s
    assert get_scheme("w2a16g32") == Scheme(2, 32)
    assert get_scheme("W4A16", group_size=-1, sym=False) == Scheme(4, -1, False)
