"""Attention sinks: for each block of a model, the mean square of its output at the windows' first
token and at the largest token, against the median token's, on 8 windows of 256 tokens of the
model's evaluation text. Where they are 10^4 (SmolLM2-135M from its 12th block), plain MSE is
nearly all theirs: why SignRound's loss is relative per token (SignRound.loss).

    python bench/sinks.py                    # pycode-7m
    python bench/sinks.py --model smollm2    # SmolLM2-135M (get_smollm2.py)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from float_types import model_setup  # noqa: E402

from lowbit.calib import tokenize  # noqa: E402
from lowbit.model import block_output, find_blocks, load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pycode-7m")
    args = p.parse_args()
    folder, _, evaluation, _ = model_setup(args.model)
    model, tok = load_model(folder)
    ids = tokenize(tok, evaluation)[: 8 * 256].view(8, 256)
    hidden = []
    for block in find_blocks(model)[1]:
        block.register_forward_hook(lambda m, a, out: hidden.append(block_output(out).detach()))
    with torch.no_grad():
        model(ids)
    print(f"{args.model}: each block's output, token mean square against the median token's")
    print("| block | first token / median | largest / median |\n|---|---|---|")
    for i, h in enumerate(hidden):
        ms = h.float().pow(2).mean(-1)
        med = ms.median()
        print(f"| {i} | {ms[:, 0].mean() / med:.1f} | {ms.max() / med:.1f} |")


if __name__ == "__main__":
    main()
