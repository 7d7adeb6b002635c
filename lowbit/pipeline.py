"""The loop over blocks: capture block 0's inputs, then for each block compute its full-precision
outputs (the targets), quantize it with the algorithm, write the weights, and feed its quantized
outputs to the next block. Only one block's working set is on the device at a time.

    run = prepare(model, scheme, algorithm, dataset)    # load, schemes per layer, block 0's inputs
    for i in range(len(run.blocks)):
        quantize_block(run, i)                          # one block, its weights written in place
    result = finish(run)

`quantize` does exactly that, with progress lines and an optional per-block hook.
"""
from __future__ import annotations

import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.version import __version__
from lowbit.activations import INPUT_SCALE, input_scales, inputs_quantized, quantize_model_inputs
from lowbit.algorithms import BlockData, get_algorithm
from lowbit.algorithms.base import Algorithm, squared_errors
from lowbit.algorithms.cpu_attention import attention_context
from lowbit.algorithms.prescale import search_range_factors
from lowbit.mixes import expand_mix, mix_name
from lowbit.algorithms.stats import COLLECTORS
from lowbit.calib import calibration_windows, windows_hash
from lowbit.errors import LowbitError
from lowbit.experts import split_experts
from lowbit.model import (
    blocks_detached,
    capture_block_inputs,
    check_finite,
    find_blocks,
    find_linears,
    find_lm_head,
    load_model,
    run_block,
    weight_params,
)
from lowbit.progress import Progress
from lowbit.qdq.act import get_activation
from lowbit.quantized import QuantizedWeight, QuantizeResult, quantize_weight
from lowbit.schemes import Scheme, as_scheme, get_scheme

# An expert that sees fewer calibration tokens than this keeps the weights tuning started from
# (the activation-weighted range search, or round to nearest): too little data to tune on.
MIN_EXPERT_TOKENS = 32
_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")

# Named settings bundles: (algorithm settings, pipeline settings).
PRESETS = {
    "default": ({"iters": 200}, {"nsamples": 128}),
    # the windows of 50 steps of 8, in 100 smaller steps: the same time, better at 2 bits (BENCHMARKS.md)
    "light": ({"iters": 100, "batch_size": 4}, {"nsamples": 128}),
    "best": ({"iters": 1000}, {"nsamples": 512}),
}


@dataclass
class Run:
    """One quantize call between blocks: what `quantize_block` needs and what it leaves for the
    next block."""

    model: nn.Module
    tokenizer: object
    scheme: Scheme  # the default; layers may have others (schemes)
    algo: Algorithm
    device: torch.device
    seed: int
    blocks_name: str
    blocks: nn.ModuleList
    block_layers: list[dict[str, nn.Linear]]
    schemes: dict[str, Scheme]  # full layer name -> scheme
    report: dict
    outside: dict[str, Scheme] = field(default_factory=dict)  # modules outside the blocks, rounded at the end
    q_in: torch.Tensor | None = None  # the next block's inputs (outputs of the quantized blocks)
    fp_in: torch.Tensor | None = None  # the next block's full-precision inputs
    kwargs: list[dict] | None = None  # each block's keyword arguments
    fwd_dtype: torch.dtype | None = None  # the autocast the algorithm tunes in
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # a streamed run drops them once written
    done: dict[str, Scheme] = field(default_factory=dict)  # every layer quantized so far
    dtype: torch.dtype | None = None  # the original's float dtype (what writers store floats in)
    needs_data: bool = False  # calibration windows are run through the blocks (needs_calibration)
    progress: bool = False  # show progress (run_blocks' progress)
    scratch: dict = field(default_factory=dict)  # the algorithm's, kept between blocks (Algorithm.quantize_block)
    t_start: float = field(default_factory=time.perf_counter)


def run_settings(algo: Algorithm, schemes, device: torch.device) -> dict:
    """What a run does, every default resolved: the algorithm's settings for these schemes, the
    device and the threads torch computes with."""
    return {**algo.settings(list(schemes), device), "device": str(device), "threads": torch.get_num_threads()}


def calibrated_inputs(schemes) -> list[str]:
    """The names of the schemes whose input type takes a calibrated scale (NVFP4's global scale)."""
    return sorted({s.name for s in schemes if s.act is not None and get_activation(s.act).calibrated})


