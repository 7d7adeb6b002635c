"""SignRound: tune each weight's rounding and each group's range by signed gradient descent so the
quantized block reproduces the full-precision block's outputs.

Per weight a rounding offset V in [-0.5, 0.5] (init 0) added before rounding; per group factors on
the min and max (init 1, kept in [0, 1]). Each step: p -= lr * sign(grad), lr decaying linearly to
0 (its start per layer: `SignRound.layer_lr`). The final parameters are kept (or, as in
auto-round, those of the lowest minibatch loss seen).

All Linear layers of a block that share a group size and symmetry are tuned as one [rows, group]
tensor, so one iteration is one quantize-dequantize call per such bucket plus the block's forward
and backward: no Python loop over layers or groups.
"""
from __future__ import annotations

import ctypes
import functools
import platform
import time
import warnings
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
    # The step's start (it decays linearly to 0); None: per layer, `layer_lr` below.
    lr: float | None = None
    batch_size: int = 8
    tune_minmax: bool = True  # learn the per-group min/max factors, not only V
    # Start from an activation-weighted search of each group's range (SignRoundV2); None: for
    # layers of 3 bits or fewer, where it helps (BENCHMARKS.md).
    prescale: bool | None = None
    minmax_max: float = 1.0  # upper bound of the min/max factors (1: the range only shrinks)
    # Which parameters the block keeps: "last", those the learning rate has decayed onto; or
    # "best", those of the lowest loss on one minibatch (auto-round's rule). Near the end that loss
    # varies with the minibatch's windows more than with the parameters (the lowest was a median 9%
    # under the last pass's mean), so "best" mostly picks an easy minibatch: on all the calibration
    # windows the last parameters had the lower loss in 132 of 138 blocks; perplexity was lower at
    # six of ten settings and within seed noise at the others (BENCHMARKS.md).
    keep: str = "last"
    # torch.compile the tuning step (quantize-dequantize, the block's forward and backward, the
    # loss) into fused kernels. None: on a CPU under bf16 autocast when a block's tuning work
    # (iters x tokens per step x weights) reaches COMPILE_MIN_WORK, where a compile with a warm cache
    # costs less than it saves (BENCHMARKS.md); on CUDA only the quantize-dequantize is compiled,
    # as measured there (bench/gpu.py). Off, eager, with a hand-written backward for the
    # quantize-dequantize. If compiling fails (no C++ compiler), tuning goes on eager, with a warning.
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
        if self.keep not in ("last", "best"):
            raise LowbitError(f"keep must be 'last' or 'best', got {self.keep!r}")

    def layer_lr(self, bits: int) -> float:
        """The learning rate of a layer's parameters: `lr`, or by default 1 / iters, which lets each
        rounding offset travel 0.5 in all. For layers of 3 bits or more at most 1 / sqrt(200 *
        iters): a signed step moves every parameter each iteration, so the random part of its walk
        grows as lr * sqrt(iters); with 1 / iters it is twice as large at 50 iterations as at 200.
        At 3-4 bits the rounding needs small corrections and that noise costs more than the shorter
        reach (at 50 iterations, pycode-7m W4 and W3 perplexity went down); at 2 bits the reach
        matters more and 1 / iters stays (BENCHMARKS.md). From 200 iterations up both are 1 / iters."""
        if self.lr is not None:
            return self.lr
        iters = max(self.iters, 1)
        return 1.0 / iters if bits <= 2 else min(1.0 / iters, (200 * iters) ** -0.5)

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

    def __init__(self, group_size: int, sym: bool, items, init_factors: dict, layer_lr):
        self.group_size, self.sym = group_size, sym
        self.slices = []  # (name, start row, end row, out_features, in_features)
        rows, bits, factors, lrs, start = [], [], [], [], 0
        for name, lin, scheme in items:
            out_f, in_f = lin.weight.shape
            wg = to_groups(lin.weight.detach().float(), group_size)
            rows.append(wg.reshape(-1, wg.shape[-1]))
            n = rows[-1].shape[0]
            bits.append(torch.full((n, 1), float(scheme.bits)))
            lrs.append((n, layer_lr(scheme.bits)))
            f = init_factors.get(name)
            factors.append(f.reshape(n, 1) if f is not None else torch.ones(n, 1, device=wg.device))
            self.slices.append((name, start, start + n, out_f, in_f))
            start += n
        self.w = torch.cat(rows)
        self.range = group_range(self.w)  # fixed: only the factors on it are tuned
        self.bits = torch.cat(bits).to(self.w.device)
        # the learning rate: one number when all rows share it, else a column of one per row
        self.lr = lrs[0][1] if len({lr for _, lr in lrs}) == 1 else torch.cat(
            [torch.full((n, 1), lr) for n, lr in lrs]).to(self.w.device)
        self.v = torch.zeros_like(self.w, requires_grad=True)
        self.mn = torch.cat(factors).requires_grad_(True)
        self.mx = torch.cat(factors).requires_grad_(True)

    def params(self, tune_minmax: bool):
        return [self.v, self.mn, self.mx] if tune_minmax else [self.v]

    @torch.no_grad()
    def step(self, decay: float, tune_minmax: bool, minmax_max: float) -> None:
        """The signed step, in place: p -= lr * decay * sign(grad), then back into its range."""
        bounded = [(self.v, -0.5, 0.5)]
        if tune_minmax:
            bounded += [(self.mn, 0, minmax_max), (self.mx, 0, minmax_max)]
        for p, lo, hi in bounded:
            g = p.grad.sign_()
            if isinstance(self.lr, torch.Tensor):
                p.add_(g.mul_(self.lr), alpha=-decay)
            else:
                p.add_(g, alpha=-self.lr * decay)
            p.clamp_(lo, hi)

    def weights(self, dtype, qdq) -> dict[str, torch.Tensor]:
        wq = qdq(self.w, self.bits, self.sym, self.v, self.mn, self.mx, self.range, dtype)
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


