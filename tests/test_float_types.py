"""The float data types against their specifications, value by value: every E2M1 and E4M3 code,
rounding ties, saturation, the MX scale's exponent rule, NVFP4's two-level scale, and torch's own
float8_e4m3fn; the activation quantizers; the scheme names."""
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.qdq import DTYPES, from_groups, to_groups
from lowbit.qdq.act import ACTIVATIONS, check_mix, get_activation
from lowbit.qdq.fp import decode, encode, round_to_element
from lowbit.quantized import quantize_weight
from lowbit.schemes import PRESETS, Scheme, get_scheme

# (code, value) of every E2M1 code, by hand from the OCP MX spec (bias 1, 1 mantissa bit).
E2M1 = [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0), (5, 3.0), (6, 4.0), (7, 6.0),
        (8, -0.0), (9, -0.5), (10, -1.0), (11, -1.5), (12, -2.0), (13, -3.0), (14, -4.0), (15, -6.0)]


def test_every_e2m1_code():
    codes = torch.tensor([c for c, _ in E2M1], dtype=torch.uint8)
    assert decode(codes, 4).tolist() == [v for _, v in E2M1]
    values = torch.tensor([v for _, v in E2M1])
    # every value is on the grid and encodes to its code (-0 to +0's code 0)
    assert torch.equal(round_to_element(values, 4), values)
    assert encode(values, 4).tolist() == [0, *range(1, 8), 0, *range(9, 16)]


@pytest.mark.parametrize("x,expected", [
    (0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),  # ties to even mantissa
    (0.26, 0.5), (2.51, 3.0), (5.01, 6.0), (-1.25, -1.0), (-5.0, -4.0),
    (6.5, 6.0), (7.99, 6.0), (1e6, 6.0), (-100.0, -6.0),  # saturation at 6
])
def test_e2m1_rounding(x, expected):
    assert round_to_element(torch.tensor([x]), 4).item() == expected


def test_every_e4m3_code_matches_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # S.1111.111 is NaN
    values = decode(codes, 8)
    assert torch.equal(values, codes.view(torch.float8_e4m3fn).float())
    assert values.abs().max().item() == 448.0 and values[values > 0].min().item() == 2.0**-9
    assert torch.equal(round_to_element(values, 8), values)
    assert torch.equal(encode(values, 8), torch.where(codes == 0x80, 0, codes).to(torch.uint8))


def test_e4m3_rounding_matches_torch_and_saturates():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 2.6, 200_000)
    inside = x.clamp(-448, 448)
    assert torch.equal(round_to_element(inside, 8), inside.to(torch.float8_e4m3fn).float())
    # ties: 1 + 1/16 lies halfway between 1 and 1.125 (mantissa 000 and 001): to 1
    assert round_to_element(torch.tensor([1.0625, 1.1875, 464.0, 1e9, -500.0]), 8).tolist() == [1.0, 1.25, 448.0, 448.0, -448.0]


@pytest.mark.parametrize("bits,amax,scale,stored", [
    (4, 6.0, 1.0, 6.0), (4, 7.99, 1.0, 6.0), (4, 8.0, 2.0, 8.0), (4, 4.0, 1.0, 4.0),
    (4, 3.99, 0.5, 3.0), (4, 0.7, 2.0**-3, 0.75),  # amax / X in (6, 8) saturates to 6X
    (8, 448.0, 1.0, 448.0), (8, 511.0, 1.0, 448.0), (8, 512.0, 2.0, 512.0), (8, 1.0, 2.0**-8, 1.0),
    (4, 0.0, 2.0**-127, 0.0),  # E8M0's smallest scale
])
def test_mx_scale_exponent_rule(bits, amax, scale, stored):
    """X = 2^(floor(log2(amax)) - emax), emax 2 (E2M1) or 8 (E4M3); elements saturate."""
    w = torch.zeros(1, 32)
    w[0, 5] = amax
    q = quantize_weight(w, Scheme(bits, 32, dtype="mxfp"))
    assert q.scale.item() == scale
    assert q.dequantize()[0, 5].item() == stored


def test_mx_block_by_hand():
    # block max 5 -> X = 2^(2 - 2) = 1; elements round to E2M1 directly
    w = torch.tensor([[5.0, 2.5, -1.25, 0.3, 0.2, -6.0] + [0.0] * 26])
    q = quantize_weight(w, Scheme(4, 32, dtype="mxfp"))
    assert q.scale.tolist() == [[1.0]]
    assert q.dequantize()[0, :6].tolist() == [4.0, 2.0, -1.0, 0.5, 0.0, -6.0]
    assert q.codes[0, :6].tolist() == [6, 4, 10, 1, 0, 15]


