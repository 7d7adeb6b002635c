"""The bytes of llama.cpp's block types (kquant.py's formats), packed from lowbit's codes and
scales exactly: what llama.cpp decodes from them is what kquant.dequantize computes.

Layouts (ggml-common.h; bytes in this order per super-block of 256, or block of 32):
    Q2_K  scales[16] (sc | m << 4), qs[64] (2-bit), d, dmin
    Q3_K  hmask[32] (each code's bit 2), qs[64] (bits 0-1), scales[12] (16 x 6 bits), d
    Q4_K  d, dmin, scales[12] (8 scales and 8 mins, 6 bits each), qs[128] (4-bit)
    Q5_K  d, dmin, scales[12], qh[32] (each code's bit 4), qs[128] (bits 0-3)
    Q6_K  ql[128] (bits 0-3), qh[64] (bits 4-5), scales[16] (int8), d
    Q4_0  d, qs[16];  Q5_0  d, qh[4], qs[16];  Q8_0  d, qs[32] (int8)
    Q4_1  d, m, qs[16];  Q5_1  d, m, qh[4], qs[16]   (m: the block's min, y = d * q + m)
d and dmin are float16. A 2-bit field of code e in a 128-code half sits in byte e % 32 of its 32
(or 64) bytes at shift 2 * ((e % 128) // 32); nibbles likewise by 32 (Q4_K/Q5_K) or 64 (Q6_K).
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.qdq.kquant import FORMATS, KFormat


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1)


def _fields(c: np.ndarray, width: int, span: int) -> np.ndarray:
    """Pack `width`-bit fields: c [n, k * span] -> bytes [n, k // (8 // width) * span]; field j of a
    run of 8 // width spans sits at shift j * width."""
    n = c.shape[0]
    per = 8 // width
    c = c.reshape(n, -1, per, span).astype(np.uint8)
    out = np.zeros((n, c.shape[1], span), dtype=np.uint8)
    for j in range(per):
        out |= c[:, :, j] << np.uint8(j * width)
    return out.reshape(n, -1)


def _bits(c: np.ndarray, bit: int) -> np.ndarray:
    """Bit `bit` of every code, 8 codes 32 apart per byte: [n, 256] -> [n, 32]."""
    return _fields((c >> bit) & 1, 1, 32)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes for 8 scales and 8 mins of 6 bits: [n, 8] each -> [n, 12]."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def _q3_scales(s6: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes for 16 unsigned 6-bit scales: low nibbles two per byte, high 2 bits four per byte."""
    s6 = s6.astype(np.uint8)
    lo = (s6[:, :8] & 15) | ((s6[:, 8:] & 15) << 4)
    hi = np.zeros((s6.shape[0], 4), dtype=np.uint8)
    for k in range(4):
        hi |= ((s6[:, 4 * k: 4 * k + 4] >> 4) & 3) << np.uint8(2 * k)
    return np.concatenate([lo, hi], axis=1)


def _small_ints(dl: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The sub-block integers sc = dl / d (exact: dl was computed as d * sc)."""
    safe = np.where(d == 0, 1.0, d)
    return np.where(d == 0, 0, np.rint(dl / safe)).astype(np.int32)


def pack(name: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, extras: dict) -> np.ndarray:
    """Bytes [out, n_blocks * block_bytes] of a weight quantized by kquant.quantize (codes uint8
    [out, in], scale and zero [out, n_groups], extras super_scale / super_min [out, n_super])."""
    fmt: KFormat = FORMATS[name]
    out_f, in_f = codes.shape
    nb = in_f // fmt.weights_per_block
    rows = out_f * nb
    c = codes.numpy().astype(np.uint8).reshape(rows, fmt.weights_per_block)
    dl = scale.float().numpy().reshape(rows, fmt.per)
    d = extras["super_scale"].float().numpy().reshape(rows, 1)
    if not fmt.sub_levels:  # legacy: one fp16 scale (and for Q4_1/Q5_1 an fp16 min) per block
        parts = [_fp16(d)]
        if fmt.mins:  # m = the block's min: y = d * q + m, lowbit's offset is -m
            parts.append(_fp16(-extras["super_min"].float().numpy().reshape(rows, 1)))
        if fmt.bits == 8:
            parts.append((c.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
        else:
            parts.append(_fields(c & 15, 4, 16))
            if fmt.bits == 5:
                parts.insert(len(parts) - 1, np.packbits((c >> 4) & 1, axis=1, bitorder="little"))
        return np.concatenate(parts, axis=1).reshape(out_f, -1)
    sc = _small_ints(dl, d)
    if fmt.mins:
        dmin = extras["super_min"].float().numpy().reshape(rows, 1)
        m = _small_ints(zero.float().numpy().reshape(rows, fmt.per), dmin)
    if name == "q2_k":
        parts = [(sc | (m << 4)).astype(np.uint8), _fields(c, 2, 32), _fp16(d), _fp16(dmin)]
    elif name == "q3_k":
        parts = [_bits(c, 2), _fields(c & 3, 2, 32), _q3_scales(sc + 32), _fp16(d)]
    elif name == "q4_k":
        parts = [_fp16(d), _fp16(dmin), _k_scales(sc, m), _fields(c, 4, 32)]
    elif name == "q5_k":
        parts = [_fp16(d), _fp16(dmin), _k_scales(sc, m), _bits(c, 4), _fields(c & 15, 4, 32)]
    else:  # q6_k
        parts = [_fields(c & 15, 4, 64), _fields(c >> 4, 2, 32), sc.astype(np.int8).view(np.uint8), _fp16(d)]
    return np.concatenate(parts, axis=1).reshape(out_f, -1)


# ---------------------------------------------------------------------------------------------
# encoders of integer codes and float weights, for the gguf format's q4_0/q8_0 (exact) and q4_k
# (re-encoded) options: [rows, cols] -> uint8 [rows, cols // block * bytes_per_block]


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8)


def _block_scales(scale: np.ndarray, group: int, cols: int) -> np.ndarray:
    """Per-32-block scales [rows, cols // 32] from per-group scales [rows, n_groups]."""
    return np.repeat(scale, group // 32, axis=1)[:, : cols // 32]


def encode_q4_0_exact(codes: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """Q4_0 blocks from lowbit's 4-bit symmetric codes (zero 8) and signed scales."""
    rows, cols = codes.shape
    q = codes.astype(np.uint8).reshape(rows, cols // 32, 2, 16)
    qs = q[:, :, 0] | (q[:, :, 1] << np.uint8(4))  # low nibbles elements 0..15, high 16..31
    d = _fp16_bytes(_block_scales(scale, group, cols)[..., None])
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def encode_q8_0_exact(codes: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """Q8_0 blocks from lowbit's 8-bit symmetric codes (zero 128) and signed scales."""
    rows, cols = codes.shape
    qs = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8).reshape(rows, cols // 32, 32)
    d = _fp16_bytes(_block_scales(scale, group, cols)[..., None])
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def _qkx2_scales(x: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1, nstep: int = 20):
    """ggml's make_qkx2_quants for many sub-blocks at once, x [n, 32] -> (scale [n], -min [n]):
    min/max rounding, then a search over nstep slightly different scales, each refit by weighted
    least squares (weights av_x + |x|), keeping the smallest weighted squared error."""
    av_x = np.sqrt((x * x).mean(-1, keepdims=True))
    wts = av_x + np.abs(x)
    sum_w, sum_x = wts.sum(-1), (wts * x).sum(-1)
    mn = np.minimum(x.min(-1), 0.0)
    mx = x.max(-1)
    rng = mx - mn
    flat = rng == 0
    rng = np.where(flat, 1.0, rng)
    scale = rng / nmax
    q = np.clip(np.rint((x - mn[:, None]) / scale[:, None]), 0, nmax)
    best = (wts * (scale[:, None] * q + mn[:, None] - x) ** 2).sum(-1)
    best_scale, best_min = scale.copy(), mn.copy()
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / rng
        q = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        sum_l, sum_l2, sum_xl = (wts * q).sum(-1), (wts * q * q).sum(-1), (wts * q * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, 0.0, this_min)
            err = (wts * (this_scale[:, None] * q + this_min[:, None] - x) ** 2).sum(-1)
        better = (det > 0) & (err < best)
        best = np.where(better, err, best)
        best_scale = np.where(better, this_scale, best_scale)
        best_min = np.where(better, this_min, best_min)
    return np.where(flat, 0.0, best_scale), -best_min


def encode_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K super-blocks (256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales and
    mins, 128 bytes of nibbles; w = d*sc*q - dmin*m), following ggml's quantize_row_q4_K_ref:
    each sub-block of 32 gets a scale and min (make_qkx2_quants), these are rounded to 6 bits
    relative to the super-block's largest, and the codes are rounded with the stored scales."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(-1, 8, 32)
    nb = x.shape[0]
    sub_scale, sub_min = _qkx2_scales(x.reshape(-1, 32))
    sub_scale, sub_min = sub_scale.reshape(nb, 8), sub_min.reshape(nb, 8)
    max_scale, max_min = sub_scale.max(-1, keepdims=True), sub_min.max(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(max_scale > 0, np.rint(sub_scale * (63.0 / max_scale)), 0).clip(0, 63).astype(np.uint8)
        m = np.where(max_min > 0, np.rint(sub_min * (63.0 / max_min)), 0).clip(0, 63).astype(np.uint8)
    d = (max_scale[:, 0] / 63.0).astype(np.float16)
    dmin = (max_min[:, 0] / 63.0).astype(np.float16)
    eff_d = (d.astype(np.float32)[:, None] * sc)[..., None]
    eff_m = (dmin.astype(np.float32)[:, None] * m)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(eff_d > 0, np.rint((x + eff_m) / eff_d), 0).clip(0, 15).astype(np.uint8)
    scales = np.empty((nb, 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    q = q.reshape(nb, 4, 2, 32)  # pairs of sub-blocks share 32 bytes: low nibble first
    qs = (q[:, :, 0] | (q[:, :, 1] << np.uint8(4))).reshape(nb, 128)
    out = np.concatenate([_fp16_bytes(d[:, None]), _fp16_bytes(dmin[:, None]), scales, qs], axis=-1)
    return out.reshape(rows, -1)
