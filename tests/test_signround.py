"""SignRound's learning rate per layer: its default by bits and iterations, and the signed step
taking each row's own rate when the layers of one bucket differ."""
import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.signround import _Bucket
from lowbit.quantized import quantize_weight


def test_layer_lr_default():
    assert lowbit.SignRound(iters=200).layer_lr(2) == lowbit.SignRound(iters=200).layer_lr(4) == 1 / 200
    assert lowbit.SignRound(iters=1000).layer_lr(3) == 1 / 1000
    light = lowbit.SignRound(iters=50)
    assert light.layer_lr(2) == 1 / 50  # 2 bits: the full reach
    assert light.layer_lr(3) == light.layer_lr(4) == pytest.approx(0.01)  # the walk's noise of 200 iterations
    assert lowbit.SignRound(iters=50, lr=0.03).layer_lr(4) == 0.03  # given: for every layer


def test_step_uses_each_rows_lr():
    torch.manual_seed(0)
    a, b = nn.Linear(64, 8, bias=False), nn.Linear(64, 4, bias=False)
    algo = lowbit.SignRound(iters=50)
    items = [("a", a, lowbit.Scheme(2, 32)), ("b", b, lowbit.Scheme(4, 32))]
    bucket = _Bucket("int", 32, True, items, {}, algo.layer_lr)
    for p in bucket.params(True):
        p.grad = torch.ones_like(p)
    bucket.step(0.5, True, 1.0)
    rows_a = 8 * 2  # 8 outputs x 2 groups of 32
    assert torch.all(bucket.v[:rows_a] == -0.5 / 50) and torch.all(bucket.v[rows_a:] == -0.5 * 0.01)
    assert torch.allclose(bucket.mn[:rows_a], torch.tensor(1 - 0.5 / 50))
    assert torch.allclose(bucket.mx[rows_a:], torch.tensor(1 - 0.5 * 0.01))
    # one layer (or layers of one rate): a plain number, as before
    assert isinstance(_Bucket("int", 32, True, items[:1], {}, algo.layer_lr).lr, float)


def test_mx_keeps_each_blocks_searched_exponent():
    """SignRound tunes an MX layer's rounding only: the range factors it starts from (each
    block's searched exponent, factor 0.5, 1 or 2) are what it stores; an integer layer's factors
    are tuned."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 4, bias=False)
    two = torch.full((4, 2), 2.0)
    bucket = _Bucket("mxfp", 32, True, [("a", lin, lowbit.get_scheme("MXFP8A16"))], {"a": (two, two)},
                     lambda bits: 0.1)
    assert bucket.params(True) == [bucket.v] and not bucket.mx.requires_grad
    bucket.v.grad = torch.ones_like(bucket.v)
    bucket.step(1.0, True, 1.0)
    assert torch.all(bucket.mx == 2.0) and torch.all(bucket.v == -0.1)
    q = bucket.quantized({"a": (lin, lowbit.get_scheme("MXFP8A16"))})["a"]
    assert torch.equal(q.scale, quantize_weight(lin.weight, q.scheme, bucket.v.detach().view(4, 64), two, two).scale)
    ints = _Bucket("int", 32, True, [("a", lin, lowbit.Scheme(4, 32))], {}, lambda bits: 0.1)
    assert len(ints.params(True)) == 3


def test_fp8_block_rows_of_a_tile_share_one_scale_through_tuning():
    """FP8_BLOCK with the pre-tuning search forced on: each tile's searched range is kept (its
    rows cannot take factors of their own), so every layer stores one scale per tile."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    r = lowbit.quantize(model, "FP8_BLOCKG32", lowbit.SignRound(iters=3, batch_size=4, prescale=True), ids,
                        progress=False)
    assert len(r.layers) == 7
    for name, q in r.layers.items():
        tiles = q.scale[::32].repeat_interleave(32, dim=0)[: q.shape[0]]
        assert torch.equal(q.scale, tiles), name
    bucket = _Bucket("fp8_block", 32, True, [("a", nn.Linear(64, 40), lowbit.get_scheme("FP8_BLOCKG32"))], {},
                     lambda bits: 0.1)
    assert bucket.params(True) == [bucket.v]
    # the tile's range, from the layer's [out, n_groups, g]: rows 32-39 form the second tile
    assert torch.equal(bucket.range[1].view(40, 2)[32:], bucket.range[1].view(40, 2)[32:33].expand(8, 2))


@pytest.mark.parametrize("scheme", ["W4A16PC", "FP8", "W8A8"])
def test_per_channel_layers_of_different_widths(scheme):
    """Per output channel a layer's group is its whole input width, which differs between a
    block's layers (down_proj): SignRound tunes them in buckets of one width each, and the tuned
    weights are the stored ones."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    r = lowbit.quantize(model, scheme, lowbit.SignRound(iters=3, batch_size=4), ids, progress=False)
    assert len(r.layers) == 7 and r.layers["model.layers.0.mlp.down_proj"].scale.shape == (64, 1)
    for name, q in r.layers.items():
        assert torch.equal(model.get_submodule(name).weight, q.dequantize(model.dtype)), name


def test_relative_loss_weighs_each_token_by_its_size():
    """loss="relative": a token's squared error over its target's mean square, so scaling one
    token (an attention sink's huge hidden state) leaves its share of the loss as it was, where
    plain MSE lets it outweigh every other token."""
    from lowbit.algorithms.base import squared_errors, token_scales

    torch.manual_seed(0)
    target = torch.randn(2, 5, 16)
    out = target + 0.1 * torch.randn(2, 5, 16)
    torch.testing.assert_close(squared_errors(out, target).mean(), torch.nn.functional.mse_loss(out, target))
    rel = squared_errors(out, target, relative=True)
    torch.testing.assert_close(rel, (out - target) ** 2 / (target**2).mean(-1, keepdim=True))
    big_t, big_o = target.clone(), out.clone()
    big_t[:, 0] *= 1000
    big_o[:, 0] *= 1000
    torch.testing.assert_close(squared_errors(big_o, big_t, relative=True), rel)
    assert squared_errors(big_o, big_t).mean() > 1e4 * squared_errors(out, target).mean()
    # the tuning step's form: both sides scaled per token (computed a window at a time), fused MSE
    s = token_scales(big_t, chunk=1)
    assert s.shape == (2, 5, 1)
    torch.testing.assert_close(torch.nn.functional.mse_loss(big_o * s, big_t * s), rel.mean())
    with pytest.raises(lowbit.LowbitError, match="loss must be"):
        lowbit.SignRound(loss="l1")
