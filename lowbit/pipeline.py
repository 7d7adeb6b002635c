"""The loop over blocks: capture block 0's inputs, then for each block compute its full-precision
outputs (the targets), quantize it with the algorithm, write the weights, and feed its quantized
outputs to the next block. Only one block's working set is on the device at a time."""
from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import __version__
from lowbit.algorithms import BlockData, get_algorithm
from lowbit.algorithms.cpu_attention import attention_context
from lowbit.algorithms.prescale import InputEnergy
from lowbit.calib import calibration_windows, windows_hash
from lowbit.errors import LowbitError
from lowbit.model import (
    blocks_detached,
    capture_block_inputs,
    check_finite,
    find_blocks,
    find_linears,
    find_lm_head,
    load_model,
    run_block,
    weight_modules,
)
from lowbit.qdq import QuantizedWeight, quantize as quantize_weight
from lowbit.schemes import Scheme, get_scheme

# Named settings bundles: (algorithm settings, pipeline settings).
PRESETS = {
    "default": ({"iters": 200}, {"nsamples": 128}),
    "light": ({"iters": 50}, {"nsamples": 128}),
    "best": ({"iters": 1000}, {"nsamples": 512}),
}


@dataclass
class QuantizeResult:
    model: nn.Module
    tokenizer: object
    layers: dict[str, QuantizedWeight]  # full module name -> codes, scales, zero points
    report: dict = field(default_factory=dict)


