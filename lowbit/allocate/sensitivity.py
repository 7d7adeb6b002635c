"""Sensitivity of each layer to each quantization option: one small function per metric, all with
the same signature (model, layers, options, windows) -> {layer: {option name: score}}.
Larger means quantizing that layer with that option hurts more.

- deltaloss (SignRoundV2): quantize every layer with the option, run the language-model loss
  forward and backward, score sum |dL/dW_q * (W - Q(W))|: a first-order estimate of the loss change.
  For an option that quantizes a layer's inputs too, add its input term, sum over the calibration
  tokens of |dL/dA_q * (A - Q(A))|, A the layer's input.
- deltaloss_signed: one forward and backward with every layer at the cheapest option, then for each
  layer and option the signed first-order change of the loss if that layer alone moved there,
  g . (Q_o(W) - Q_base(W)) (and the same for its inputs). Errors that cancel count as cancelling;
  |g * dW| counts each element's error as a loss. Closer to the measured change of each swap
  (tests/test_allocate_plan.py), but it cannot tell apart two options that are both near float.
- hessian: sum_j E[x_j^2] * ||W[:, j] - Q(W)[:, j]||^2, the diagonal of X^T X weighting the error
  (the GPTQ/HAWQ-style proxy).
- output_mse: each layer quantized alone, the mean squared error of its block's output.

The options are quantized by round to nearest (as RTN rounds them: MX exponents searched), or by
the activation-weighted range search when prescale is on, so the scores describe what the tuning
starts from. With `tuned` (from `tuned_weights`: the whole model quantized with each option by a
short SignRound) they describe what the tuning ends with instead: SignRound repairs 2-bit layers
far more than 3- or 4-bit ones, which scores taken on rounded weights cannot see.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowbit.algorithms.prescale import search_range_factors, weight_importance
from lowbit.algorithms.stats import InputEnergy
from lowbit.allocate.cost import layer_bits
from lowbit.model import capture_block_inputs, run_block
from lowbit.qdq.act import get_activation
from lowbit.quantized import quantize_weight
from lowbit.schemes import Scheme


def quantized_weight(w: torch.Tensor, scheme: Scheme, importance: torch.Tensor | None, prescale: bool) -> torch.Tensor:
    """w as the quantizer starts from it: its range searched where prescale is on, and on a type
    with a grid of its own (MX exponents) as RTN searches it."""
    if prescale:
        mn, mx = search_range_factors(w, scheme, importance)
    elif scheme.data_type.range_grid is not None:
        mn, mx = search_range_factors(w, scheme, weight_importance(w))
    else:
        mn, mx = None, None
    return quantize_weight(w, scheme, min_scale=mn, max_scale=mx).dequantize(w.dtype)


def tuned_weights(model, options: dict[str, Scheme], windows: torch.Tensor, iters: int) -> dict:
    """{option: {layer: dequantized weight}} after quantizing a copy of the model with each option
    by SignRound(iters) on the windows."""
    import copy

    from lowbit.algorithms import SignRound
    from lowbit.pipeline import quantize as quantize_model

    out = {}
    for opt, scheme in options.items():
        r = quantize_model(copy.deepcopy(model), scheme, SignRound(iters=iters), windows, progress=False)
        out[opt] = {n: q.dequantize() for n, q in r.layers.items()}
    return out


def _weight_fn(tuned, imp, prescale):
    def qw(name, opt, scheme, w):
        if tuned is not None and opt in tuned:
            return tuned[opt][name].to(w.dtype)
        return quantized_weight(w, scheme, imp.get(name), prescale)

    return qw


@torch.no_grad()
def input_energy(model: nn.Module, layers: dict[str, nn.Linear], windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Mean x^2 per input channel of each layer over the windows (one forward pass)."""
    energy = InputEnergy(layers)
    try:
        for i in range(0, len(windows), batch_size):
            model(input_ids=windows[i : i + batch_size], use_cache=False)
    finally:
        imp = energy.remove()
    return imp