def needs_calibration(algo: Algorithm, schemes) -> bool:
    """Whether a run needs calibration data: for the algorithm, or for calibrated input scales."""
    return algo.needs_data or bool(calibrated_inputs(schemes))


def layer_schemes(names: list[str], default: Scheme, overrides: dict | None) -> dict[str, Scheme]:
    """Scheme per layer: an override whose key equals the name or fully matches it as a regex."""
    out = {}
    overrides = overrides or {}
    for name in names:
        if name in overrides:  # exact names first: a plan names thousands of layers
            out[name] = as_scheme(overrides[name])
            continue
        out[name] = next((as_scheme(s) for p, s in overrides.items() if re.fullmatch(p, name)), default)
    return out


def fit_schemes(schemes: dict[str, Scheme], in_features: dict[str, int]) -> dict[str, Scheme]:
    """Each layer's scheme, or the stand-in its data type names for a layer it cannot store
    (DataType.fallback: llama.cpp's k-quants need rows of whole 256-weight super-blocks), with one
    warning that lists what was replaced."""
    out, changed = {}, {}
    for name, s in schemes.items():
        other = s.data_type.fallback(in_features[name])
        out[name] = s if other is None else get_scheme(f"gguf:{other}" + ("" if s.act is None else "-q8"))
        if other is not None:
            changed.setdefault((s.name, out[name].name, in_features[name]), []).append(name)
    for (a, b, n), names in changed.items():
        warnings.warn(f"lowbit: {len(names)} layers with {n} inputs cannot be {a} (not whole blocks): {b} instead "
                      f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})", stacklevel=3)
    return out


def quantize(
    model,
    scheme: Scheme | str = "W4A16",
    algorithm="signround",
    dataset=None,
    *,
    tokenizer=None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    overrides: dict | None = None,
    outside: dict | None = None,
    lm_head: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_block: Callable[[int, dict[str, QuantizedWeight], dict], None] | None = None,
) -> QuantizeResult:
    """Quantize the Linear layers of every transformer block of `model` (a module or a local
    folder). `scheme` is a Scheme or a name: a scheme's, or one of llama.cpp's mixes ("Q4_K_M",
    lowbit/mixes.py), which sets every layer's type and the embedding's and output's.
    `algorithm` is a name or a config (e.g. SignRound(iters=50)); `dataset` a file path,
    a datasets name or token windows [n, seqlen]; `overrides` maps layer names or regexes to
    schemes; `outside` maps modules outside the blocks (the embedding, lm_head) to schemes they
    are rounded to (quantize_outside). The model is changed in place (fake-quantized weights) and
    returned with the codes. `on_block(index, weights, stats)` is called after each block, its
    weights already in place."""
    run = prepare(model, scheme, algorithm, dataset, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen,
                  seed=seed, overrides=overrides, outside=outside, device=device, progress=progress)
    run_blocks(run, progress=progress, on_block=on_block)
    return finish(run, lm_head)


def run_blocks(run: Run, start: int = 0, *, progress: bool = True,
               before_block: Callable[[int], None] | None = None,
               on_block: Callable[[int, dict[str, QuantizedWeight], dict], None] | None = None) -> None:
    """quantize_block for blocks start.. in order, with a progress line per block;
    before_block(i) runs before block i (a streamed run loads its weights there)."""
    n = len(run.blocks)
    # The bar only on a terminal; the per-block lines always (logs and CI read them).
    bar = tqdm(range(start, n), desc="blocks", initial=start, total=n,
               disable=not (progress and sys.stderr.isatty()), file=sys.stderr)
    run.progress = progress
    for i in bar:
        if before_block is not None:
            before_block(i)
        weights, stats = quantize_block(run, i)
        if progress:
            _show_progress(bar, stats, n)
        if on_block is not None:
            on_block(i, weights, stats)
    bar.close()