def test_nvfp4_two_level_scale_by_hand():
    # tensor amax 12 -> global = 448 * 6 / 12 = 224. Block 0 (amax 12): e4m3(12 / 6 * 224) = 448,
    # scale 448 / 224 = 2. Block 1 (amax 1): 1 / 6 * 224 = 37.33 -> e4m3 36 (grid 32, 36, 40),
    # scale 36 / 224; 1 / scale = 6.22 -> 6.
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 16], w[0, 17] = 12.0, -5.0, 1.0, 0.3
    q = quantize_weight(w, Scheme(4, 16, dtype="nvfp"))
    assert q.extras["global_scale"].item() == 224.0
    assert q.scale[0].tolist() == [2.0, pytest.approx(36 / 224)]
    assert torch.equal((q.scale * q.extras["global_scale"]).to(torch.float8_e4m3fn).float(), torch.tensor([[448.0, 36.0]]))
    dq = q.dequantize()[0]
    assert dq[:2].tolist() == [12.0, -4.0]  # -5 / 2 = -2.5 -> -2 (tie to even)
    # 0.3 / (36/224) = 1.87 -> 2
    assert dq[16:18].tolist() == pytest.approx([6 * 36 / 224, 2 * 36 / 224])


def test_fp8_per_channel_matches_torch():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    q = quantize_weight(w, Scheme(8, -1, dtype="fp8"))
    scale = w.abs().amax(1, keepdim=True) / 448
    assert torch.equal(q.scale, scale)
    assert torch.equal(q.dequantize(), (w / scale).to(torch.float8_e4m3fn).float() * scale)


def test_fp8_blocks_of_128_by_128_match_torch():
    """FP8_BLOCK: one scale per 128 x 128 tile (partial tiles at the edges), amax / 448, elements
    as torch casts them; its inputs: E4M3 per token and group of 128 features."""
    w = torch.randn(300, 320, generator=torch.Generator().manual_seed(4))
    w[5, 7], w[260, 300] = 40.0, -25.0  # an outlier in one tile, another in a partial corner tile
    q = quantize_weight(w, get_scheme("FP8_BLOCKA16"))
    scale = torch.empty(300, 3)
    for r in range(0, 300, 128):
        for c in range(0, 320, 128):
            scale[r:r + 128, c // 128] = w[r:r + 128, c:c + 128].abs().max() / 448
    assert torch.equal(q.scale, scale) and q.scale[0, 0] == 40 / 448 and q.scale[299, 2] == 25 / 448
    full = scale.repeat_interleave(128, dim=1)[:, :320]
    assert torch.equal(q.dequantize(), (w / full).to(torch.float8_e4m3fn).float() * full)
    assert q.scheme.data_type.storage_bits(300, 320, 8, 128, True) == 300 * 320 * 8 + 3 * 3 * 32
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    s = x.view(4, 2, 128).abs().amax(-1, keepdim=True) / 448
    want = ((x.view(4, 2, 128) / s).to(torch.float8_e4m3fn).float() * s).view(4, 256)
    assert torch.equal(get_activation("fp8_g128")(x), want)
    assert get_scheme("FP8_BLOCK") == Scheme(8, 128, dtype="fp8_block", act="fp8_g128")


def test_tuning_offset_moves_one_grid_step_in_any_binade():
    x = torch.tensor([0.6, 1.2, 2.4, 4.4])  # binades of ulp 0.5, 0.5, 1, 2
    up = round_to_element(x, 4, torch.full_like(x, 0.5))
    down = round_to_element(x, 4, torch.full_like(x, -0.5))
    assert up.tolist() == [1.0, 1.5, 3.0, 6.0] and down.tolist() == [0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_quantizers(name):
    act = get_activation(name)
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(2)) * 3
    q = act(x)
    assert q.shape == x.shape and not torch.equal(q, x)
    assert torch.equal(act(q), q) or name == "nvfp4"  # idempotent where the scale is a power of two of the values
    # the same numbers as the weight type quantizing x's rows (a token's features = a weight row)
    rows = x.reshape(-1, 96)
    weight_type = {"mxfp4": Scheme(4, 32, dtype="mxfp"), "mxfp8": Scheme(8, 32, dtype="mxfp"),
                   "nvfp4": Scheme(4, 16, dtype="nvfp"), "fp8": Scheme(8, -1, dtype="fp8"),
                   "fp8_g128": Scheme(8, 128, dtype="fp8"),
                   "int8": None, "q8_k": None, "q8_0": None, "mxfp4_rceil": None, "mxfp8_rceil": None}[name]
    if weight_type is not None:
        assert torch.equal(q.reshape(-1, 96), quantize_weight(rows, weight_type).dequantize())
    elif name.endswith("_rceil"):  # the smallest power of two that fits the block's amax, in float64
        g = rows.view(len(rows), -1, 32)
        top = {4: 6.0, 8: 448.0}[act.bits]
        s = torch.exp2(torch.ceil(torch.log2(g.abs().amax(-1, keepdim=True).double() / top))).float()
        assert torch.equal(q.reshape(-1, 96), (round_to_element(g / s, act.bits) * s).flatten(1))
    else:  # integers per token (int8) or per block (llama.cpp's q8_K of 256, q8_0 of 32 with an fp16 scale)
        block = act.block or 96
        g = torch.nn.functional.pad(rows, (0, -96 % block)).view(len(rows), -1, block)
        step = g.abs().amax(-1, keepdim=True) / 127
        ref = (g / step).round() * (step.half().float() if name == "q8_0" else step)
        assert torch.allclose(q.reshape(-1, 96), ref.flatten(1)[:, :96])
    # straight through: the gradient of the input is the output's
    x.requires_grad_(True)
    g = torch.randn_like(x)
    act(x).backward(g)
    assert torch.equal(x.grad, g)


def test_rceil_inputs_round_the_scale_up_where_the_spec_clips():
    # E4M3: a block of largest 480 (in [448, 512)) clips to 448 under the spec's scale 2^(8 - 8);
    # RCEIL takes scale 2 and keeps 480 (240 is on E4M3's grid). A largest 448 fits either way.
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 1], x[1, 0], x[1, 1] = 480.0, 1.0, 448.0, 1.0
    assert get_activation("mxfp8")(x)[:, 0].tolist() == [448.0, 448.0]
    assert get_activation("mxfp8_rceil")(x)[:, 0].tolist() == [480.0, 448.0]
    # E2M1: 7 clips to 6 under scale 1; RCEIL's scale 2 rounds 3.5 to even (4): 8. 6 fits at scale 1
    # (and 0.75, a tie of codes 1 and 2, goes to the even one, 1.0).
    x = torch.zeros(2, 32)
    x[0, 0], x[1, 0], x[1, 1] = 7.0, 6.0, 0.75
    assert get_activation("mxfp4")(x)[:, :2].tolist() == [[6.0, 0.0], [6.0, 1.0]]
    assert get_activation("mxfp4_rceil")(x)[:, :2].tolist() == [[8.0, 0.0], [6.0, 1.0]]
    assert get_scheme("MXFP8-rceil") == Scheme(8, 32, dtype="mxfp", act="mxfp8_rceil")
    assert get_scheme("W4A16-MXFP4-rceil").name == "W4A16-mxfp4-rceil"
    with pytest.raises(LowbitError, match="-rceil rounds up the scale of MX inputs; NVFP4 has nvfp4"):
        get_scheme("NVFP4-rceil")
    # a kernel rounds every input's scale one way: one plan takes RCEIL everywhere or nowhere
    assert check_mix(["mxfp4_rceil", "mxfp8_rceil"]) is None
    assert "different kinds" in check_mix(["mxfp8", "mxfp4_rceil"])


