"""SignRound: tune each weight's rounding and each group's range by signed gradient descent so the
quantized block reproduces the full-precision block's outputs.

Per weight a rounding offset V in [-0.5, 0.5] (init 0) added before rounding; per group factors on
the min and max (init 1, kept in [0, 1]). Each step: p -= lr * sign(grad), lr decaying linearly to
0. The parameters of the best minibatch loss seen are kept.

All Linear layers of a block that share a group size and symmetry are tuned as one [rows, group]
tensor, so one iteration is one quantize-dequantize call per such bucket plus the block's forward
and backward: no Python loop over layers or groups.
"""
from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.func import functional_call

from lowbit.algorithms.base import BlockData, BlockResult, LayerMap
from lowbit.algorithms.cpu_attention import attention_context
from lowbit.algorithms.prescale import search_range_factors
from lowbit.model import block_output
from lowbit.qdq import fake_quantize_groups, fake_quantize_tuned, from_groups, group_range, n_groups, quantize, to_groups


@dataclass(frozen=True)
class SignRound:
    iters: int = 200
    lr: float | None = None  # None: 1 / iters
    batch_size: int = 8
    tune_minmax: bool = True  # learn the per-group min/max factors, not only V
    # Start from an activation-weighted search of each group's range (SignRoundV2); None: for
    # layers of 3 bits or fewer, where it helps (BENCHMARKS.md).
    prescale: bool | None = None
    minmax_max: float = 1.0  # upper bound of the min/max factors (1: the range only shrinks)
    # torch.compile the quantize-dequantize (one fused kernel); None: on for CUDA blocks, where it
    # pays (bench/gpu.py). Off, a hand-written backward does it in a few passes over the weights.
    compile: bool | None = None
    # Run the block under bfloat16 autocast during tuning (matmuls and attention in bf16; the
    # residual stream, norms, tuned parameters and loss in float32); None: on where bf16 matmuls
    # are fast (CUDA; CPUs with AVX512-BF16/AMX). On a CPU its attention then runs as plain bf16
    # matmuls (cpu_attention.py).
    amp: bool | None = None

    name: ClassVar[str] = "signround"
    needs_data: ClassVar[bool] = True

    def __post_init__(self):
        from lowbit.errors import LowbitError

        if self.iters < 0:
            raise LowbitError(f"iters must be >= 0, got {self.iters}")
        if self.batch_size < 1:
            raise LowbitError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and self.lr <= 0:
            raise LowbitError(f"lr must be positive, got {self.lr}")

    def uses_prescale(self, bits: int) -> bool:
        return self.prescale if self.prescale is not None else bits <= 3

    def needs_importance(self, schemes) -> bool:
        return any(self.uses_prescale(s.bits) for s in schemes)

    def tuning_dtype(self, device: torch.device) -> torch.dtype | None:
        """bfloat16 where the block runs under autocast to it while tuned (see `amp`), else None.
        The pipeline computes the block's targets and outputs under the same autocast."""
        if self.amp is not None:
            return torch.bfloat16 if self.amp else None
        return torch.bfloat16 if _fast_bf16(device.type) else None

    def quantize_block(self, block, layers: LayerMap, data: BlockData, seed: int = 0) -> BlockResult:
        return signround_block(self, block, layers, data, seed)


class _Bucket:
    """The layers of one (group size, symmetry), their groups stacked as rows of one tensor."""

    def __init__(self, group_size: int, sym: bool, items, init_factors: dict):
        self.group_size, self.sym = group_size, sym
        self.slices = []  # (name, start row, end row, out_features, in_features)
        rows, bits, factors, start = [], [], [], 0
        for name, lin, scheme in items:
            out_f, in_f = lin.weight.shape
            wg = to_groups(lin.weight.detach().float(), group_size)
            rows.append(wg.reshape(-1, wg.shape[-1]))
            n = rows[-1].shape[0]
            bits.append(torch.full((n, 1), float(scheme.bits)))
            f = init_factors.get(name)
            factors.append(f.reshape(n, 1) if f is not None else torch.ones(n, 1, device=wg.device))
            self.slices.append((name, start, start + n, out_f, in_f))
            start += n
        self.w = torch.cat(rows)
        self.range = group_range(self.w)  # fixed: only the factors on it are tuned
        self.bits = torch.cat(bits).to(self.w.device)
        self.v = torch.zeros_like(self.w, requires_grad=True)
        self.mn = torch.cat(factors).requires_grad_(True)
        self.mx = torch.cat(factors).requires_grad_(True)

    def params(self, tune_minmax: bool):
        return [self.v, self.mn, self.mx] if tune_minmax else [self.v]

    def weights(self, dtype, compiled=None) -> dict[str, torch.Tensor]:
        if compiled is not None:
            wq = compiled(self.w, self.bits, self.sym, self.v, self.mn, self.mx).to(dtype)
        else:
            wq = fake_quantize_tuned(self.w, self.bits, self.sym, self.v, self.mn, self.mx, self.range, dtype)
        # torch.split, not slicing: its backward is one concatenation, where each slice's backward
        # would fill and add a zero gradient the size of the whole bucket.
        parts = torch.split(wq, [b - a for _, a, b, _, _ in self.slices])
        return {
            name + ".weight": from_groups(part.view(out_f, -1, wq.shape[-1]), in_f)
            for part, (name, a, b, out_f, in_f) in zip(parts, self.slices)
        }

    def quantized(self, layers: LayerMap) -> dict:
        out = {}
        for name, a, b, out_f, in_f in self.slices:
            lin, s = layers[name]
            ng = n_groups(in_f, self.group_size)
            v = from_groups(self.v.detach()[a:b].view(out_f, ng, -1), in_f)
            out[name] = quantize(
                lin.weight, s.bits, s.group_size, s.sym, v,
                self.mn.detach()[a:b].view(out_f, ng), self.mx.detach()[a:b].view(out_f, ng),
            )
        return out