def prepare(model, scheme: Scheme | str = "W4A16", algorithm="signround", dataset=None, *, tokenizer=None,
            nsamples: int = 128, seqlen: int = 2048, seed: int = 0, overrides: dict | None = None,
            outside: dict | None = None, device: str | torch.device | None = None, progress: bool = False) -> Run:
    """Everything before the first block: the model, each layer's scheme and, for an algorithm
    that needs data, the calibration windows and block 0's inputs."""
    mix = mix_name(scheme) if isinstance(scheme, str) else None
    if isinstance(scheme, str) and mix is None:
        scheme = get_scheme(scheme)
    algo = get_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model, tokenizer = load_model(str(model))
    else:
        split_experts(model)
        check_finite(model)
    dtype = getattr(model, "source_dtype", None) or next(model.parameters()).dtype
    device = torch.device(device) if device is not None else torch.device("cpu")
    blocks_name, blocks = find_blocks(model)
    block_layers = [find_linears(b) for b in blocks]
    names = [f"{blocks_name}.{i}.{n}" for i, ls in enumerate(block_layers) for n in ls]
    if mix is not None:  # llama.cpp's mix: a scheme per layer, and the embedding's and output's
        m = expand_mix(mix, model, names, blocks_name)
        scheme, overrides, outside = m.scheme, {**m.layers, **(overrides or {})}, {**m.outside, **(outside or {})}
    outside = {n: as_scheme(s) for n, s in (outside or {}).items()}
    report = {
        "lowbit_version": __version__,
        "scheme": scheme.to_dict() | {"name": scheme.name},
        "algorithm": {"name": algo.name, **asdict(algo)},
        "blocks": [],
        **({"recipe": mix} if mix is not None else {}),
    }
    schemes = fit_schemes(layer_schemes(names, scheme, overrides),
                          {f"{blocks_name}.{i}.{n}": lin.in_features for i, ls in enumerate(block_layers) for n, lin in ls.items()})
    run = Run(model, tokenizer, scheme, algo, device, seed, blocks_name, blocks, block_layers, schemes, report,
              dtype=dtype, outside=_fit_outside(model, outside))
    _warn_skipped(run)
    run.needs_data = needs_calibration(algo, run.schemes.values())
    report["settings"] = run_settings(algo, run.schemes.values(), device)
    if run.needs_data:
        _capture(run, dataset, nsamples, seqlen, progress)
    # The full-precision targets and the next block's inputs are computed under the autocast the
    # algorithm tunes in (bf16 where it is fast): the tuning itself sees no more precision than that.
    run.fwd_dtype = algo.tuning_dtype(device)
    return run


def _capture(run: Run, dataset, nsamples: int, seqlen: int, progress: bool = False) -> None:
    """The calibration windows and block 0's inputs (and every block's keyword arguments)."""
    if dataset is None:
        if not run.algo.needs_data:
            raise LowbitError("calibration data (dataset) is needed to calibrate the input scales of "
                              + ", ".join(calibrated_inputs(run.schemes.values())))
        raise LowbitError(f"algorithm {run.algo.name!r} needs calibration data (dataset)")
    if run.tokenizer is None and not isinstance(dataset, torch.Tensor):
        raise LowbitError("a tokenizer is needed to tokenize the calibration text")
    windows = calibration_windows(run.tokenizer, dataset, nsamples, seqlen, run.seed)
    run.report["calibration"] = {
        "source": dataset if isinstance(dataset, str) else "token windows",
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "seed": run.seed,
        "sha256": windows_hash(windows),
    }
    t0 = time.perf_counter()
    with blocks_detached(run.model, run.blocks_name):
        run.model.to(run.device)
    with Progress(f"capturing block 1's inputs ({len(windows)} windows)", enabled=progress):
        run.q_in, run.kwargs = capture_block_inputs(run.model, run.blocks, windows, run.device)
    run.fp_in = run.q_in
    run.report["calibration"]["capture_seconds"] = time.perf_counter() - t0


