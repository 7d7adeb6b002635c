"""Bit packing of integer codes into int32 words: the GPTQ / auto-round checkpoint layout.

Pure tensor math, no knowledge of files or models.

Packing rule (the same for every width from 1 to 8 bits): a run of 32 values along
the packed dimension becomes exactly `bits` int32 words, read as one little-endian bit stream of
32 * bits bits. Value i of the run occupies stream bits [i*bits, (i+1)*bits), i.e. word
(i*bits) // 32 starting at bit (i*bits) % 32, lowest bit first. For 2/4/8 bits no value crosses a
word boundary, so this is the familiar "value i of a word in bits [i*bits, (i+1)*bits)"; for 3 bits
it is GPTQ's 32-values-in-3-words layout, with values 10 and 21 straddling word boundaries.
compressed-tensors' pack-quantized layout is the same stream for every width (cut to
ceil(n * bits / 32) words).

Words are stored as torch.int32, so a word whose top bit is set is negative. Internally all bit
arithmetic is done on int64 holding the unsigned word value in [0, 2^32), and converted to the
signed int32 range explicitly (no reliance on overflowing casts).

The packed dimension must be a multiple of 32 long; use `pad_to` first. Padding is not recorded in
the packed tensor: the caller has to keep the true size and pass it to `unpack_rows`.
"""
from __future__ import annotations

import torch

from lowbit.qdq.groups import n_groups

# The bit widths the GPTQ layout packs (and so every writer of it, and QuantLinear, can hold).
PACKED_BITS = (2, 3, 4, 8)
STREAM_BITS = range(1, 9)  # the widths pack_rows packs
_U32 = 1 << 32
_MASK32 = _U32 - 1


def _check_bits(bits: int) -> None:
    if bits not in STREAM_BITS:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits}")


def _check_gptq_bits(bits: int) -> None:
    if bits not in PACKED_BITS:
        raise ValueError(f"bits must be one of {PACKED_BITS} for the GPTQ layout, got {bits}")


