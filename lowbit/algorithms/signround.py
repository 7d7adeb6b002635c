"""SignRound: tune each weight's rounding and each group's range by signed gradient descent so the
quantized block reproduces the full-precision block's outputs.

Per weight a rounding offset V in [-0.5, 0.5] (init 0) added before rounding; per group factors on
the min and max (init 1, kept in [0, 1]). Each step: p -= lr * sign(grad), lr decaying linearly to
0 (its start per layer: `SignRound.layer_lr`). The final parameters are kept (or, as in
auto-round, those of the lowest minibatch loss seen). The loss is each output token's squared
error relative to that token's size (`loss`), so attention-sink tokens do not drown out the rest.

All Linear layers of a block that share a data type, group size and symmetry are tuned as one
[rows, group] tensor, so one iteration is one quantize-dequantize call per such bucket plus the
block's forward and backward: no Python loop over layers or groups.
"""
from __future__ import annotations

import functools
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.func import functional_call

from lowbit.algorithms.base import BlockData, BlockResult, LayerMap, token_scales
from lowbit.algorithms.cpu_attention import attention_context
from lowbit.algorithms.prescale import search_range_factors, weight_importance
from lowbit.errors import LowbitError
from lowbit.host import before_compile
from lowbit.progress import Progress
from lowbit.model import block_output
from lowbit.qdq import from_groups, get_dtype, n_groups, to_groups
from lowbit.quantized import quantize_weight