def quantize_block(run: Run, i: int) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize block i (blocks go in order), write its fake-quantized weights into the model and
    compute the next block's inputs. Returns the block's weights and its stats line."""
    t0 = time.perf_counter()
    algo, block, device = run.algo, run.blocks[i], run.device
    home = next(block.parameters()).device
    block.to(device)
    layers = {n: (lin, run.schemes[f"{run.blocks_name}.{i}.{n}"]) for n, lin in run.block_layers[i].items()}
    batch = algo.block_batch_size
    data = targets = None
    experts = [n for n in layers if _EXPERT.search(n)]
    calibrated = {n: get_activation(s.act) for n, (_, s) in layers.items() if s.act and get_activation(s.act).calibrated}
    scales = {}
    if run.needs_data:
        wanted = set(algo.statistics([s for _, s in layers.values()])) | ({"tokens"} if experts else set())
        wanted |= {"input_amax"} if calibrated else set()
        collectors = {name: COLLECTORS[name](run.block_layers[i]) for name in sorted(wanted)}
        with attention_context(run.fwd_dtype, device, block):
            source = run.q_in if algo.target == "block" else run.fp_in
            targets = run_block(block, source, run.kwargs[i], batch, run.fwd_dtype)
        data = BlockData(run.q_in, run.kwargs[i], targets, {n: c.remove() for n, c in collectors.items()})
        # input scales from the full-precision inputs, as a deployed model's are calibrated
        amax = data.stats.get("input_amax", {})
        for n in calibrated:  # an expert routed no token: its siblings' largest input
            if n not in amax and any(m.rsplit(".", 1)[-1] == n.rsplit(".", 1)[-1] for m in amax):
                amax[n] = max(v for m, v in amax.items() if m.rsplit(".", 1)[-1] == n.rsplit(".", 1)[-1])
        scales = {n: act.calibrate(amax[n]) for n, act in calibrated.items() if n in amax}
    run.scratch["progress"] = f"block {i + 1}/{len(run.blocks)}" if run.progress else None
    # From here the block runs as quantized: its layers' inputs too, where the scheme says so.
    with inputs_quantized({n: (lin, s.act) for n, (lin, s) in layers.items()}, scales):
        result = algo.quantize_block(block, layers, data, run.seed + i, run.scratch)
        if experts and data is not None:
            _few_tokens(result, experts, data.stats["tokens"])
        with attention_context(run.fwd_dtype, device, block):
            weights, losses = _settle(run, i, layers, result, targets)
    weights = {n: q.replace(extras={**q.extras, INPUT_SCALE: scales[n]}) if n in scales else q
               for n, q in weights.items()}
    for n, q in weights.items():
        run.quantized[f"{run.blocks_name}.{i}.{n}"] = q
        run.done[f"{run.blocks_name}.{i}.{n}"] = q.scheme
    block.to(home)
    stats = {"index": i, **result.stats, **losses, "seconds": time.perf_counter() - t0}
    run.report["blocks"].append(stats)
    return weights, stats


def _few_tokens(result, experts: list[str], tokens: dict[str, int]) -> None:
    """Experts routed fewer than MIN_EXPERT_TOKENS calibration tokens keep their start weights;
    the block's stats name them (experts_few_tokens) with the count of tokens each saw."""
    few = {n: tokens.get(n, 0) for n in experts if tokens.get(n, 0) < MIN_EXPERT_TOKENS}
    result.stats["expert_tokens_min"] = min(tokens.get(n, 0) for n in experts)
    if few:
        result.stats["experts_few_tokens"] = few
        if result.start is not None:
            result.weights.update({n: result.start[n] for n in few})


def _settle(run: Run, i: int, layers, result, targets) -> tuple[dict[str, QuantizedWeight], dict]:
    """Write the block's weights into the model and compute the next block's inputs. Where the
    algorithm tuned from a start, the start is kept if the tuned weights end with a higher loss on
    all the calibration windows: a block never ends worse than where its tuning began.

    The tuned weights' outputs come first (the next block needs them anyway); the start's loss is
    then summed a batch at a time and stops as soon as it passes the tuned weights' total: the
    rest could not change the choice, and with tuning that helps it ends after a fraction of the
    windows.

    Stats: loss_calib, the kept weights' loss on every calibration window (the tuning loss, not one
    minibatch's); loss_start, the start's, which where it stopped early is a lower bound (its
    sum over the windows it ran, per element of all of them) and loss_start_windows says over how
    many."""
    stats = {"loss_calib": None}
    if not run.needs_data:
        _write(layers, result.weights)
        return result.weights, stats
    block, x, kwargs, batch, dtype = run.blocks[i], run.q_in, run.kwargs[i], run.algo.block_batch_size, run.fwd_dtype
    # the measure the algorithm tuned for, so the start is not kept for scoring better on another
    relative = result.stats.get("loss") == "relative"
    last = i + 1 == len(run.blocks)  # its outputs feed nothing
    weights, outputs = result.weights, None
    _write(layers, weights)
    if not last or result.start is not None:
        outputs = run_block(block, x, kwargs, batch, dtype)
        stats["loss_calib"] = _mse(outputs, targets, batch, relative)
    if result.start is not None:
        _write(layers, result.start)
        stats["loss_start"], stats["loss_start_windows"] = _loss(block, x, kwargs, batch, dtype, targets, relative,
                                                                 above=stats["loss_calib"])
        stats["kept_start"] = stats["loss_calib"] > stats["loss_start"]
        if stats["kept_start"]:
            weights, stats["loss_calib"] = result.start, stats["loss_start"]
            outputs = None if last else run_block(block, x, kwargs, batch, dtype)
        else:
            _write(layers, weights)
    if not last:  # with target "block" the float model's path is not needed: fp_in is q_in
        run.q_in, run.fp_in = outputs, outputs if run.algo.target == "block" else targets
    return weights, stats


