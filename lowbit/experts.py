"""Mixture-of-experts layers as Linear layers, so that every algorithm and format quantizes them.

transformers keeps a MoE layer's experts as two fused 3-D parameters, gate_up_proj [experts,
2*inter, hidden] and down_proj [experts, hidden, inter]. `split_experts(model)` swaps each such
module for `ExpertLinears`: one nn.Linear per projection per expert (experts.{e}.gate_proj,
up_proj, down_proj), computing the same function, each expert on the tokens routed to it. From
there an expert is a Linear like any other: RTN rounds it, SignRound tunes it on its routed
tokens within the block's loss, the input statistics see only its tokens, and every format writes
it per expert, under the names the model's checkpoints use (`checkpoint_names`). Routers
(mlp.gate) are not Linear layers in transformers and stay in full precision.
"""
from __future__ import annotations

import inspect
import re

import torch
from torch import nn

# The fused forward lowbit reproduces: F.linear per expert on gate_up (split in half: gate, up),
# act(gate) * up, F.linear with down, weighted by the router. Classes whose forward differs
# (biases, clamps, other layouts) are left alone, and reported as weights left in float.
_STANDARD = ("gate_up_proj[expert_idx]).chunk(2, dim=-1)", "act_fn(gate) * up", "self.down_proj[expert_idx])")
_checked: dict[type, bool] = {}

# model type -> (module path in the split model, its path in the model type's checkpoints), {e}
# an expert's index. Types not listed store experts as the split model names them (Qwen-MoE and
# most others: mlp.experts.{e}.gate_proj.weight), which is how transformers saves them.
CHECKPOINT_NAMES = {
    "mixtral": [("mlp.experts.{e}.gate_proj", "block_sparse_moe.experts.{e}.w1"),
                ("mlp.experts.{e}.up_proj", "block_sparse_moe.experts.{e}.w3"),
                ("mlp.experts.{e}.down_proj", "block_sparse_moe.experts.{e}.w2"),
                ("mlp.gate", "block_sparse_moe.gate")],
}


def _regex(template: str) -> str:
    return r"\." + re.escape(template).replace(r"\{e\}", r"(\d+)") + r"\."


def _sub(template: str) -> str:
    return "." + template.replace("{e}", r"\1") + "."


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module of the standard fused layout."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or not hasattr(module, "act_fn"):
        return False
    gu, down = params["gate_up_proj"], params["down_proj"]
    if gu.dim() != 3 or down.dim() != 3 or gu.shape[0] != down.shape[0] or gu.shape[1] != 2 * down.shape[2] \
            or gu.shape[2] != down.shape[1]:
        return False
    cls = type(module)
    if cls not in _checked:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _checked[cls] = all(s in src for s in _STANDARD)
    return _checked[cls]


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype, device):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device)


class ExpertLinears(nn.ModuleList):
    """A fused experts module's function with one Linear per projection per expert."""

    def __init__(self, fused: nn.Module):
        n, two_inter, hidden = fused.gate_up_proj.shape
        inter = two_inter // 2
        dtype, device = fused.gate_up_proj.dtype, fused.gate_up_proj.device
        super().__init__([Expert(hidden, inter, dtype, device) for _ in range(n)])
        self._act = (fused.act_fn,)  # in a tuple: not a child module (the list holds experts only)
        if device.type != "meta":
            with torch.no_grad():
                for e, ex in enumerate(self):
                    ex.gate_proj.weight.copy_(fused.gate_up_proj[e, :inter])
                    ex.up_proj.weight.copy_(fused.gate_up_proj[e, inter:])
                    ex.down_proj.weight.copy_(fused.down_proj[e])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < len(self):
                continue
            token, slot = torch.where(top_k_index == e)
            ex, x = self[e], hidden_states[token]
            h = ex.down_proj(self._act[0](ex.gate_proj(x)) * ex.up_proj(x))
            out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def split_experts(model: nn.Module) -> int:
    """Swap every fused experts module of the model for ExpertLinears (in place, on any device,
    the meta device included); returns how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if name and is_fused_experts(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, ExpertLinears(module))
            swapped += 1
    return swapped


def checkpoint_name(model_type: str | None, name: str) -> str:
    """The name a tensor or module of the (split) model has in the model type's checkpoints."""
    name += "."  # a module's name ends where a tensor's name has a dot
    for model, ckpt in CHECKPOINT_NAMES.get(model_type or "", ()):
        name = re.sub(_regex(model), _sub(ckpt), name)
    return name[:-1]


def model_name(model_type: str | None, name: str) -> str:
    """The inverse of checkpoint_name."""
    name += "."
    for model, ckpt in CHECKPOINT_NAMES.get(model_type or "", ()):
        name = re.sub(_regex(ckpt), _sub(model), name)
    return name[:-1]