@dataclass(frozen=True)
class SignRound:
    iters: int = 200
    # The step's start (it decays linearly to 0); None: per layer, `layer_lr` below.
    lr: float | None = None
    batch_size: int = 8
    tune_minmax: bool = True  # learn the per-group min/max factors, not only V (not on MX: qdq/mx.py)
    # Start from an activation-weighted search of each group's range (SignRoundV2); None: for
    # layers of 3 bits or fewer, where it helps (BENCHMARKS.md).
    prescale: bool | None = None
    minmax_max: float = 1.0  # upper bound of the min/max factors (1: the range only shrinks)
    # Which parameters the block keeps: "last", those the learning rate has decayed onto; or
    # "best", those of the lowest loss on one minibatch (auto-round's rule). Near the end a
    # minibatch's loss depends more on which windows it holds than on the parameters, so "best"
    # mostly picks an easy minibatch (BENCHMARKS.md).
    keep: str = "last"
    # torch.compile the tuning step (quantize-dequantize, the block's forward and backward, the
    # loss) into fused kernels. None: on a CPU where its compile costs less than it saves (a block's
    # work from COMPILE_MIN_WORK, and in float32 its weights from FP32_COMPILE_MIN_WEIGHTS too); on
    # CUDA only the quantize-dequantize is compiled, as measured there
    # (bench/gpu.py). Off, eager, with the data type's fast fake-quantize. If compiling fails (no
    # C++ compiler), tuning goes on eager for the rest of the run, with a warning.
    compile: bool | None = None
    # Run the block under bfloat16 autocast during tuning (matmuls and attention in bf16; the
    # residual stream, norms, tuned parameters and loss in float32); None: on where bf16 matmuls
    # are fast (CUDA; CPUs with AVX512-BF16/AMX). On a CPU its attention then runs as plain bf16
    # matmuls (cpu_attention.py).
    amp: bool | None = None
    # Leave the largest share of squared output errors out of the block's loss (auto-round does so
    # with 4-bit inputs, 0.001): a few outlier elements, which no rounding fixes, otherwise steer
    # every sign step. 0: the plain mean.
    drop: float = 0.0
    # What the block's outputs are tuned to match: "model", the full-precision model's outputs at
    # this block (its float outputs on float inputs), so a block also learns to undo the error it
    # inherits through the residual stream; or "block", the float block's outputs on the same
    # (quantized) inputs, the block's own error only, as GPTQ measures it. None: "model" (better on
    # every model and scheme measured, BENCHMARKS.md).
    target: str | None = None
    # Each output token's squared error as a share of that token's mean square in the targets
    # ("relative"), or as it is ("mse", auto-round's loss). Most LLMs grow a few "attention sink"
    # tokens (a window's first) whose hidden states are 10^4 times larger than the rest: in plain
    # MSE their errors are nearly all of the loss, though the next block sees every token through
    # an RMSNorm, i.e. divided by its size (BENCHMARKS.md: better on SmolLM2-135M; on pycode-7m,
    # which has no sinks, even at 4 bits and a little worse at 2).
    loss: str = "relative"

    name: ClassVar[str] = "signround"
    needs_data: ClassVar[bool] = True

    def __post_init__(self):
        if self.iters < 0:
            raise LowbitError(f"iters must be >= 0, got {self.iters}")
        if self.batch_size < 1:
            raise LowbitError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and self.lr <= 0:
            raise LowbitError(f"lr must be positive, got {self.lr}")
        if self.keep not in ("last", "best"):
            raise LowbitError(f"keep must be 'last' or 'best', got {self.keep!r}")
        if self.target not in (None, "model", "block"):
            raise LowbitError(f"target must be 'model' or 'block', got {self.target!r}")
        if self.loss not in ("mse", "relative"):
            raise LowbitError(f"loss must be 'mse' or 'relative', got {self.loss!r}")
        if not 0 <= self.drop < 0.5:
            raise LowbitError(f"drop must be in [0, 0.5), got {self.drop}")

    @property
    def block_batch_size(self) -> int:
        return self.batch_size

    def layer_lr(self, bits: int) -> float:
        """The learning rate of a layer's parameters: `lr`, or by default 1 / iters, which lets each
        rounding offset travel 0.5 in all. For layers of 3 bits or more at most 1 / sqrt(200 *
        iters): a signed step moves every parameter each iteration, so the random part of its walk
        grows as lr * sqrt(iters); with 1 / iters it is twice as large at 50 iterations as at 200.
        At 3-4 bits the rounding needs small corrections and that noise costs more than the shorter
        reach; at 2 bits the reach matters more and 1 / iters stays (BENCHMARKS.md). From 200
        iterations up both are 1 / iters."""
        if self.lr is not None:
            return self.lr
        iters = max(self.iters, 1)
        return 1.0 / iters if bits <= 2 else min(1.0 / iters, (200 * iters) ** -0.5)

    def uses_prescale(self, bits: int) -> bool:
        return self.prescale if self.prescale is not None else bits <= 3

    def statistics(self, schemes) -> tuple[str, ...]:
        return ("input_energy",) if any(self.uses_prescale(s.bits) for s in schemes) else ()

    def settings(self, schemes, device) -> dict:
        bits = sorted({s.bits for s in schemes})
        per_bits = lambda f: f(bits[0]) if len(bits) == 1 else {f"{b}-bit": f(b) for b in bits}  # noqa: E731
        amp = self.tuning_dtype(device) is not None
        compile_ = ("off" if self.compile is False else "on" if self.compile
                    else "quantize-dequantize" if device.type == "cuda"
                    else "the step, where a block's work is large enough" if amp
                    else "the step, where a block's weights and work are large enough")
        return {"iters": self.iters, "lr": per_bits(lambda b: round(self.layer_lr(b), 6)), "batch_size": self.batch_size,
                "tune_minmax": self.tune_minmax, "minmax_max": self.minmax_max,
                "prescale": per_bits(self.uses_prescale), "bf16": amp, "compile": compile_, "keep": self.keep,
                "drop": self.drop, "target": self.target or "model", "loss": self.loss}

    def tuning_dtype(self, device: torch.device) -> torch.dtype | None:
        """bfloat16 where the block runs under autocast to it while tuned (see `amp`), else None.
        The pipeline computes the block's targets and outputs under the same autocast."""
        if self.amp is not None:
            return torch.bfloat16 if self.amp else None
        return torch.bfloat16 if _fast_bf16(device.type) else None

    def quantize_block(self, block, layers: LayerMap, data: BlockData, seed: int = 0,
                       run: dict | None = None) -> BlockResult:
        return signround_block(self, block, layers, data, seed, run if run is not None else {})