@torch.no_grad()
def _write(layers, weights: dict[str, QuantizedWeight]) -> None:
    for n, (lin, _) in layers.items():
        lin.weight.copy_(weights[n].dequantize(lin.weight.dtype))


@torch.no_grad()
def _loss(block, x, kwargs, batch, dtype, targets, relative=False, above=float("inf")) -> tuple[float, int]:
    """The block's mean squared error on x against the targets (relative: per token, as
    `squared_errors`), a batch at a time, keeping no outputs (as _mse computes it from kept ones),
    and the number of windows it ran. It stops once the sum so far, per element of all the
    windows, exceeds `above`: the full mean can only be larger."""
    total, limit = 0.0, above * targets.numel()
    for j in range(0, len(x), batch):
        total += squared_errors(run_block(block, x[j : j + batch], kwargs, batch, dtype), targets[j : j + batch],
                                relative).sum().item()
        if total > limit:
            return total / targets.numel(), min(j + batch, len(x))
    return total / targets.numel(), len(x)


def finish(run: Run, lm_head: bool = False) -> QuantizeResult:
    """After the last block: lm_head if asked, and the report's summary of what was done."""
    if lm_head:
        head = _quantize_lm_head(run.model, run.scheme)
        run.quantized.update(head)
        run.done.update({n: q.scheme for n, q in head.items()})
    for name, scheme in run.outside.items():  # a streamed run did them as they were written
        if name not in run.done:
            weight = run.model.get_submodule(name).weight
            q = quantize_outside(weight, scheme)
            with torch.no_grad():
                weight.copy_(q.dequantize(weight.dtype))
            run.quantized[name] = q
            run.done[name] = scheme
    # the model computes the quantized function: inputs quantized where a scheme says so
    quantize_model_inputs(run.model, {n: s.act for n, s in run.done.items()}, input_scales(run.quantized))
    report = run.report
    report["layers"] = {n: s.to_dict() for n, s in run.done.items()}
    left = unquantized(run.model, run.done)
    report["unquantized"] = sorted(left)
    report["unquantized_share"] = sum(left.values()) / max(sum(p.numel() for p in weight_params(run.model).values()), 1)
    report["blocks_kept_start"] = [b["index"] for b in report["blocks"] if b.get("kept_start")]
    few = {f"{run.blocks_name}.{b['index']}.{n}": c for b in report["blocks"] for n, c in b.get("experts_few_tokens", {}).items()}
    if few:
        report["experts_few_tokens"] = few
    report["seconds"] = time.perf_counter() - run.t_start
    return QuantizeResult(run.model, run.tokenizer, run.quantized, report, run.dtype)


def unquantized(model: nn.Module, quantized: dict) -> dict[str, int]:
    """{parameter name: number of weights} of every weight left in full precision."""
    done = {n + ".weight" for n in quantized}
    return {n: p.numel() for n, p in weight_params(model).items() if n not in done}


def _warn_skipped(run: Run) -> None:
    """Say before the work starts which weights inside the blocks no algorithm will touch (weights
    that are not Linear layers: fused 3-D experts, routers), with their share of all weights."""
    linear = {f"{run.blocks_name}.{i}.{n}" for i, ls in enumerate(run.block_layers) for n in ls}
    params = weight_params(run.model)
    inside = {n: p.numel() for n, p in params.items()
              if n.startswith(run.blocks_name + ".") and n.rsplit(".", 1)[0] not in linear}
    run.report["skipped_in_blocks"] = sorted(inside)
    if inside:
        share = sum(inside.values()) / sum(p.numel() for p in params.values())
        names = sorted({n.split(".", len(run.blocks_name.split(".")) + 1)[-1] for n in inside})
        warnings.warn(f"lowbit: {len(inside)} weight tensors inside the blocks are not Linear layers and stay in full "
                      f"precision ({share:.1%} of the weights): {', '.join(names)}", stacklevel=3)