def layer_schemes(names: list[str], default: Scheme, overrides: dict | None) -> dict[str, Scheme]:
    """Scheme per layer: an override whose key equals the name or fully matches it as a regex."""
    out = {}
    for name in names:
        scheme = default
        for pattern, s in (overrides or {}).items():
            if pattern == name or re.fullmatch(pattern, name):
                scheme = get_scheme(s) if isinstance(s, str) else s
                break
        out[name] = scheme
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
    lm_head: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> QuantizeResult:
    """Quantize the Linear layers of every transformer block of `model` (a module or a local
    folder). `algorithm` is a name or a config (e.g. SignRound(iters=50)); `dataset` a file path,
    a datasets name or token windows [n, seqlen]; `overrides` maps layer names or regexes to
    schemes. The model is changed in place (fake-quantized weights) and returned with the codes."""
    t_start = time.perf_counter()
    if isinstance(scheme, str):
        scheme = get_scheme(scheme)
    algo = get_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model, tokenizer = load_model(str(model))
    else:
        check_finite(model)
    device = torch.device(device) if device is not None else torch.device("cpu")
    blocks_name, blocks = find_blocks(model)
    block_layers = [find_linears(b) for b in blocks]
    names = [f"{blocks_name}.{i}.{n}" for i, ls in enumerate(block_layers) for n in ls]
    schemes = layer_schemes(names, scheme, overrides)

    report = {
        "lowbit_version": __version__,
        "scheme": scheme.to_dict() | {"name": scheme.name},
        "algorithm": {"name": algo.name, **asdict(algo)},
        "blocks": [],
    }
    windows = kwargs = None
    if algo.needs_data:
        if dataset is None:
            raise LowbitError(f"algorithm {algo.name!r} needs calibration data (dataset)")
        if tokenizer is None and not isinstance(dataset, torch.Tensor):
            raise LowbitError("a tokenizer is needed to tokenize the calibration text")
        windows = calibration_windows(tokenizer, dataset, nsamples, seqlen, seed)
        report["calibration"] = {
            "source": dataset if isinstance(dataset, str) else "token windows",
            "nsamples": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]),
            "seed": seed,
            "sha256": windows_hash(windows),
        }
        t0 = time.perf_counter()
        with blocks_detached(model, blocks_name):
            model.to(device)
        q_in, kwargs = capture_block_inputs(model, blocks, windows, device)
        fp_in = q_in
        report["calibration"]["capture_seconds"] = time.perf_counter() - t0

    # The full-precision targets and the next block's inputs are computed under the autocast the
    # algorithm tunes in (bf16 where it is fast): the tuning itself sees no more precision than that.
    fwd_dtype = algo.tuning_dtype(device) if hasattr(algo, "tuning_dtype") else None
    quantized: dict[str, QuantizedWeight] = {}
    # The bar only on a terminal; the per-block lines always (logs and CI read them).
    bar = tqdm(list(enumerate(blocks)), desc="blocks", disable=not (progress and sys.stderr.isatty()), file=sys.stderr)
    for i, block in bar:
        t0 = time.perf_counter()
        home = next(block.parameters()).device
        block.to(device)
        layers = {n: (lin, schemes[f"{blocks_name}.{i}.{n}"]) for n, lin in block_layers[i].items()}
        data = None
        if algo.needs_data:
            batch = getattr(algo, "batch_size", 8)
            energy = InputEnergy(block_layers[i]) if algo_needs_importance(algo, layers) else None
            with attention_context(fwd_dtype, device):
                targets = run_block(block, fp_in, kwargs[i], batch, fwd_dtype)
            data = BlockData(q_in, kwargs[i], targets, energy.remove() if energy else None)
        result = algo.quantize_block(block, layers, data, seed=seed + i)
        with torch.no_grad():
            for n, (lin, _) in layers.items():
                lin.weight.copy_(result.weights[n].dequantize(lin.weight.dtype))
                quantized[f"{blocks_name}.{i}.{n}"] = result.weights[n]
        calib_loss = None
        if algo.needs_data and i + 1 < len(blocks):  # the last block's outputs feed nothing
            with attention_context(fwd_dtype, device):
                q_in = run_block(block, q_in, kwargs[i], batch, fwd_dtype)
            calib_loss = _mse(q_in, targets, batch)
            fp_in = targets
        block.to(home)
        # loss_calib: the quantized block's loss on every calibration window (the tuning loss, not
        # one minibatch's), free from the outputs the next block needs anyway.
        stats = {"index": i, **result.stats, "loss_calib": calib_loss, "seconds": time.perf_counter() - t0}
        report["blocks"].append(stats)
        if progress:
            loss = next((stats[k] for k in ("loss_calib", "loss_last", "loss_best") if stats.get(k) is not None), None)
            first = stats.get("loss_first")
            msg = f"block {i + 1}/{len(blocks)}: {stats['seconds']:.1f}s"
            if loss is not None:
                msg += f", loss {first:.3g} -> {loss:.3g}, {stats['seconds_per_iter'] * 1000:.0f} ms/iter"
            bar.write(msg, file=sys.stderr)
            bar.set_postfix(loss=f"{loss:.3g}" if loss is not None else "-", s=f"{stats['seconds']:.1f}")
    bar.close()

    if lm_head:
        quantized.update(_quantize_lm_head(model, scheme))
    report["layers"] = {
        n: {"bits": q.bits, "group_size": q.group_size, "sym": q.sym} for n, q in quantized.items()
    }
    report["unquantized"] = sorted(n for n in weight_modules(model) if n not in quantized)
    report["seconds"] = time.perf_counter() - t_start
    return QuantizeResult(model, tokenizer, quantized, report)


@torch.no_grad()
def _mse(a: torch.Tensor, b: torch.Tensor, batch: int) -> float:
    """Mean squared difference, a batch of rows at a time (no full-size temporary)."""
    total = sum((a[i : i + batch].float() - b[i : i + batch].float()).pow(2).sum().item() for i in range(0, len(a), batch))
    return total / a.numel()


def algo_needs_importance(algo, layers) -> bool:
    needs = getattr(algo, "needs_importance", None)
    return bool(needs and needs([s for _, s in layers.values()]))


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
    q = quantize_weight(head.weight, scheme.bits, scheme.group_size, scheme.sym)
    head.weight.copy_(q.dequantize(head.weight.dtype))
    return {name: q}