class _Bucket:
    """The layers of one (data type, group size, symmetry), their groups stacked as rows of one
    tensor, so one iteration is one fake-quantize call per bucket."""

    def __init__(self, data_type: str, group_size: int, sym: bool, items, init_factors: dict, layer_lr):
        self.dtype = get_dtype(data_type)
        self.group_size, self.sym = group_size, sym
        self.slices = []  # (name, start row, end row, out_features, in_features)
        rows, ranges, bits, factors, lrs, start = [], [], [], [], [], 0
        for name, lin, scheme in items:
            out_f, in_f = lin.weight.shape
            wg = to_groups(lin.weight.detach().float(), group_size)
            rows.append(wg.reshape(-1, wg.shape[-1]))
            n = rows[-1].shape[0]
            if not self.dtype.range_is_local:  # from the layer's [out, n_groups, g] (fp8_block: tiles)
                ranges.append(tuple(r.reshape(n, 1) for r in self.dtype.init_range(wg)))
            bits.append(torch.full((n, 1), float(scheme.bits)))
            lrs.append((n, layer_lr(scheme.bits)))
            f = init_factors.get(name)
            ones = torch.ones(n, 1, device=wg.device)
            factors.append((f[0].reshape(n, 1), f[1].reshape(n, 1)) if f is not None else (ones, ones))
            self.slices.append((name, start, start + n, out_f, in_f))
            start += n
        self.w = torch.cat(rows)
        # fixed: only the factors on it are tuned. Per layer where a type's range is not local.
        self.range = self.dtype.init_range(self.w) if self.dtype.range_is_local else tuple(
            torch.cat(parts) for parts in zip(*ranges))
        self.bits = torch.cat(bits).to(self.w.device)
        # the learning rate: one number when all rows share it, else a column of one per row
        self.lr = lrs[0][1] if len({lr for _, lr in lrs}) == 1 else torch.cat(
            [torch.full((n, 1), lr) for n, lr in lrs]).to(self.w.device)
        self.v = torch.zeros_like(self.w, requires_grad=True)
        self.mn = torch.cat([f[0] for f in factors]).requires_grad_(self.dtype.range_tuned)
        self.mx = torch.cat([f[1] for f in factors]).requires_grad_(self.dtype.range_tuned)

    def params(self, tune_minmax: bool):
        return [self.v, self.mn, self.mx] if tune_minmax and self.dtype.range_tuned else [self.v]

    @torch.no_grad()
    def step(self, decay: float, tune_minmax: bool, minmax_max: float) -> None:
        """The signed step, in place: p -= lr * decay * sign(grad), then back into its range."""
        bounded = [(self.v, -0.5, 0.5)]
        if tune_minmax and self.dtype.range_tuned:
            bounded += [(self.mn, 0, minmax_max), (self.mx, 0, minmax_max)]
        for p, lo, hi in bounded:
            g = p.grad.sign_()
            if isinstance(self.lr, torch.Tensor):
                p.add_(g.mul_(self.lr), alpha=-decay)
            else:
                p.add_(g, alpha=-self.lr * decay)
            p.clamp_(lo, hi)

    def weights(self, dtype, qdq) -> dict[str, torch.Tensor]:
        wq = qdq(self.dtype, self.w, self.bits, self.sym, self.v, self.mn, self.mx, self.range, dtype)
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
            out[name] = quantize_weight(lin.weight, s, v, self.mn.detach()[a:b].view(out_f, ng),
                                        self.mx.detach()[a:b].view(out_f, ng))
        return out


def _buckets(cfg: SignRound, layers: LayerMap, init_factors: dict) -> list[_Bucket]:
    by_key: dict = {}
    for name, (lin, s) in layers.items():
        # per channel (-1), a row's group is the layer's whole width: one bucket per width
        width = lin.in_features if s.group_size == -1 else s.group_size
        by_key.setdefault((s.dtype, s.group_size, s.sym, width), []).append((name, lin, s))
    return [_Bucket(d, g, sym, items, init_factors, cfg.layer_lr) for (d, g, sym, _), items in by_key.items()]


def _prescale(cfg: SignRound, layers: LayerMap, importance: dict | None) -> dict:
    """Initial (min, max) factors per layer, [out, n_groups] each, from the weighted range search:
    where prescale is on, and unless it is switched off on types with a grid of their own (MX:
    each block's exponent, a search as cheap as RTN's), weighted as RTN weights it where no
    inputs were seen."""
    out = {}
    for name, (lin, s) in layers.items():
        if cfg.uses_prescale(s.bits) or (cfg.prescale is not False and s.data_type.range_grid is not None):
            imp = (importance or {}).get(name)
            out[name] = search_range_factors(lin.weight, s, weight_importance(lin.weight) if imp is None else imp)
    return out


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


# The fake-quantize of a bucket, three ways: the data type's fast version with its backward written
# out (eager), its plain formula (for torch.compile to fuse; the range is cheap to recompute in a
# kernel), and that formula compiled alone (CUDA).
def _tuned_qdq(data_type, w, bits, sym, v, mn, mx, wrange, dtype):
    return data_type.fake_quantize_tuned(w, bits, sym, v, mn, mx, wrange, dtype)