def _show_progress(bar, stats: dict, n_blocks: int) -> None:
    loss = next((stats[k] for k in ("loss_calib", "loss_last", "loss_best") if stats.get(k) is not None), None)
    msg = f"block {stats['index'] + 1}/{n_blocks}: {stats['seconds']:.1f}s"
    if loss is not None and stats.get("loss_first") is not None:  # a tuned block
        msg += f", loss {stats['loss_first']:.3g} -> {loss:.3g}, {stats['seconds_per_iter'] * 1000:.0f} ms/iter"
    elif loss is not None:  # rounded, run on the calibration windows (calibrated input scales)
        msg += f", loss {loss:.3g}"
    if stats.get("kept_start"):
        msg += " (tuning ended above its start: kept the start)"
    if stats.get("experts_few_tokens"):
        msg += f"; {len(stats['experts_few_tokens'])} experts saw < {MIN_EXPERT_TOKENS} tokens: kept their start"
    bar.write(msg, file=sys.stderr)
    bar.set_postfix(loss=f"{loss:.3g}" if loss is not None else "-", s=f"{stats['seconds']:.1f}")


@torch.no_grad()
def _mse(a: torch.Tensor, b: torch.Tensor, batch: int, relative=False) -> float:
    """Mean squared difference (relative: per token, as `squared_errors`), a batch of rows at a time
    (no full-size temporary)."""
    return sum(squared_errors(a[i : i + batch], b[i : i + batch], relative).sum().item()
               for i in range(0, len(a), batch)) / a.numel()


def _fit_outside(model, outside: dict[str, Scheme]) -> dict[str, Scheme]:
    """The outside schemes, each checked against its module (a 2-D weight outside the blocks) and
    replaced by its data type's stand-in where the rows are not whole blocks (fit_schemes)."""
    widths = {}
    for name in outside:
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise LowbitError(f"no module {name!r} with a weight to quantize") from None
        if weight.dim() != 2:
            raise LowbitError(f"{name} has a {weight.dim()}-D weight; only 2-D weights are quantized")
        widths[name] = int(weight.shape[1])
    return fit_schemes(outside, widths)


@torch.no_grad()
def quantize_outside(weight: torch.Tensor, scheme: Scheme, rows: int = 8192) -> QuantizedWeight:
    """Round a weight outside the blocks (the embedding, the output layer) to nearest, each group's
    range chosen to minimize its squared error (no data: nothing runs through these layers while
    the blocks are tuned). Unweighted: an embedding row's every weight enters the residual stream
    alike, so magnitude weighting (RTN's, inside the blocks) has no reason here. A chunk of
    `rows` rows at a time, so an 8B model's 128k-row embedding needs no full-size temporaries."""
    parts = []
    for i in range(0, weight.shape[0], rows):
        w = weight[i : i + rows].float()
        mn, mx = search_range_factors(w, scheme)
        parts.append(quantize_weight(w, scheme, min_scale=mn, max_scale=mx))
    if len(parts) == 1:
        return parts[0]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return QuantizedWeight(scheme, cat([p.codes for p in parts]), cat([p.scale for p in parts]),
                           cat([p.zero for p in parts]), {k: cat([p.extras[k] for p in parts]) for k in parts[0].extras})


@torch.no_grad()
def _quantize_lm_head(model, scheme: Scheme) -> dict[str, QuantizedWeight]:
    """Round the output layer to nearest (untied from the embeddings first if shared)."""
    found = find_lm_head(model)
    if found is None or not isinstance(found[1], nn.Linear):
        raise LowbitError("no Linear lm_head found to quantize")
    name, head = found
    head.weight = nn.Parameter(head.weight.detach().clone())  # untie from the input embeddings
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    q = quantize_weight(head.weight, scheme)
    head.weight.copy_(q.dequantize(head.weight.dtype))
    return {name: q}