def _slot_layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the 32 values of a run: (index of its first word, bit offset in that word)."""
    pos = torch.arange(32, device=device, dtype=torch.int64) * bits
    return pos // 32, pos % 32


def pad_to(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    """Zero-pad x at the end of `dim` to the next multiple of `multiple` (x itself if none needed).

    The true size is not recorded anywhere: the caller must keep it (e.g. in_features) to cut the
    padding off again after unpacking.
    """
    size = x.shape[dim]
    pad = -size % multiple
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def pack_rows(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer values x (each in [0, 2^bits - 1]) along `dim` into int32 words.

    x.shape[dim] must be a multiple of 32 (pad with `pad_to` and remember the true size); the
    result has x.shape[dim] // 32 * bits words along `dim`, other dimensions unchanged.
    Raises TypeError for a non-integer x, ValueError for unsupported bits, a bad size along dim
    or values out of range.
    """
    _check_bits(bits)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"pack_rows needs an integer tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("pack_rows needs at least one dimension")
    size = x.shape[dim]
    if size % 32:
        raise ValueError(f"size along dim {dim} is {size}, not a multiple of 32; pad_to() first")
    v = x.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(
            f"values must lie in [0, {(1 << bits) - 1}] for {bits} bits, "
            f"got range [{int(v.min())}, {int(v.max())}]"
        )

    v = v.movedim(dim, -1)
    lead = v.shape[:-1]
    v = v.reshape(*lead, size // 32, 32)
    word, shift = _slot_layout(bits, v.device)
    placed = v << shift  # < 2^39, no overflow in int64
    words = torch.zeros(*lead, size // 32, bits + 1, dtype=torch.int64, device=v.device)
    # Bit fields are disjoint, so summing them equals OR-ing them. The bits of a value that run
    # past its first word (3-bit straddlers) land in the next word; the spare word bits+1 only ever
    # receives zeros (the last value of a run ends exactly on the last word's top bit).
    words.index_add_(-1, word, placed & _MASK32)
    words.index_add_(-1, word + 1, placed >> 32)
    words = words[..., :bits]
    words = torch.where(words >= 1 << 31, words - _U32, words).to(torch.int32)
    return words.reshape(*lead, size // 32 * bits).movedim(-1, dim)


def unpack_rows(p: torch.Tensor, bits: int, dim: int, size: int) -> torch.Tensor:
    """Inverse of `pack_rows`: the first `size` values along `dim`, as uint8.

    p: int32 words (any integer dtype holding 32-bit words, signed or not, is accepted).
    Raises ValueError if p.shape[dim] is not a multiple of bits or holds fewer than `size` values.
    """
    _check_bits(bits)
    if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
        raise TypeError(f"unpack_rows needs an integer tensor, got {p.dtype}")
    n_words = p.shape[dim]
    if n_words % bits:
        raise ValueError(f"{n_words} words along dim {dim} is not a multiple of bits={bits}")
    capacity = n_words // bits * 32
    if not 0 <= size <= capacity:
        raise ValueError(f"size {size} outside [0, {capacity}] for {n_words} words of {bits} bits")

    w = p.to(torch.int64).movedim(dim, -1) & _MASK32  # unsigned word values
    lead = w.shape[:-1]
    w = w.reshape(*lead, n_words // bits, bits)
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # spare word for the straddle read
    word, shift = _slot_layout(bits, w.device)
    lo = w[..., word]  # [..., runs, 32]
    hi = w[..., word + 1] & 0xFF  # at most 8 bits are ever needed from the next word
    v = ((lo | (hi << 32)) >> shift) & ((1 << bits) - 1)
    v = v.reshape(*lead, capacity)[..., :size]
    return v.to(torch.uint8).movedim(-1, dim)


def pack_gptq(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """GPTQ-family tensors of one linear layer from its codes (uint8 [out, in]), zero points and
    scales ([out, n_groups]).

    Returns {"qweight", "qzeros", "scales"}:
      qweight: int32 [ceil(in/32) * bits, out]: codes transposed to [in, out], packed along in.
      qzeros:  int32 [n_groups, ceil(out/32) * bits]: zero points [n_groups, out], packed along out.
      scales:  float16 [n_groups, out].
    in / out not a multiple of 32 are zero-padded before packing (standard GPTQ kernels expect
    multiples of 32, so such a layer only round-trips through `unpack_gptq`, which cuts the padding
    off using the true sizes). Dequantization is w = scales * (code - zero) per group, as in
    the int data type; no g_idx (act-order) is produced: group of input column j is
    j // group_size.

    Zero convention: the zero point is stored AS IS ("gptq_v2" convention in GPTQModel terms).
    Historically GPTQ v1 checkpoints (AutoGPTQ's pack) stored zero - 1 and kernels added 1 back
    after unpacking; that is not done here, so an exporter targeting v1 readers must subtract 1
    (mod 2^bits) before calling pack_rows itself or declare the v2 format.
    Symmetric int weights carry a signed scale (see lowbit.qdq.int); it is stored signed.
    """
    _check_gptq_bits(bits)
    codes = pad_to(codes.t(), 32, dim=0)
    qweight = pack_rows(codes, bits, dim=0)

    zero = zero.detach()
    if zero.dtype.is_floating_point:
        if not torch.equal(zero, zero.round()):
            raise ValueError("zero points must be integer-valued")
        zero = zero.round()
    zero = zero.to(torch.int64).t()  # [n_groups, out]
    qzeros = pack_rows(pad_to(zero, 32, dim=1), bits, dim=1)

    scales = scale.detach().t().to(torch.float16).contiguous()
    if not torch.isfinite(scales).all():
        raise ValueError("scales overflow float16")
    return {"qweight": qweight.contiguous(), "qzeros": qzeros.contiguous(), "scales": scales}


def unpack_gptq(
    tensors: dict[str, torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_gptq`: (codes uint8 [out, in], zero float32 [out, n_groups],
    scale float32 [out, n_groups]).

    zero is returned as integer-valued float32, the dtype the int type's zero points have,
    and as stored (no +1: see the zero convention in `pack_gptq`). Shapes are checked against the
    given sizes; ValueError on a mismatch.
    """
    _check_gptq_bits(bits)
    ng = n_groups(in_features, group_size)
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    expect = {
        "qweight": (-(-in_features // 32) * bits, out_features),
        "qzeros": (ng, -(-out_features // 32) * bits),
        "scales": (ng, out_features),
    }
    for name, shape in expect.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    codes = unpack_rows(qweight, bits, dim=0, size=in_features).t().contiguous()
    zero = unpack_rows(qzeros, bits, dim=1, size=out_features).t().to(torch.float32).contiguous()
    scale = scales.t().to(torch.float32).contiguous()
    return codes, zero, scale