def _reference_qdq(data_type, w, bits, sym, v, mn, mx, wrange, dtype):
    return data_type.fake_quantize(w, bits, sym, v, mn, mx, None if data_type.range_is_local else wrange).to(dtype)


@functools.cache
def _compiled_qdq():
    return torch.compile(_reference_qdq, dynamic=False)


def _step_loss(block, buckets, qdq, weight_dtype, kwargs, x, target, drop=0.0, scales=None):
    """The tuning loss of one minibatch: the block with its quantize-dequantized weights against
    the full-precision targets (the largest `drop` share of squared errors left out; with
    `scales`, each token's outputs and target multiplied by its own, `token_scales`). Everything
    it needs comes in as arguments, so one compiled version serves every block of a model.
    (Autocast, if any, is entered by the caller: inside, it would keep torch from caching the
    compiled backward between runs.)"""
    w = {}
    for b in buckets:
        w.update(b.weights(weight_dtype, qdq))
    out, target = block_output(functional_call(block, w, (x,), kwargs)).float(), target.float()
    if scales is not None:  # scaling both keeps torch's fused mse_loss: fewer passes than dividing the errors
        out, target = out * scales, target * scales
    if not drop:
        return F.mse_loss(out, target)
    err = (out - target).pow(2).flatten()
    k = int(err.numel() * drop)
    return (err.sum() - err.topk(k).values.sum()) / (err.numel() - k)


@functools.cache
def _compiled_step():
    return torch.compile(_step_loss, dynamic=False)


# A block's tuning work (iterations x tokens per step x its tuned weights) from which the whole
# step is compiled by default on a CPU under bf16 autocast: from there a compile with a warm cache
# (torch's /tmp/torchinductor_$USER) costs less than the time it saves (BENCHMARKS.md). pycode-7m
# at 200 iterations is over it, at 50 under; any real LLM is far over.
COMPILE_MIN_WORK = 1.5e11
# In float32 (CPUs without fast bf16) the compiled step saves little where a block is small (end
# to end even: pycode-7m at 200 iterations, SmolLM2-135M's 3.5 M weights a block at 50) and a third
# of each iteration at a 1B model's 61 M (the eager quantize-dequantize's passes over tensors that
# size): from this many tuned weights a block (BENCHMARKS.md).
FP32_COMPILE_MIN_WEIGHTS = 2e7


def _compile_mode(cfg: SignRound, device: torch.device, amp, work: float, weights: int, run: dict) -> str | None:
    """'step' (the whole tuning step compiled), 'qdq' (the quantize-dequantize only) or None.
    work: the block's (iters x tokens per step x weights); weights: its tuned weights."""
    if cfg.compile is False or run.get("compile_failed"):
        return None
    if cfg.compile:
        return "step"
    if device.type == "cuda":
        return "qdq"
    big = work >= COMPILE_MIN_WORK and (amp is not None or weights >= FP32_COMPILE_MIN_WEIGHTS)
    return "step" if big else None