def _buckets(cfg: SignRound, layers: LayerMap, init_factors: dict) -> list[_Bucket]:
    by_key: dict = {}
    for name, (lin, s) in layers.items():
        by_key.setdefault((s.group_size, s.sym), []).append((name, lin, s))
    return [_Bucket(g, sym, items, init_factors, cfg.layer_lr) for (g, sym), items in by_key.items()]


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


def _reference_qdq(w, bits, sym, v, mn, mx, wrange, dtype):
    """The plain formula, for torch.compile to fuse (the range is cheap to recompute in a kernel)."""
    return fake_quantize_groups(w, bits, sym, v, mn, mx).to(dtype)


@functools.cache
def _compiled_qdq():
    return torch.compile(_reference_qdq, dynamic=False)


def _step_loss(block, buckets, qdq, weight_dtype, kwargs, x, target):
    """The tuning loss of one minibatch: the block with its quantize-dequantized weights against
    the full-precision targets. Everything it needs comes in as arguments, so one compiled version
    serves every block of a model. (Autocast, if any, is entered by the caller: inside, it would
    keep torch from caching the compiled backward between runs.)"""
    w = {}
    for b in buckets:
        w.update(b.weights(weight_dtype, qdq))
    out = block_output(functional_call(block, w, (x,), kwargs))
    return F.mse_loss(out.float(), target.float())


@functools.cache
def _compiled_step():
    return torch.compile(_step_loss, dynamic=False)


# A block's tuning work (iterations x tokens per step x its tuned weights) from which the whole
# step is compiled by default on a CPU. Compiling costs ~2-3 s per run once torch's cache
# (/tmp/torchinductor_$USER) is warm, ~18 s on 2 cores the first time, and saves 5-20% of each
# step. With a warm cache it pays for pycode-7m at 200 iterations (3.2e11 per block), not at 50
# (8.1e10) (BENCHMARKS.md). Any real LLM is far over the threshold.
COMPILE_MIN_WORK = 1.5e11
_compile_failed: list[str] = []  # the first failure's reason: not retried for later blocks


def _compile_mode(cfg: SignRound, device: torch.device, amp, work: float) -> str | None:
    """'step' (the whole tuning step compiled), 'qdq' (the quantize-dequantize only) or None."""
    if cfg.compile is False or _compile_failed:
        return None
    if cfg.compile:
        return "step"
    if device.type == "cuda":
        return "qdq"
    return "step" if amp is not None and work >= COMPILE_MIN_WORK else None


@functools.cache
def _keep_freed_buffers() -> None:
    """Each tuning step allocates and frees the same few-MB buffers. glibc's malloc starts by
    handing blocks over 128 KB back to the OS on free (and zeroing them again on the next use):
    in a fresh process that made a compiled step's iterations 15-35% longer in page faults
    (BENCHMARKS.md). glibc raises those thresholds by itself after the first big free, to 32 MB
    (64 MB for trimming); here they are set to that at once. Other C libraries are left alone."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


@functools.cache
def _skip_isa_probe() -> None:
    """Before its first CPU compile in a process, torch's inductor checks each vector ISA the CPU
    has (AVX2, AVX-512) by loading a probe library in a fresh Python subprocess: ~0.5 s of every
    compiled run (BENCHMARKS.md). The subprocess guards against instructions this process
    could not run, but torch reads the ISAs from ATen's CPU check, which has already vouched for
    them (CPU and OS support); so the list is taken without the probes. With AMX (whose use the
    OS must grant), or where inductor's internals differ, torch's own check runs as usual."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return
    try:
        from torch._inductor import config, cpu_vec_isa

        if config.cpp.vec_isa_ok is not None or "amx_tile" in cpu_vec_isa.x86_isa_checker():
            return
        with config.patch({"cpp.vec_isa_ok": True}):
            cpu_vec_isa.valid_vec_isa_list()  # cached for the process
    except (ImportError, AttributeError):
        return