class _InputTerm:
    """Forward pre-hooks that quantize each layer's input (straight-through) and add up
    |dL/dA_q * (A - Q(A))| in the backward pass, per layer."""

    def __init__(self, layers: dict[str, nn.Linear], act: str):
        self.sums = dict.fromkeys(layers, 0.0)
        quantize = get_activation(act)
        self.handles = [lin.register_forward_pre_hook(self._hook(n, quantize)) for n, lin in layers.items()]

    def _hook(self, name, quantize):
        def pre_hook(module, args):
            x = args[0]
            if not torch.is_grad_enabled():
                return (quantize(x), *args[1:])
            xq = quantize(x.detach()).requires_grad_(True)
            xq = x + (xq - x).detach() if x.requires_grad else xq
            diff = (x - xq).detach()

            def add(grad):
                self.sums[name] += (grad * diff).abs().sum().item()

            xq.register_hook(add)
            return (xq, *args[1:])

        return pre_hook

    def remove(self) -> dict[str, float]:
        for h in self.handles:
            h.remove()
        return self.sums


def _backward_lm_loss(model, windows: torch.Tensor, batch_size: int) -> None:
    """Gradients of the mean language-model loss over the windows, a batch at a time."""
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        (loss * len(ids) / len(windows)).backward()


@torch.no_grad()
def _put_back(layers: dict[str, nn.Linear], originals: dict, frozen: list) -> None:
    """The weights as they were, without gradients, and the model's parameters trainable again."""
    for n, lin in layers.items():
        lin.weight.requires_grad_(False)
        lin.weight.grad = None
        lin.weight.copy_(originals[n])
    for p in frozen:
        p.requires_grad_(True)


def deltaloss(model, layers: dict[str, nn.Linear], options: dict[str, Scheme], windows: torch.Tensor,
              *, blocks=None, prescale: bool = False, batch_size: int = 4, tuned: dict | None = None) -> dict:
    qw = _weight_fn(tuned, input_energy(model, layers, windows) if prescale and tuned is None else {}, prescale)
    originals = {n: lin.weight.detach().clone() for n, lin in layers.items()}
    scores = {n: {} for n in layers}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with _checkpointed(blocks):
            for opt, scheme in options.items():
                with torch.no_grad():
                    for n, lin in layers.items():
                        lin.weight.copy_(qw(n, opt, scheme, originals[n]))
                        lin.weight.requires_grad_(True)
                        lin.weight.grad = None
                inputs = _InputTerm(layers, scheme.act) if scheme.act is not None else None
                try:
                    _backward_lm_loss(model, windows, batch_size)
                finally:
                    act_terms = inputs.remove() if inputs is not None else {}
                for n, lin in layers.items():
                    scores[n][opt] = (lin.weight.grad * (originals[n] - lin.weight.detach())).abs().sum().item() \
                        + act_terms.get(n, 0.0)
    finally:
        _put_back(layers, originals, frozen)
    return scores


class _InputSwap:
    """Forward pre-hooks that quantize each layer's input as the base option does (straight-through)
    and add up, per other option, sum over tokens of dL/dA_q * (Q_o(A) - Q_base(A)), signed."""

    def __init__(self, layers: dict[str, nn.Linear], base: str, acts: dict[str, str | None]):
        self.sums = {n: dict.fromkeys(acts, 0.0) for n in layers}
        ident = lambda x: x  # noqa: E731  (an option with 16-bit inputs)
        quant = {o: get_activation(a) if a is not None else ident for o, a in acts.items()}
        self.handles = [lin.register_forward_pre_hook(self._hook(n, quant, base)) for n, lin in layers.items()]

    def _hook(self, name, quant, base):
        def pre_hook(module, args):
            x = args[0]
            xq = quant[base](x.detach())
            if not torch.is_grad_enabled():
                return (xq, *args[1:])
            diffs = {o: (q(x.detach()) - xq) for o, q in quant.items() if o != base}
            xq = x + (xq - x).detach() if x.requires_grad else xq.requires_grad_(True)

            def add(grad):
                for o, d in diffs.items():
                    self.sums[name][o] += (grad * d).sum().item()

            xq.register_hook(add)
            return (xq, *args[1:])

        return pre_hook

    def remove(self) -> dict:
        for h in self.handles:
            h.remove()
        return self.sums


def base_option(options: dict[str, Scheme], layers: dict[str, nn.Linear]) -> str:
    """The option that costs the fewest bits over all the layers."""
    return min(options, key=lambda o: sum(layer_bits(*lin.weight.shape, options[o]) for lin in layers.values()))