class _Tuner:
    """One block's tuning loop: the minibatches, the step (eager or compiled) and the losses."""

    def __init__(self, cfg: SignRound, block, buckets, data: BlockData, dtype, seed: int, run: dict):
        self.cfg, self.block, self.buckets, self.data, self.run = cfg, block, buckets, data, run
        self.device = buckets[0].w.device
        # With amp the block runs under autocast: its matmuls and attention in bf16 (the quantized
        # weights come out of the quantize-dequantize in bf16), while the residual stream, the norms
        # and the loss stay in the inputs' dtype, as in auto-round's amp. A block cast to bf16
        # outright rounds the residual sums too, which cost perplexity (BENCHMARKS.md).
        self.amp = cfg.tuning_dtype(self.device)
        self.weight_dtype = self.amp if self.amp is not None else dtype
        self.inputs = data.inputs.to(dtype)
        # once per block, not every step
        self.scales = token_scales(data.targets) if cfg.loss == "relative" else None
        self.batches = _batches(len(self.inputs), cfg.batch_size, torch.Generator().manual_seed(seed))
        tokens = min(cfg.batch_size, len(self.inputs)) * self.inputs[0].numel() // self.inputs.shape[-1]
        weights = sum(b.w.numel() for b in buckets)
        self.set_mode(_compile_mode(cfg, self.device, self.amp, cfg.iters * tokens * weights, weights, run))

    def set_mode(self, mode: str | None) -> None:
        self.mode = mode
        if mode == "step" and self.device.type == "cpu":
            before_compile()
        self.step = _compiled_step() if mode == "step" else _step_loss
        self.qdq = _reference_qdq if mode == "step" else _compiled_qdq() if mode == "qdq" else _tuned_qdq

    def loss_and_backward(self, idx) -> float:
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        with autocast:
            loss = self.step(self.block, self.buckets, self.qdq, self.weight_dtype, self.data.kwargs,
                             self.inputs[idx], self.data.targets[idx], self.cfg.drop,
                             None if self.scales is None else self.scales[idx])
        loss.backward()
        return loss.item()

    def first_step(self, idx, params) -> float:
        """The first step, where a compile that fails (no C++ compiler, ...) fails: the run goes
        on eager, and later blocks of the run do not try again."""
        try:
            return self.loss_and_backward(idx)
        except Exception as e:
            if self.mode is None:
                raise
            text = str(e).strip()
            self.run["compile_failed"] = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
            warnings.warn(f"lowbit: torch.compile failed, tuning eager instead ({self.run['compile_failed']})")
            self.set_mode(None)
            for p in params:
                p.grad = None
            return self.loss_and_backward(idx)

    def tune(self, params) -> tuple[list[float], float]:
        """Run the iterations; returns the losses and the lowest one. With keep="best" the
        parameters of the lowest minibatch loss are put back at the end."""
        cfg = self.cfg
        keep_best = cfg.keep == "best"
        best_loss, best = float("inf"), [p.detach().clone() for p in params] if keep_best else None
        losses = []
        label = self.run.get("progress")  # set by the pipeline when it shows progress
        with Progress(f"{label}: tuning", total=cfg.iters, enabled=label is not None, unit="iters",
                      announce=False, first=5.0, every=30.0) as bar:
            for t in range(cfg.iters):
                idx = next(self.batches)
                losses.append(self.first_step(idx, params) if t == 0 else self.loss_and_backward(idx))
                if losses[-1] < best_loss:  # the parameters this loss was computed with (not yet stepped)
                    best_loss = losses[-1]
                    if keep_best:
                        for kept, p in zip(best, params):
                            kept.copy_(p.detach())
                self.signed_step(t, params)
                bar.update()
        if keep_best:
            with torch.no_grad():
                for p, q in zip(params, best):
                    p.copy_(q)
        return losses, best_loss

    def signed_step(self, t: int, params) -> None:
        """Iteration t's signed-gradient step (the learning rate decays linearly to 0)."""
        for b in self.buckets:
            b.step(1 - t / self.cfg.iters, self.cfg.tune_minmax, self.cfg.minmax_max)
        for p in params:
            p.grad = None


def signround_block(cfg: SignRound, block, layers: LayerMap, data: BlockData, seed: int = 0,
                    run: dict | None = None) -> BlockResult:
    t0 = time.perf_counter()
    init = _prescale(cfg, layers, data.stats.get("input_energy"))
    buckets = _buckets(cfg, layers, init)
    params = [p for b in buckets for p in b.params(cfg.tune_minmax)]
    dtype = next(iter(layers.values()))[0].weight.dtype
    tuner = _Tuner(cfg, block, buckets, data, dtype, seed, run if run is not None else {})
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with attention_context(tuner.amp, tuner.device, block):
            losses, best_loss = tuner.tune(params)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    weights = {}
    for b in buckets:
        weights.update(b.quantized(layers))
    seconds = time.perf_counter() - t0
    last_pass = min(len(losses), max(1, len(tuner.inputs) // min(cfg.batch_size, len(tuner.inputs))))
    stats = {
        "loss_first": losses[0] if losses else None,
        "loss_best": best_loss if cfg.iters else None,
        # the mean over the last pass through the calibration set: about the final parameters' loss
        "loss_last": sum(losses[-last_pass:]) / last_pass if losses else None,
        "kept": cfg.keep,
        "loss": cfg.loss,
        "lr": sorted({cfg.layer_lr(s.bits) for _, s in layers.values()}),
        "iters": cfg.iters,
        "amp": str(tuner.amp).removeprefix("torch.") if tuner.amp is not None else None,
        "compiled": tuner.mode,
        "seconds": seconds,
        "seconds_per_iter": seconds / cfg.iters if cfg.iters else 0.0,
    }
    start = None
    if cfg.iters:
        start = {name: quantize_weight(lin.weight, s, None, *init.get(name, (None, None)))
                 for name, (lin, s) in layers.items()}
    return BlockResult(weights, stats, start)
