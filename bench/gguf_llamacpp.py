"""GGUF export checked in llama.cpp: perplexity llama.cpp computes from lowbit's GGUF files against
lowbit's own perplexity of the same weights, on the same token windows.

    pip install llama-cpp-python      # builds llama.cpp with the machine's compiler (~1 hour on 2 cores)
    python bench/gguf_llamacpp.py [--windows 200]

pycode-7m, round to nearest (the comparison is about the file, not the tuning), W4A16G32 and
W8A16G32 symmetric, each written as q4_0, q8_0, q4_k and f32; first N windows of 256 tokens of
heldout.txt.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lowbit  # noqa: E402
from lowbit.calib import tokenize  # noqa: E402
from lowbit.eval.perplexity import perplexity  # noqa: E402
from lowbit.export.gguf import write_gguf  # noqa: E402

PYCODE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets", "models", "pycode-7m")
SEQLEN = 256


def llama_cpp_ppl(path: str, windows: torch.Tensor) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=SEQLEN, n_batch=SEQLEN, verbose=False)
    nll, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[:SEQLEN], dtype=np.float32))
        nll += F.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum").item()
        count += SEQLEN - 1
    return math.exp(nll / count)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=200)
    args = p.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama_cpp is not importable: pip install llama-cpp-python")
    print("| lowbit scheme | lowbit ppl | gguf type | llama.cpp ppl | difference |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("W4A16G32", "W8A16G32"):
            r = lowbit.quantize(PYCODE, scheme, algorithm="rtn", progress=False)
            with open(os.path.join(PYCODE, "heldout.txt")) as f:
                tokens = tokenize(r.tokenizer, f.read())
            windows = tokens[: args.windows * SEQLEN].view(args.windows, SEQLEN)
            ref = perplexity(r.model, tokens=tokens, seqlen=SEQLEN, max_windows=args.windows)["ppl"]
            for qtype in ("q4_0", "q8_0", "q4_k", "f32"):
                path = os.path.join(tmp, f"{scheme}-{qtype}.gguf")
                write_gguf(r.model, r.tokenizer, r.layers, path, qtype)
                got = llama_cpp_ppl(path, windows)
                print(f"| {scheme} | {ref:.4f} | {qtype} | {got:.4f} | {(got / ref - 1) * 100:+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