def _buckets(layers: LayerMap, init_factors: dict) -> list[_Bucket]:
    by_key: dict = {}
    for name, (lin, s) in layers.items():
        by_key.setdefault((s.group_size, s.sym), []).append((name, lin, s))
    return [_Bucket(g, sym, items, init_factors) for (g, sym), items in by_key.items()]


def _prescale(cfg: SignRound, layers: LayerMap, importance: dict | None) -> dict:
    """Initial min/max factors per layer [out, n_groups] from the weighted range search."""
    return {
        name: search_range_factors(lin.weight, s.bits, s.group_size, s.sym, (importance or {}).get(name))
        for name, (lin, s) in layers.items()
        if cfg.uses_prescale(s.bits)
    }


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless minibatch indices: a fresh seeded permutation each pass over the data."""
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


@functools.cache
def _fast_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@functools.cache
def _compiled_qdq():
    return torch.compile(fake_quantize_groups, dynamic=False)


def signround_block(cfg: SignRound, block, layers: LayerMap, data: BlockData, seed: int = 0) -> BlockResult:
    t0 = time.perf_counter()
    buckets = _buckets(layers, _prescale(cfg, layers, data.importance))
    on_cuda = buckets[0].w.is_cuda
    compiled = _compiled_qdq() if (cfg.compile if cfg.compile is not None else on_cuda) else None
    params = [p for b in buckets for p in b.params(cfg.tune_minmax)]
    dtype = next(iter(layers.values()))[0].weight.dtype
    lr = cfg.lr if cfg.lr is not None else 1.0 / max(cfg.iters, 1)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(len(data.inputs), cfg.batch_size, gen)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    # With amp the block runs under autocast: its matmuls and attention in bf16 (the quantized
    # weights come out of the quantize-dequantize in bf16), while the residual stream, the norms and
    # the loss stay in the inputs' dtype, as in auto-round's amp. A block cast to bf16 outright
    # rounds the residual sums too: 0.002 perplexity on pycode-7m W4 at iters 50 (BENCHMARKS.md).
    amp = cfg.tuning_dtype(buckets[0].w.device)
    device_type = buckets[0].w.device.type
    autocast = (lambda: torch.autocast(device_type, dtype=amp)) if amp is not None else nullcontext
    weight_dtype = amp if amp is not None else dtype
    inputs = data.inputs.to(dtype)

    def loss_on(idx):
        w = {k: v for b in buckets for k, v in b.weights(weight_dtype, compiled).items()}
        with autocast():
            out = block_output(functional_call(block, w, (inputs[idx],), data.kwargs))
        return F.mse_loss(out.float(), data.targets[idx].float())

    best_loss, best = float("inf"), [p.detach().clone() for p in params]
    first_loss = None
    with attention_context(amp, buckets[0].w.device):
        try:
            for t in range(cfg.iters):
                loss = loss_on(next(batches))
                value = loss.item()
                if first_loss is None:
                    first_loss = value
                if value < best_loss:
                    best_loss = value
                    for kept, p in zip(best, params):
                        kept.copy_(p.detach())
                loss.backward()
                step = lr * (1 - t / cfg.iters)
                with torch.no_grad():  # signed step, in place
                    for b in buckets:
                        b.v.add_(b.v.grad.sign_(), alpha=-step).clamp_(-0.5, 0.5)
                        if cfg.tune_minmax:
                            b.mn.add_(b.mn.grad.sign_(), alpha=-step).clamp_(0, cfg.minmax_max)
                            b.mx.add_(b.mx.grad.sign_(), alpha=-step).clamp_(0, cfg.minmax_max)
                    for p in params:
                        p.grad = None
        finally:
            for p in frozen:
                p.requires_grad_(True)
    with torch.no_grad():
        for p, q in zip(params, best):
            p.copy_(q)
    weights = {}
    for b in buckets:
        weights.update(b.quantized(layers))
    seconds = time.perf_counter() - t0
    stats = {
        "loss_first": first_loss,
        "loss_best": best_loss if cfg.iters else None,
        "iters": cfg.iters,
        "amp": str(amp).removeprefix("torch.") if amp is not None else None,
        "seconds": seconds,
        "seconds_per_iter": seconds / cfg.iters if cfg.iters else 0.0,
    }
    return BlockResult(weights, stats)
