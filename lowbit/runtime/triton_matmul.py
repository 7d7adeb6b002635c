"""Fused dequantize + matmul for QuantLinear on CUDA (Triton), 2/4/8 bits, GPTQ layout.

Each program computes a [BLOCK_M, BLOCK_N] tile of y = x @ W^T. Along K it loads the packed
int32 words of W^T (32 // bits values per word, stacked along K), unpacks them with a shift and a
mask, subtracts the zero point and multiplies by the scale of each value's group, and feeds the
tile to tl.dot: the float weight never exists in memory.
"""
from __future__ import annotations

import functools

import torch

from lowbit.qdq.pack import PACKED_BITS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: QuantLinear uses its torch path
    triton = None


@functools.cache
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 256}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256}, num_warps=8, num_stages=3),
        ],
        key=["M_BUCKET", "N", "K", "BITS", "BLOCK_K"],
    )
    @triton.jit
    def _qmatmul_kernel(
        x_ptr, qw_ptr, s_ptr, qz_ptr, y_ptr,
        M, N, K, M_BUCKET, group_size,
        stride_xm, stride_xk, stride_ym, stride_yn,
        BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # BLOCK_K divides the group size, so one K tile has one scale / zero row per column;
        # each packed word is loaded once and unpacked in registers.
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS_K: tl.constexpr = BLOCK_K // PER_WORD
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        shifts = tl.arange(0, PER_WORD) * BITS  # [PER_WORD]
        zero_shift = (offs_n % PER_WORD) * BITS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            rows = k0 // PER_WORD + tl.arange(0, WORDS_K)
            words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            q = (words[:, None, :] >> shifts[None, :, None]) & MASK  # [WORDS_K, PER_WORD, BLOCK_N]
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))
            g = k0 // group_size
            scale = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g * (N // PER_WORD) + offs_n // PER_WORD, mask=n_mask, other=0)
            z = (zw >> zero_shift) & MASK
            w = ((q - z[None, :]).to(tl.float32) * scale[None, :]).to(x.dtype)
            acc += tl.dot(x, w)
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y,
                 mask=(offs_m[:, None] < M) & n_mask[None, :])


def supports(layer) -> bool:
    # widths whose values never straddle a 32-bit word (not 3)
    word_aligned = layer.bits in PACKED_BITS and 32 % layer.bits == 0
    return word_aligned and layer.out_features % 32 == 0 and layer.group_size % 32 == 0 and layer.in_features % 32 == 0


def quant_matmul(x: torch.Tensor, layer) -> torch.Tensor:
    """x [..., in] @ dequantized(layer)^T (+ bias) without materializing the weight."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype not in (torch.float16, torch.bfloat16):
        x2 = x2.to(torch.float16)
    M, K = x2.shape
    N = layer.out_features
    block_k = 64 if layer.group_size % 64 == 0 else 32
    if N % 32 or K % block_k or layer.group_size % 32:
        raise ValueError("the Triton path needs in/out features and the group size in multiples of 32")
    y = torch.empty(M, N, device=x.device, dtype=x2.dtype)
    bucket = 1 if M <= 16 else (64 if M <= 64 else 4096)  # autotune per size class, not per M

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    _qmatmul_kernel[grid](
        x2, layer.qweight, layer.scales, layer.qzeros, y,
        M, N, K, bucket, layer.group_size,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        BITS=layer.bits, BLOCK_K=block_k,
    )
    y = y.to(x.dtype).reshape(*shape[:-1], N)
    return y + layer.bias.to(y.dtype) if layer.bias is not None else y