def signround_block(cfg: SignRound, block, layers: LayerMap, data: BlockData, seed: int = 0) -> BlockResult:
    t0 = time.perf_counter()
    _keep_freed_buffers()
    buckets = _buckets(cfg, layers, _prescale(cfg, layers, data.importance))
    device = buckets[0].w.device
    params = [p for b in buckets for p in b.params(cfg.tune_minmax)]
    dtype = next(iter(layers.values()))[0].weight.dtype
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(len(data.inputs), cfg.batch_size, gen)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    # With amp the block runs under autocast: its matmuls and attention in bf16 (the quantized
    # weights come out of the quantize-dequantize in bf16), while the residual stream, the norms and
    # the loss stay in the inputs' dtype, as in auto-round's amp. A block cast to bf16 outright
    # rounds the residual sums too: 0.002 perplexity on pycode-7m W4 at iters 50 (BENCHMARKS.md).
    amp = cfg.tuning_dtype(device)
    weight_dtype = amp if amp is not None else dtype
    inputs = data.inputs.to(dtype)
    tokens = min(cfg.batch_size, len(inputs)) * inputs[0].numel() // inputs.shape[-1]
    mode = _compile_mode(cfg, device, amp, cfg.iters * tokens * sum(b.w.numel() for b in buckets))
    if mode == "step":
        _skip_isa_probe()
    step = _compiled_step() if mode == "step" else _step_loss
    qdq = _reference_qdq if mode == "step" else _compiled_qdq() if mode == "qdq" else fake_quantize_tuned

    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext

    def loss_and_backward(idx) -> float:
        with autocast():
            loss = step(block, buckets, qdq, weight_dtype, data.kwargs, inputs[idx], data.targets[idx])
        loss.backward()
        return loss.item()

    keep_best = cfg.keep == "best"
    best_loss, best = float("inf"), [p.detach().clone() for p in params] if keep_best else None
    first_loss, losses = None, []
    with attention_context(amp, device):
        try:
            for t in range(cfg.iters):
                idx = next(batches)
                try:
                    value = loss_and_backward(idx)
                except Exception as e:  # a compile that fails (no C++ compiler, ...) fails at once
                    if t > 0 or mode is None:
                        raise
                    _compile_failed.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
                    warnings.warn(f"lowbit: torch.compile failed, tuning eager instead ({_compile_failed[0]})")
                    mode, step, qdq = None, _step_loss, fake_quantize_tuned
                    for p in params:
                        p.grad = None
                    value = loss_and_backward(idx)
                if first_loss is None:
                    first_loss = value
                losses.append(value)
                if value < best_loss:  # the parameters this loss was computed with (not yet stepped)
                    best_loss = value
                    if keep_best:
                        for kept, p in zip(best, params):
                            kept.copy_(p.detach())
                for b in buckets:
                    b.step(1 - t / cfg.iters, cfg.tune_minmax, cfg.minmax_max)
                for p in params:
                    p.grad = None
        finally:
            for p in frozen:
                p.requires_grad_(True)
    if keep_best:
        with torch.no_grad():
            for p, q in zip(params, best):
                p.copy_(q)
    last_pass = min(len(losses), max(1, len(inputs) // min(cfg.batch_size, len(inputs))))
    weights = {}
    for b in buckets:
        weights.update(b.quantized(layers))
    seconds = time.perf_counter() - t0
    stats = {
        "loss_first": first_loss,
        "loss_best": best_loss if cfg.iters else None,
        # the mean over the last pass through the calibration set: about the final parameters' loss
        "loss_last": sum(losses[-last_pass:]) / last_pass if losses else None,
        "kept": cfg.keep,
        "lr": sorted({cfg.layer_lr(s.bits) for _, s in layers.values()}),
        "iters": cfg.iters,
        "amp": str(amp).removeprefix("torch.") if amp is not None else None,
        "compiled": mode,
        "seconds": seconds,
        "seconds_per_iter": seconds / cfg.iters if cfg.iters else 0.0,
    }
    return BlockResult(weights, stats)
