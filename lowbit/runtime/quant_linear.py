"""QuantLinear: a Linear layer whose weight stays packed in memory (the GPTQ / auto-round layout)
and is dequantized on the fly at each call. CPU: plain torch. CUDA: a fused Triton kernel for
2/4/8 bits when triton is importable (lowbit.runtime.triton_matmul), else the torch path."""
from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.qdq.pack import pack_gptq, unpack_rows
from lowbit.quantized import QuantizedWeight
from lowbit.schemes import Scheme


def unpack_words(p: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """All values packed along `dim` of int32 words, as uint8. For 2/4/8 bits no value straddles a
    byte, so the words are read as little-endian bytes and each byte is split with shifts: uint8
    work, 4x less memory traffic than shifting int32 words. 3 bits goes through the general
    unpacker."""
    if bits == 3:
        return unpack_rows(p, 3, dim, p.shape[dim] // 3 * 32)
    p = p.movedim(dim, -1).contiguous()  # [..., words]
    b = p.view(torch.uint8).view(*p.shape, 4)  # [..., words, 4 bytes], little-endian
    if bits < 8:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=p.device)
        b = (b.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., words, 4, 8 // bits]
    v = b.reshape(*p.shape[:-1], p.shape[-1] * (32 // bits))
    return v.movedim(-1, dim)


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W = scales * (codes - zeros) per group of input columns.

    Buffers, as in GPTQ checkpoints (zero points stored as is, "v2"):
      qweight int32 [ceil(in/32)*bits, out], qzeros int32 [n_groups, ceil(out/32)*bits],
      scales fp16 [n_groups, out], bias (compute dtype) or None.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = True, dtype: torch.dtype = torch.float32, device=None, sym: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        # as the checkpoint's config declares it (the kernels do not need it; re-export does)
        self.scheme = Scheme(bits, group_size, sym)
        self.group_size = group_size if group_size > 0 else in_features
        ng = math.ceil(in_features / self.group_size)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(math.ceil(in_features / 32) * bits, out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(ng, math.ceil(out_features / 32) * bits, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(ng, out_features, dtype=torch.float16, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None = None, dtype=torch.float32) -> "QuantLinear":
        out_f, in_f = q.codes.shape
        layer = cls(in_f, out_f, q.bits, q.group_size, bias is not None, dtype, sym=q.sym)
        for k, v in pack_gptq(q.codes, q.zero, q.scale, q.bits).items():
            getattr(layer, k).copy_(v)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W^T [in, out]: the layout the matmul below consumes."""
        codes = unpack_words(self.qweight, self.bits, 0)[: self.in_features]
        zeros = unpack_words(self.qzeros, self.bits, 1)[:, : self.out_features]
        scales = self.scales.to(dtype)
        g, k = self.group_size, self.in_features
        zeros = zeros.to(dtype)
        if k % g == 0:
            w = (codes.view(k // g, g, -1).to(dtype) - zeros.unsqueeze(1)) * scales.unsqueeze(1)
            return w.view(k, -1)
        idx = torch.arange(k, device=codes.device) // g
        return (codes.to(dtype) - zeros[idx]) * scales[idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # the fused kernel beats dequantize + cuBLAS at every size measured (bench/gpu.py)
            from lowbit.runtime import triton_matmul

            if triton_matmul.available() and triton_matmul.supports(self):
                return triton_matmul.quant_matmul(x, self)
        y = torch.matmul(x, self.dequantize(x.dtype))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.scheme.sym}")