def test_scheme_names_read_back():
    for name, scheme in PRESETS.items():
        assert get_scheme(scheme.name) == scheme, name
    assert get_scheme("MXFP4") == Scheme(4, 32, dtype="mxfp", act="mxfp4")
    assert get_scheme("mxfp4a16").act is None and get_scheme("NVFP4").group_size == 16
    assert get_scheme("FP8").act == "fp8" and get_scheme("FP8").group_size == -1
    assert get_scheme("W4A8").act == "int8" and get_scheme("W4A8").act_bits == 8


@pytest.mark.parametrize("make,message", [
    (lambda: get_scheme("MXFP4", group_size=64), "mxfp needs groups of 32"),
    (lambda: Scheme(4, 32, dtype="nvfp"), "nvfp needs groups of 16"),
    (lambda: get_scheme("NVFP4", sym=False), "symmetric only"),
    (lambda: Scheme(6, 32, dtype="mxfp"), "mxfp takes 4 or 8 bits"),
    (lambda: Scheme(4, 128, act="int4"), "activation type 'int4' is not supported"),
    (lambda: get_scheme("MXFP5"), "mxfp takes 4 or 8 bits, got 5"),
    (lambda: get_scheme("W4A4"), "unknown scheme"),
    (lambda: get_scheme("FP8_BLOCKPC"), "fp8_block needs a tile size"),
])
def test_bad_float_settings(make, message):
    with pytest.raises(LowbitError, match=message):
        make()


def test_tuned_groups_use_every_code():
    """Nothing in the float types leaves codes unused that the format has (NaN aside)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    assert len(torch.unique(quantize_weight(w, Scheme(4, 32, dtype="mxfp")).codes)) >= 15
    assert len(torch.unique(quantize_weight(w, Scheme(4, 16, dtype="nvfp")).codes)) >= 15
    dq = DTYPES["fp8"].fake_quantize(to_groups(w, -1), 8, True)
    assert torch.equal(from_groups(dq, 256), quantize_weight(w, Scheme(8, -1, dtype="fp8")).dequantize())
