"""Model plumbing: load a local folder, find the transformer blocks and their Linear layers,
capture the first block's inputs without running the rest of the model."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.experts import checkpoint_name, split_experts


def _check_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise LowbitError(f"model folder not found: {path}")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise LowbitError(f"not a model folder (no config.json): {path}")
    try:
        with open(cfg_file) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise LowbitError(f"corrupt config.json in {path}: {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: str) -> bool:
    """Whether a folder has tokenizer files (a model written without a tokenizer has none)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_model(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local Hugging Face folder, offline."""
    import transformers

    _check_folder(path)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True
        )
        tokenizer = (transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
                     if has_tokenizer(path) else None)
    except Exception as e:  # transformers raises many types for a broken folder
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LowbitError(f"cannot load model from {path}: {msg}") from None
    model.eval()
    split_experts(model)
    check_finite(model)
    model.source_dtype = source_dtype(path)  # what writers store float tensors in
    return model, tokenizer


def source_dtype(path: str) -> torch.dtype:
    """The dtype a folder's checkpoint stores its float weights in (float32 when unknown)."""
    from lowbit.checkpoint import Checkpoint

    try:
        return Checkpoint(path).float_dtype()
    except LowbitError:
        return torch.float32


def load_skeleton(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a local folder with every weight on the meta device (no memory):
    the structure to stream the weights into, a block at a time (load_weights, release)."""
    import transformers

    _check_folder(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken folder
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LowbitError(f"cannot load model from {path}: {msg}") from None
    split_experts(model)
    if os.path.isfile(os.path.join(path, "generation_config.json")):  # as from_pretrained reads it
        model.generation_config = transformers.GenerationConfig.from_pretrained(path, local_files_only=True)
    model.eval()
    materialize_buffers(model)
    return model, tokenizer


def stored_names(model: nn.Module) -> list[str]:
    """The model's state a checkpoint stores: its state dict, less an output embedding tied to
    the input one (model names; ckpt_name gives each one's name in the checkpoint)."""
    names = list(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        found = find_lm_head(model)
        if found is not None:
            names.remove(found[0] + ".weight")
    return names


def ckpt_name(model: nn.Module, name: str) -> str:
    """The name model tensor `name` has in checkpoints of the model's type (they differ for the
    experts of some MoE models: lowbit.experts)."""
    return checkpoint_name(getattr(model.config, "model_type", None), name)


@torch.no_grad()
def load_weights(module: nn.Module, prefix: str, ckpt, dtype: torch.dtype | None = torch.float32,
                 rename=None) -> None:
    """Give `module` (on the meta device) its tensors from checkpoint `ckpt` (names prefix +
    name, through rename), floating-point ones in dtype (None: as stored); non-finite values are
    refused."""
    state = {}
    for name in module.state_dict():
        t = ckpt.get(rename(prefix + name) if rename else prefix + name)
        if t.is_floating_point():
            t = t.to(dtype or t.dtype)
            if not torch.isfinite(t).all():
                raise LowbitError(f"weight {prefix + name} contains NaN or Inf")
        state[name] = t
    module.load_state_dict(state, assign=True)


def release(module: nn.Module) -> None:
    """Free a module's weights (back to the meta device)."""
    module.to("meta")


def materialize_buffers(model: nn.Module) -> None:
    """Buffers no checkpoint holds (rotary tables, embedding scales) are computed from the config
    at construction, which ran on the meta device: compute them on the CPU the way transformers does
    when it loads a model (its _init_weights), leaving the parameters as they are."""
    for module in model.modules():
        meta = {n: b for n, b in module.named_buffers(recurse=False) if b.device.type == "meta"}
        persistent = set(module.state_dict(keep_vars=True)) if meta else set()
        meta = {n: b for n, b in meta.items() if n not in persistent}
        if not meta:
            continue
        for n, b in meta.items():
            fill = float("nan") if b.is_floating_point() else 0
            setattr(module, n, torch.full(b.shape, fill, dtype=b.dtype))
        for p in module.parameters(recurse=False):
            p._is_hf_initialized = True  # transformers' initializers skip what is flagged so
        model._init_weights(module)
        for n in meta:
            b = getattr(module, n)
            if b.is_floating_point() and torch.isnan(b).any():
                raise LowbitError(f"cannot compute buffer {type(module).__name__}.{n} of this model without its weights")


def stream_order(names: list[str], blocks_name: str, n_blocks: int) -> tuple[list[str], list[list[str]], list[str]]:
    """Split tensor names (in state-dict order) into those written before the blocks, each
    block's, and the rest: the one order every writer gets them in, streamed or not."""
    prefix = blocks_name + "."
    before, blocks, after = [], [[] for _ in range(n_blocks)], []
    for name in names:
        if name.startswith(prefix):
            blocks[int(name[len(prefix):].split(".", 1)[0])].append(name)
        elif any(blocks):
            after.append(name)
        else:
            before.append(name)
    return before, blocks, after


def check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not torch.isfinite(p).all():
            raise LowbitError(f"weight {name} contains NaN or Inf")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList holding the most parameters in Linear layers."""
    best, best_params = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        n = sum(m.weight.numel() for m in mod.modules() if isinstance(m, nn.Linear))
        if n > best_params:
            best, best_params = (name, mod), n
    if best is None:
        raise LowbitError(f"no transformer blocks (a ModuleList of layers with Linear weights) found in {type(model).__name__}")
    return best


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def weight_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight that could be quantized: each floating-point parameter of 2 or more dimensions
    (Linear and Embedding weights, fused 3-D expert weights, routers), by parameter name; a tied
    parameter once."""
    return {n: p for n, p in model.named_parameters() if p.is_floating_point() and p.dim() >= 2}


def find_lm_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, m in model.named_modules():
        if m is head:
            return name, m
    return None


@contextmanager
def blocks_detached(model: nn.Module, blocks_name: str):
    """Temporarily take the block list out of the model (to move the rest to another device)."""
    parent_name, _, attr = blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    try:
        yield blocks
    finally:
        setattr(parent, attr, blocks)


class _Stop(Exception):
    pass


_SKIP_KWARGS = ("past_key_values", "cache", "past_key_value", "hidden_states")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering block 0 for each window [n, seqlen], and each block's keyword
    arguments (masks, position embeddings; they differ between blocks in models that mix
    sliding-window and full attention). Windows share their length and have no padding, so the
    arguments of the first window serve all windows and broadcast over a minibatch.

    The blocks are swapped for pass-throughs that record their inputs, so no block is computed
    and the blocks may stay on another device."""
    states: list[torch.Tensor] = []
    per_block: list[dict] = []
    first_window = True

    def passthrough(i):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                states.append(hidden.detach())
            if first_window:
                per_block.append({k: v for k, v in kwargs.items() if k not in _SKIP_KWARGS})
            if i == len(blocks) - 1 or not first_window:
                raise _Stop
            return hidden

        return forward

    saved = [b.__dict__.get("forward") for b in blocks]  # an instance forward (e.g. accelerate's)
    try:
        for i, b in enumerate(blocks):
            b.forward = passthrough(i)
        for w in windows:
            try:
                model(input_ids=w[None].to(device), use_cache=False)
            except _Stop:
                pass
            first_window = False
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                del b.forward
            else:
                b.forward = f
    if len(per_block) != len(blocks) or len(states) != len(windows):
        raise LowbitError(f"{type(model).__name__}: could not capture the inputs of every block")
    for kw in per_block:
        kw["use_cache"] = False
    return torch.cat(states), per_block


def block_output(out) -> torch.Tensor:
    """Blocks return a tensor or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict, batch_size: int,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """The block's outputs for all rows of x, computed in batches. With dtype (e.g. bfloat16) the
    block runs under autocast to it: matmuls in dtype, the residual stream and norms in x's dtype,
    as SignRound tunes it. The outputs come back in x's dtype."""
    autocast = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext()
    with autocast:
        return torch.cat([
            block_output(block(x[i : i + batch_size], **kwargs)).to(x.dtype) for i in range(0, len(x), batch_size)
        ])
