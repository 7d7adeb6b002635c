"""llama.cpp's block types (lowbit/qdq/kquant.py, ggml.py): the bytes lowbit packs decode, in the
`gguf` package's own dequantizers, to exactly the values lowbit computes; the fake quantize used in
tuning gives exactly the weights that are stored; the sub-block scales stay in their ranges."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.qdq import get_dtype  # noqa: E402
from lowbit.qdq.ggml import pack  # noqa: E402
from lowbit.qdq.groups import to_groups  # noqa: E402
from lowbit.qdq.kquant import FORMATS, dequantize, fake_quantize, quantize  # noqa: E402
from lowbit.schemes import get_scheme  # noqa: E402

NAMES = list(FORMATS)


def weights(rows=6, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1] += 0.03  # a row with everything positive-shifted (min > 0 in many groups)
    w[2, :256] = 0  # an all-zero super-block
    w[3, 7] = 1.5  # an outlier
    w[4] = w[4].abs()  # no negative values
    w[5] *= 1e-4  # tiny values (fp16 scales near their subnormals)
    return w


def gguf_values(name, blocks: np.ndarray, shape) -> np.ndarray:
    qtype = getattr(gguf.GGMLQuantizationType, FORMATS[name].ggml)
    return gguf.quants.dequantize(blocks, qtype).reshape(shape)


@pytest.mark.parametrize("name", NAMES)
def test_packed_bytes_decode_to_lowbit_values(name):
    fmt = FORMATS[name]
    w = weights()
    codes, scale, zero, extras = quantize(fmt, w)
    blocks = pack(name, codes, scale, zero, extras)
    assert blocks.shape == (w.shape[0], w.shape[1] // fmt.weights_per_block * fmt.block_bytes)
    ours = dequantize(fmt, codes, scale, zero).numpy()
    theirs = gguf_values(name, blocks, w.shape)
    assert np.array_equal(ours, theirs)  # bit for bit
    err = (torch.from_numpy(ours) - w).abs().mean() / w.abs().mean()
    assert err < {2: 0.45, 3: 0.25, 4: 0.12, 5: 0.06, 6: 0.03, 8: 0.01}[fmt.bits]


@pytest.mark.parametrize("name", NAMES)
def test_random_codes_and_scales_round_trip(name):
    """Every code value and sub-scale value, at random, through pack and gguf's decoder."""
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(1)
    out_f, in_f = 4, 512
    ng, ns = in_f // fmt.group, in_f // fmt.weights_per_block
    codes = torch.randint(0, 2**fmt.bits, (out_f, in_f), generator=g).to(torch.uint8)
    d = (torch.rand(out_f, ns, generator=g) * 0.01).half().float()
    if not fmt.sub_levels:
        scale, zero, extras = d.clone(), None, {"super_scale": d}
        if fmt.mins:  # Q4_1/Q5_1: an fp16 offset of either sign
            zero = ((torch.rand(out_f, ns, generator=g) - 0.5) * 0.02).half().float()
            extras["super_min"] = zero
    else:
        lo, hi = (0, fmt.sub_levels) if fmt.mins else (-fmt.sub_levels // 2, fmt.sub_levels // 2)
        sc = torch.randint(lo, hi, (out_f, ng), generator=g).float()
        scale = d.repeat_interleave(fmt.per, 1) * sc
        extras = {"super_scale": d}
        zero = None
        if fmt.mins:
            dmin = (torch.rand(out_f, ns, generator=g) * 0.01).half().float()
            zero = dmin.repeat_interleave(fmt.per, 1) * torch.randint(0, fmt.sub_levels, (out_f, ng), generator=g).float()
            extras["super_min"] = dmin
    blocks = pack(name, codes, scale, zero, extras)
    assert np.array_equal(dequantize(fmt, codes, scale, zero).numpy(), gguf_values(name, blocks, (out_f, in_f)))


@pytest.mark.parametrize("name", NAMES)
def test_fake_quantize_is_what_is_stored(name):
    """The tuning's fake quantize, with offsets and range factors, equals the stored weights."""
    fmt = FORMATS[name]
    w = weights(seed=2)
    g = torch.Generator().manual_seed(3)
    v = torch.rand(w.shape, generator=g) - 0.5
    ng = w.shape[1] // fmt.group
    mn = 0.7 + 0.3 * torch.rand(w.shape[0], ng, generator=g)
    mx = 0.7 + 0.3 * torch.rand(w.shape[0], ng, generator=g)
    wg = to_groups(w, fmt.group)
    fake = fake_quantize(fmt, wg, to_groups(v, fmt.group), mn.unsqueeze(-1), mx.unsqueeze(-1)).reshape(w.shape)
    codes, scale, zero, _ = quantize(fmt, w, v, mn, mx)
    assert torch.equal(fake, dequantize(fmt, codes, scale, zero))
    # and through the data-type object, as the rest of lowbit calls it
    dt = get_dtype(name)
    s = get_scheme(f"gguf:{name}")
    c2, s2, z2, extras = dt.quantize(w, s.bits, s.group_size, s.sym)
    assert torch.equal(dt.dequantize(c2, s2, z2, s.bits, s.group_size), dequantize(fmt, *quantize(fmt, w)[:3]))
    assert set(extras) == set(dt.extra_names)


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q6_k"])
def test_sub_scales_in_range_and_gradients_flow(name):
    fmt = FORMATS[name]
    w = weights(seed=4)
    codes, scale, zero, extras = quantize(fmt, w)
    d = extras["super_scale"].repeat_interleave(fmt.per, 1)
    sc = torch.where(d == 0, torch.zeros_like(scale), scale / torch.where(d == 0, torch.ones_like(d), d))
    assert torch.equal(sc, sc.round())
    lo, hi = (0, fmt.sub_levels - 1) if fmt.mins else (-fmt.sub_levels // 2, fmt.sub_levels // 2 - 1)
    assert sc.min() >= lo and sc.max() <= hi
    assert int(codes.max()) <= 2**fmt.bits - 1
    # straight-through: v and the range factors get gradients
    wg = to_groups(w, fmt.group)
    v = torch.zeros_like(wg, requires_grad=True)
    f = torch.ones(*wg.shape[:-1], 1, requires_grad=True)
    fake_quantize(fmt, wg, v, f, f).pow(2).sum().backward()
    assert v.grad.abs().sum() > 0 and f.grad.abs().sum() > 0


def test_scheme_names_and_bad_settings():
    assert get_scheme("Q2_K") == get_scheme("gguf:q2_k")
    assert get_scheme("gguf:q4_k").name == "gguf:q4_k"
    assert get_scheme("gguf:q3_k").sym and not get_scheme("gguf:q5_k").sym
    with pytest.raises(LowbitError, match="Q4_K is 4-bit, groups of 32, asymmetric"):
        get_scheme("gguf:q4_k", group_size=64)
    with pytest.raises(LowbitError, match="multiple of 256"):
        quantize(FORMATS["q2_k"], torch.randn(4, 320))
    # storage: Q4_K is 4.5 bits per weight, Q2_K 2.625, Q6_K 6.5625, Q8_0 8.5
    for name, bpw in [("q4_k", 4.5), ("q2_k", 2.625), ("q6_k", 6.5625), ("q8_0", 8.5), ("q3_k", 3.4375)]:
        s = get_scheme(f"gguf:{name}")
        assert get_dtype(name).storage_bits(10, 512, s.bits, s.group_size, s.sym) == 10 * 512 * bpw


# --------------------------------------------------------------------------- through the pipeline and GGUF
def test_tuned_k_quants_written_exactly_to_gguf(tmp_path):
    """SignRound on Q2_K's grid (Q6_K for down_proj), written to GGUF: every quantized tensor in
    the file decodes (gguf's dequantizer) to exactly the weights of lowbit's fake-quantized model."""
    import os

    import lowbit
    from lowbit.export.gguf import gguf_name, read_gguf_weights, rotary_row_order, write_gguf

    from conftest import ASSETS, need_assets

    need_assets()
    path = os.path.join(ASSETS, "models", "pycode-7m")
    res = lowbit.quantize(path, "gguf:q2_k", lowbit.SignRound(iters=3), os.path.join(path, "calib.txt"),
                          nsamples=8, seqlen=64, overrides={r".*down_proj": "gguf:q6_k"}, progress=False)
    assert {q.scheme.dtype for q in res.layers.values()} == {"q2_k", "q6_k"}
    out = tmp_path / "m.gguf"
    summary = write_gguf(res.model, res.tokenizer, res.layers, out, "q2_k")
    assert summary["blk.0.ffn_down.weight"] == "q6_k exact" and summary["blk.0.attn_q.weight"] == "q2_k exact"
    got = read_gguf_weights(out)
    cfg = res.model.config
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert kinds["blk.3.ffn_up.weight"] == gguf.GGMLQuantizationType.Q2_K
    assert kinds["blk.3.ffn_down.weight"] == gguf.GGMLQuantizationType.Q6_K
    for name in res.layers:
        g = gguf_name(name + ".weight")
        w = res.model.get_submodule(name).weight.detach().numpy()
        if ".attn_q." in g:
            w = w[rotary_row_order(w.shape[0], cfg.num_attention_heads)]
        elif ".attn_k." in g:
            w = w[rotary_row_order(w.shape[0], cfg.num_key_value_heads)]
        assert np.array_equal(got[g], w), g


def test_layers_without_whole_super_blocks_fall_back():
    """Rows that are not whole 256-weight super-blocks (stories260K's are 64 and 172 wide): a
    legacy type stands in, as in llama.cpp's quantizer, with a warning; a width no block type
    fits (172) is one clear error before any work."""
    from lowbit.pipeline import fit_schemes

    schemes = {"a": get_scheme("gguf:q2_k"), "b": get_scheme("gguf:q4_k"), "c": get_scheme("gguf:q6_k"),
               "d": get_scheme("gguf:q2_k")}
    with pytest.warns(UserWarning, match="cannot be gguf:q2_k .not whole blocks.: gguf:q4_0 instead"):
        fitted = fit_schemes(schemes, {"a": 64, "b": 96, "c": 32, "d": 512})
    assert [fitted[k].name for k in "abcd"] == ["gguf:q4_0", "gguf:q5_0", "gguf:q8_0", "gguf:q2_k"]
    with pytest.raises(LowbitError, match="Q2_K cannot store rows of 172 weights"):
        fit_schemes({"e": get_scheme("gguf:q2_k")}, {"e": 172})


@pytest.mark.parametrize("args,message", [
    (["--scheme", "gguf:q2_k"], "Q2_K cannot store rows of 172 weights"),  # stories260K's down_proj
    (["--scheme", "gguf:q4_0", "--format", "auto_round"], "format auto_round stores integer weights, not q4_0"),
    (["--scheme", "gguf:q4_0", "--format", "compressed_tensors"], "format compressed_tensors has no layout for gguf:q4_0"),
    (["--scheme", "gguf:q6_k", "--group-size", "32"], "Q6_K is 6-bit, groups of 16, symmetric"),
])
def test_bad_k_quant_input_is_refused_before_work(args, message, tmp_path):
    from conftest import STORIES, assert_quantize_refused

    assert_quantize_refused(STORIES, args, message, tmp_path)
