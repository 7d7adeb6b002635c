"""Bit packing into the GPTQ int32 layout: exact round trips, word layout, signs, errors."""
import pytest
import torch

from lowbit.quantized import QuantizedWeight, quantize_weight
from lowbit.schemes import Scheme
from lowbit.qdq.pack import pack_gptq, pack_rows, pad_to, unpack_gptq, unpack_rows

BITS = [2, 3, 4, 8]
SHAPES = [(172, 64), (5, 7), (1, 1), (32, 32), (64, 96), (33, 95), (96, 1), (1, 65), (3, 0)]


def _codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


def _reference_pack(values, bits):
    """Slow, word-by-word packing of a flat list (length a multiple of 32) into unsigned words,
    written the way GPTQ's original packer reads: 32/bits values per word for 2/4/8 bits; for
    3 bits, 10 values + 2 low bits of the 11th, then its high bit + 10 values + low bit of the
    22nd, then its 2 high bits + 10 values."""
    words = []
    i = 0
    while i < len(values):
        if bits in (2, 4, 8):
            w = 0
            for k in range(32 // bits):
                w |= values[i + k] << (bits * k)
            words.append(w)
            i += 32 // bits
        else:
            v = values[i : i + 32]
            w0 = sum(v[k] << (3 * k) for k in range(10)) | ((v[10] & 0b11) << 30)
            w1 = sum(v[11 + k] << (3 * k + 1) for k in range(10))
            w1 |= (v[10] >> 2) | ((v[21] & 1) << 31)
            w2 = (v[21] >> 1) | sum(v[22 + k] << (3 * k + 2) for k in range(10))
            words += [w0, w1, w2]
            i += 32
    assert all(0 <= w < 2**32 for w in words)
    return words


def _as_unsigned(p):
    return [int(w) & 0xFFFFFFFF for w in p.tolist()]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_rows_round_trip(bits, shape, dim):
    x = _codes(shape, bits, seed=hash((bits, shape, dim)) % 1000)
    p = pack_rows(pad_to(x, 32, dim), bits, dim)
    assert p.dtype == torch.int32
    expect_shape = list(shape)
    expect_shape[dim] = -(-shape[dim] // 32) * bits
    assert list(p.shape) == expect_shape
    back = unpack_rows(p, bits, dim, shape[dim])
    assert back.dtype == torch.uint8
    assert torch.equal(back, x)


@pytest.mark.parametrize("bits", BITS)
def test_words_per_32_values_and_reference_layout(bits):
    g = torch.Generator().manual_seed(bits)
    for runs in (1, 2, 5):
        x = torch.randint(0, 2**bits, (runs * 32,), generator=g)
        p = pack_rows(x, bits, dim=0)
        assert p.shape == (runs * bits,)
        assert _as_unsigned(p) == _reference_pack(x.tolist(), bits)


@pytest.mark.parametrize("bits", BITS)
def test_reference_layout_along_dim1_of_a_matrix(bits):
    x = _codes((3, 64), bits, seed=7)
    p = pack_rows(x, bits, dim=1)
    for r in range(3):
        assert _as_unsigned(p[r]) == _reference_pack(x[r].tolist(), bits)


@pytest.mark.parametrize(
    "bits, values, expect",
    [
        # 4 bits: values 0..7 in the first word, little end first: 0x76543210.
        (4, list(range(8)) + [0] * 24, [0x76543210, 0, 0, 0]),
        # 2 bits: 16 values per word.
        (2, [1, 2, 3] + [0] * 29, [1 | 2 << 2 | 3 << 4, 0]),
        # 8 bits: bytes in order.
        (8, [0x11, 0x22, 0x33, 0x44] + [0] * 28, [0x44332211] + [0] * 7),
        # 3 bits: value 10 = 0b101 straddles words 0/1 (low two bits 0b01 at bits 30-31, high bit
        # at bit 0 of word 1); value 21 = 0b011 straddles words 1/2 (low bit at 31, 0b01 at 0-1).
        (3, [0] * 10 + [0b101] + [0] * 10 + [0b011] + [0] * 10, [1 << 30, 1 | 1 << 31, 1]),
        # 3 bits: value 0 in the lowest bits and value 31 in the top 3 bits of word 2.
        (3, [0b110] + [0] * 30 + [0b111], [0b110, 0, 0b111 << 29]),
    ],
)
def test_hand_checked_words(bits, values, expect):
    p = pack_rows(torch.tensor(values), bits, dim=0)
    assert _as_unsigned(p) == expect
    assert unpack_rows(p, bits, 0, 32).tolist() == values


def test_4bit_values_0_to_7_equal_sum_of_shifts():
    p = pack_rows(torch.tensor(list(range(8)) * 4), 4, dim=0)
    assert p.tolist() == [sum(v << (4 * v) for v in range(8))] * 4


@pytest.mark.parametrize("bits", BITS)
def test_top_bit_set_words_are_negative_and_round_trip(bits):
    top = 2**bits - 1
    x = torch.full((64, 3), top, dtype=torch.uint8)
    p = pack_rows(x, bits, dim=0)
    assert p.dtype == torch.int32
    assert (p == -1).all()  # all 32 * bits bits set
    assert torch.equal(unpack_rows(p, bits, 0, 64), x)
    # Only the last value of a run is set: the top bits of the last word, so it is negative.
    y = torch.zeros(32, dtype=torch.uint8)
    y[31] = top
    py = pack_rows(y, bits, dim=0)
    assert int(py[-1]) < 0 and (py[:-1] == 0).all()
    assert torch.equal(unpack_rows(py, bits, 0, 32), y)


@pytest.mark.parametrize("bits", BITS)
def test_any_int32_words_round_trip(bits):
    """The other direction: any int32 word pattern (negative ones included) survives unpack/pack."""
    g = torch.Generator().manual_seed(100 + bits)
    p = torch.randint(-(2**31), 2**31, (4 * bits, 5), generator=g, dtype=torch.int64)
    p = p.to(torch.int32)
    p[0, 0], p[1, 0] = -(2**31), 2**31 - 1
    x = unpack_rows(p, bits, 0, 4 * 32)
    assert torch.equal(pack_rows(x, bits, 0), p)


@pytest.mark.parametrize("bits", BITS)
def test_out_of_range_values_raise(bits):
    x = torch.zeros(32, dtype=torch.int64)
    x[5] = 2**bits
    with pytest.raises(ValueError, match="range"):
        pack_rows(x, bits, 0)
    x[5] = -1
    with pytest.raises(ValueError, match="range"):
        pack_rows(x, bits, 0)
    x[5] = 2**bits - 1
    pack_rows(x, bits, 0)  # the largest code is fine


def _stream_words(values, bits):
    """32 values as one little-endian stream of 32 * bits bits, cut into 32-bit words."""
    stream = sum(v << (i * bits) for i, v in enumerate(values))
    return [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(bits)]


@pytest.mark.parametrize("bits", [1, 5, 6, 7])
@pytest.mark.parametrize("dim", [0, 1])
def test_other_widths_pack_as_one_bit_stream(bits, dim):
    """1, 5, 6, 7 bits (compressed-tensors' pack-quantized widths) follow the same stream rule."""
    x = _codes((64, 37), bits, seed=bits)
    p = pack_rows(pad_to(x, 32, dim), bits, dim)
    assert torch.equal(unpack_rows(p, bits, dim, x.shape[dim]), x)
    run = x[:32, 0].tolist() if dim == 0 else x[0, :32].tolist()
    got = p[:bits, 0] if dim == 0 else p[0, :bits]
    assert _as_unsigned(got) == _stream_words(run, bits)


def test_bad_arguments_raise():
    x = torch.zeros(32, dtype=torch.int64)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(33, dtype=torch.int64), 4, 0)
    for bits in (0, 9, 16):
        with pytest.raises(ValueError, match="bits"):
            pack_rows(x, bits, 0)
        with pytest.raises(ValueError, match="bits"):
            unpack_rows(torch.zeros(8, dtype=torch.int32), bits, 0, 32)
    for bits in (1, 5, 6, 7):  # the stream packs them; the GPTQ layout does not
        with pytest.raises(ValueError, match="GPTQ"):
            pack_gptq(torch.zeros(32, 32, dtype=torch.uint8), torch.zeros(32, 1), torch.ones(32, 1), bits)
    with pytest.raises(TypeError):
        pack_rows(x.float(), 4, 0)
    with pytest.raises(ValueError):
        unpack_rows(torch.zeros(4, dtype=torch.int32), 3, 0, 32)  # 4 words: not a multiple of 3
    with pytest.raises(ValueError):
        unpack_rows(torch.zeros(4, dtype=torch.int32), 4, 0, 33)  # more values than stored


def test_pad_to():
    x = torch.arange(1, 11).reshape(2, 5)
    assert pad_to(x, 5, 1) is x
    y = pad_to(x, 4, 1)
    assert y.shape == (2, 8) and torch.equal(y[:, :5], x) and (y[:, 5:] == 0).all()
    z = pad_to(x, 32, 0)
    assert z.shape == (32, 5) and torch.equal(z[:2], x) and (z[2:] == 0).all()


GPTQ_CASES = [
    # (out, in, group_size)
    (64, 128, 32),
    (48, 200, 64),  # in not a multiple of 32, partial last group
    (33, 96, -1),  # out not a multiple of 32, one group
    (172, 64, 64),
    (5, 7, 4),
    (1, 1, 128),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("out_f, in_f, group_size", GPTQ_CASES)
def test_pack_gptq_round_trip(bits, sym, out_f, in_f, group_size):
    g = torch.Generator().manual_seed(out_f * 1000 + in_f)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    q = quantize_weight(w, Scheme(bits, group_size, sym))
    t = pack_gptq(q.codes, q.zero, q.scale, q.bits)
    ng = q.scale.shape[1]
    assert t["qweight"].dtype == torch.int32
    assert t["qweight"].shape == (-(-in_f // 32) * bits, out_f)
    assert t["qzeros"].dtype == torch.int32
    assert t["qzeros"].shape == (ng, -(-out_f // 32) * bits)
    assert t["scales"].dtype == torch.float16
    assert t["scales"].shape == (ng, out_f)

    codes, zero, scale = unpack_gptq(t, bits, group_size, in_f, out_f)
    assert codes.dtype == torch.uint8 and torch.equal(codes, q.codes)
    assert zero.shape == q.zero.shape and torch.equal(zero, q.zero.float())  # stored as is
    assert scale.dtype == torch.float32 and torch.equal(scale, q.scale.half().float())

    w_back = QuantizedWeight(Scheme(bits, group_size, sym), codes, scale, zero).dequantize()
    w_ref = q.dequantize()
    # Only the fp16 rounding of the scale differs: |code - zero| <= 2^bits, rel. error <= 2^-11.
    tol = (q.scale.abs().amax() * 2**bits * 2**-10).item()
    assert torch.allclose(w_back, w_ref, rtol=0, atol=tol)
    assert torch.allclose(w_back, w_ref, rtol=2**-10, atol=1e-7)


def test_pack_gptq_qweight_is_transposed_codes_packed_along_in():
    bits = 4
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    q = quantize_weight(w, Scheme(bits, 32, False))
    t = pack_gptq(q.codes, q.zero, q.scale, q.bits)
    # Column o of qweight packs row o of the codes (all in_features of output o).
    for o in (0, 17, 39):
        assert _as_unsigned(t["qweight"][:, o]) == _reference_pack(q.codes[o].tolist(), bits)
    # Row k of qzeros packs the zeros of group k across the (zero-padded) outputs.
    z = q.zero.t().to(torch.int64)
    for k in range(2):
        assert _as_unsigned(t["qzeros"][k]) == _reference_pack(z[k].tolist() + [0] * 24, bits)


def test_unpack_gptq_checks_shapes():
    q = quantize_weight(torch.randn(32, 64), Scheme(4, 32, False))
    t = pack_gptq(q.codes, q.zero, q.scale, q.bits)
    unpack_gptq(t, 4, 32, 64, 32)
    with pytest.raises(ValueError, match="qweight"):
        unpack_gptq(t, 4, 32, 96, 32)
    with pytest.raises(ValueError):
        unpack_gptq(t, 4, 64, 64, 32)  # wrong group size: one group expected, two stored
    with pytest.raises(ValueError):
        unpack_gptq(t, 3, 32, 64, 32)