def deltaloss_signed(model, layers: dict[str, nn.Linear], options: dict[str, Scheme], windows: torch.Tensor,
                     *, blocks=None, prescale: bool = False, batch_size: int = 4, tuned: dict | None = None) -> dict:
    """The loss change of moving one layer from the cheapest option to each other one, to first
    order at the point where every layer takes the cheapest: g . (Q_o(W) - Q_base(W)) plus the
    input term, signed, so that errors which cancel count as cancelling (DeltaLoss's |g * dW|
    counts every element's error as a loss). Scores are shifted per layer so the best option
    of each layer scores 0."""
    base = base_option(options, layers)
    qw = _weight_fn(tuned, input_energy(model, layers, windows) if prescale and tuned is None else {}, prescale)
    originals = {n: lin.weight.detach().clone() for n, lin in layers.items()}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            for n, lin in layers.items():
                lin.weight.copy_(qw(n, base, options[base], originals[n]))
                lin.weight.requires_grad_(True)
                lin.weight.grad = None
        swap = _InputSwap(layers, base, {o: s.act for o, s in options.items()}) \
            if options[base].act is not None else None
        try:
            with _checkpointed(blocks):
                _backward_lm_loss(model, windows, batch_size)
        finally:
            act_terms = swap.remove() if swap is not None else {}
        scores = {}
        for n, lin in layers.items():
            g, wb = lin.weight.grad, lin.weight.detach()
            change = {o: 0.0 if o == base else
                      (g * (qw(n, o, s, originals[n]) - wb)).sum().item() + act_terms.get(n, {}).get(o, 0.0)
                      for o, s in options.items()}
            low = min(change.values())
            scores[n] = {o: c - low for o, c in change.items()}
    finally:
        _put_back(layers, originals, frozen)
    return scores


class _checkpointed:
    """Run each block under activation checkpointing, so backward holds one block's activations."""

    def __init__(self, blocks):
        self.blocks = list(blocks) if blocks is not None else []

    def __enter__(self):
        self.saved = [b.__dict__.get("forward") for b in self.blocks]
        for b in self.blocks:
            inner = b.forward

            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            b.forward = forward

    def __exit__(self, *exc):
        for b, f in zip(self.blocks, self.saved):
            if f is None:
                del b.forward
            else:
                b.forward = f


@torch.no_grad()
def hessian(model, layers: dict[str, nn.Linear], options: dict[str, Scheme], windows: torch.Tensor,
            *, blocks=None, prescale: bool = False, tuned: dict | None = None) -> dict:
    imp = input_energy(model, layers, windows)
    qw = _weight_fn(tuned, imp, prescale)
    scores = {}
    for n, lin in layers.items():
        w = lin.weight.detach()
        scores[n] = {
            opt: ((qw(n, opt, s, w) - w).pow(2).sum(0) * imp[n]).sum().item()
            for opt, s in options.items()
        }
    return scores


@torch.no_grad()
def output_mse(model, layers: dict[str, nn.Linear], options: dict[str, Scheme], windows: torch.Tensor,
               *, blocks=None, prescale: bool = False, batch_size: int = 8, tuned: dict | None = None) -> dict:
    """Blocks run on full-precision inputs; each layer is swapped for its quantized weight alone."""
    qw = _weight_fn(tuned, input_energy(model, layers, windows) if prescale and tuned is None else {}, prescale)
    x, kwargs = capture_block_inputs(model, blocks, windows, windows.device)
    by_block = {}
    for i, b in enumerate(blocks):
        mods = {id(m) for m in b.modules()}
        by_block[i] = [n for n, lin in layers.items() if id(lin) in mods]
    scores = {n: {} for n in layers}
    for i, block in enumerate(blocks):
        target = run_block(block, x, kwargs[i], batch_size)
        for n in by_block[i]:
            lin = layers[n]
            original = lin.weight.detach().clone()
            for opt, s in options.items():
                lin.weight.copy_(qw(n, opt, s, original))
                scores[n][opt] = (run_block(block, x, kwargs[i], batch_size) - target).pow(2).mean().item()
            lin.weight.copy_(original)
        x = target
    return scores


METRICS = {"deltaloss": deltaloss, "deltaloss_signed": deltaloss_signed, "hessian": hessian, "output_mse": output_mse}
