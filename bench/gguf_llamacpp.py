"""GGUF export checked in llama.cpp: perplexity llama.cpp computes from lowbit's GGUF files against
lowbit's own perplexity of the same weights, on the same token windows.

    pip install llama-cpp-python      # builds llama.cpp with the machine's compiler (~1 hour on 2 cores)
    python bench/gguf_llamacpp.py [--windows 200]

pycode-7m, round to nearest (the comparison is about the file, not the tuning), W4A16G32 and
W8A16G32 symmetric, each written as q4_0, q8_0, q4_k and f32; first N windows of 256 tokens of
heldout.txt.

    python bench/gguf_llamacpp.py --kquants q2_k q3_k q2_k_mix q4_k_m [--iters 200] [--rtn] [--imatrix]
                                  [--model smollm2]
    python bench/gguf_llamacpp.py --kquants q3_k --plans 3.0 3.4375

k-quants instead: lowbit SignRound on each type's own grid, written to GGUF, against llama.cpp's
own quantizer (llama_model_quantize) on an f16 GGUF of the original, for the llama.cpp file types
of that name; with --imatrix also with an importance matrix (the mean squared input of each
column of each block Linear over lowbit's own calibration windows: what llama.cpp's imatrix tool
collects), the way llama.cpp's best files are made. A plain type (q2_k) puts every block Linear in that type and
leaves the embedding and output in float; a mix (q4_k_m, q3_k_m, q2_k_mix, q2_k_s: lowbit's
lowbit/mixes.py) follows llama.cpp's own per-tensor rules, the embedding and output included,
so the whole files compare. 128 calibration windows of 256 tokens; --rtn adds lowbit's round to
nearest of each (with its range search on these types), to tell the rounding from the tuning;
--rtn-plain the plain min/max rounding; --q8 adds (--q8 only: runs only) lowbit's runs of the -q8 schemes (Q4_K_M-q8:
tuned with every block layer's input rounded as llama.cpp's CPU kernels round it, q8_K / q8_0).
llama.cpp's perplexity of every file on the same windows; lowbit's of its own weights, as they
are (16-bit inputs unless -q8) and with llama.cpp's input rounding; and the sizes: the whole file,
and the bytes of the block Linear weights alone. --plans adds `--target-bits` plans over Q2_K/Q3_K/Q4_K/Q6_K (scales
counted: Q3_K is 3.4375 bits a weight) against the uniform type.
"""
from __future__ import annotations

import argparse
import ctypes
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

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")
PYCODE = os.path.join(ASSETS, "models", "pycode-7m")
SEQLEN = 256


def llama_cpp_ppl(path: str, windows: torch.Tensor, threads: int | None = None) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=SEQLEN, n_batch=SEQLEN, verbose=False,
                          n_threads=threads or torch.get_num_threads())
    nll, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[:SEQLEN], dtype=np.float32))
        nll += F.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum").item()
        count += SEQLEN - 1
    return math.exp(nll / count)


# lowbit's type or mix -> llama.cpp's file types to compare it with (llama_ftype names). llama.cpp's
# Q2_K_S needs an importance matrix (--imatrix); without one its Q2_K stands in.
LLAMA_FTYPES = {"q2_k": ["MOSTLY_Q2_K"], "q3_k": ["MOSTLY_Q3_K_S", "MOSTLY_Q3_K_M"],
                "q4_k": ["MOSTLY_Q4_K_S", "MOSTLY_Q4_K_M"], "q5_k": ["MOSTLY_Q5_K_S"], "q6_k": ["MOSTLY_Q6_K"],
                "q2_k_mix": ["MOSTLY_Q2_K"], "q2_k_s": ["MOSTLY_Q2_K", "MOSTLY_Q2_K_S"], "q3_k_s": ["MOSTLY_Q3_K_S"],
                "q3_k_m": ["MOSTLY_Q3_K_M"],
                "q3_k_l": ["MOSTLY_Q3_K_L"], "q4_k_s": ["MOSTLY_Q4_K_S"], "q4_k_m": ["MOSTLY_Q4_K_M"],
                "q5_k_s": ["MOSTLY_Q5_K_S"], "q5_k_m": ["MOSTLY_Q5_K_M"]}


NEEDS_IMATRIX = {"MOSTLY_Q2_K_S"}
PLAN_OPTIONS = "gguf:q2_k,gguf:q3_k,gguf:q4_k,gguf:q6_k"


def block_bytes(path: str) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors
               if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name)


def llama_quantize(src: str, dst: str, ftype: str, threads: int, imatrix: dict | None = None) -> None:
    """llama.cpp's quantizer; imatrix: {GGUF tensor name: float32 array of the mean squared input
    of each column}, what llama.cpp's imatrix tool stores, passed as llama.h's array of entries."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    params.nthread = threads
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # ends with a null name
        for e, (name, values) in zip(entries, imatrix.items()):
            e.name = name.encode()
            e.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            e.size = values.size
        params.imatrix = entries
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}")


def importance_matrix(model, calib: torch.Tensor) -> dict:
    """llama.cpp's importance matrix from the calibration windows lowbit tunes on: per block Linear
    (GGUF name), the mean over all tokens of each input column's square."""
    from lowbit.algorithms.stats import InputEnergy
    from lowbit.allocate.plan import block_layers
    from lowbit.export.gguf import gguf_name

    energy = InputEnergy(block_layers(model))
    with torch.no_grad():
        for i in range(0, len(calib), 8):
            model(calib[i : i + 8])
    return {gguf_name(n + ".weight", model.config.model_type): e.numpy().astype(np.float32)
            for n, e in energy.remove().items()}


def ppl_as_llama_cpp_runs(model, layers: dict, tokens, windows: int) -> float:
    """lowbit's perplexity of the quantized model with each block layer's input rounded as
    llama.cpp's CPU kernels round it for the layer's type (q8_K / q8_0), the output's left in float."""
    from lowbit.activations import inputs_quantized
    from lowbit.qdq.kquant import FORMATS

    modules = dict(model.named_modules())
    hooks = {n: (modules[n], FORMATS[q.scheme.dtype].inputs) for n, q in layers.items()
             if q.scheme.dtype in FORMATS and q.scheme.act is None and isinstance(modules[n], torch.nn.Linear)
             and ".layers." in n}
    with inputs_quantized(hooks):
        return perplexity(model, tokens=tokens, seqlen=SEQLEN, max_windows=windows)["ppl"]


def setup(name: str, n_windows: int):
    """(folder, calibration windows [128, SEQLEN], evaluation windows [n, SEQLEN], description)."""
    from lowbit.calib import make_windows, read_text
    from lowbit.model import load_model

    if name == "smollm2":
        import subprocess

        script = os.path.join(ASSETS, "scripts", "get_smollm2.py")
        folder = subprocess.run([sys.executable, script], check=True, capture_output=True,
                                text=True).stdout.strip().splitlines()[-1]
        calib_text = read_text(os.path.join(ASSETS, "text", "c4_validation_2k.parquet"))
        with open(os.path.join(ASSETS, "text", "wikitext2_test.txt")) as f:
            eval_text = f.read()
        about = "SmolLM2-135M-Instruct; calibration c4_validation_2k, evaluation wikitext2_test.txt"
    else:
        folder = PYCODE
        with open(os.path.join(PYCODE, "calib.txt")) as f:
            calib_text = f.read()
        with open(os.path.join(PYCODE, "heldout.txt")) as f:
            eval_text = f.read()
        about = "pycode-7m; calibration calib.txt, evaluation heldout.txt"
    _, tok = load_model(folder)
    tokens = tokenize(tok, eval_text)
    calib = make_windows(tokenize(tok, calib_text), 128, SEQLEN, seed=0)
    return folder, calib, tokens, f"{about}, first {n_windows} windows of {SEQLEN}"


def kquants(args) -> None:
    import time

    from lowbit.mixes import mix_name
    from lowbit.model import load_model

    torch.set_num_threads(args.threads)
    folder, calib, tokens, about = setup(args.model, args.windows)
    windows = tokens[: args.windows * SEQLEN].view(args.windows, SEQLEN)
    model, tok = load_model(folder)
    imatrix = importance_matrix(model, calib) if args.imatrix else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f16 = os.path.join(tmp, "f16.gguf")
        # one general.name in every file (llama.cpp's copy keeps it), so the file sizes compare
        write_gguf(model, tok, {}, f16, "f16", name=args.model)
        rows.append(("original", "f16 (llama.cpp)", llama_cpp_ppl(f16, windows), None, None, os.path.getsize(f16),
                     block_bytes(f16)))
        for t in args.kquants:
            runs = [(f, None) for f in LLAMA_FTYPES[t] if f not in NEEDS_IMATRIX]
            runs += [(f, imatrix) for f in LLAMA_FTYPES[t] if imatrix is not None]
            for ftype, im in runs:
                path = os.path.join(tmp, f"{ftype}{'-imatrix' if im else ''}.gguf")
                if os.path.exists(path):  # asked for by an earlier type
                    continue
                llama_quantize(f16, path, ftype, args.threads, im)
                rows.append(("llama.cpp quantize" + (" + imatrix" if im else ""), ftype.removeprefix("MOSTLY_"),
                             llama_cpp_ppl(path, windows), None, None, os.path.getsize(path), block_bytes(path)))
                print(rows[-1], flush=True)
            if args.only_llama:
                continue
            algos = (["rtn-plain"] if args.rtn_plain else []) + (["rtn"] if args.rtn else []) + (["signround"] if args.iters else [])
            inputs = {None: [False], "also": [False, True], "only": [True]}[args.q8]
            for algo, q8 in [(a, q8) for q8 in inputs for a in algos]:
                scheme = (t.upper() if mix_name(t) else f"gguf:{t}") + ("-q8" if q8 else "")
                kind = f"{scheme} (lowbit's mix)" if mix_name(t) else f"{scheme} (all {t.upper()}, f32 outside the blocks)"
                m, _ = load_model(folder)
                t0 = time.perf_counter()
                algorithm = (lowbit.SignRound(iters=args.iters) if algo == "signround"
                             else lowbit.RTN(search=algo == "rtn"))
                r = lowbit.quantize(m, scheme, algorithm, calib, tokenizer=tok, nsamples=128, seqlen=SEQLEN,
                                    progress=False)
                seconds = time.perf_counter() - t0
                path = os.path.join(tmp, f"lowbit-{t}-{algo}{'-q8' if q8 else ''}.gguf")
                write_gguf(m, tok, r.layers, path, t, name=args.model)
                ref = perplexity(m, tokens=tokens, seqlen=SEQLEN, max_windows=args.windows)["ppl"]
                as_run = ref if q8 else ppl_as_llama_cpp_runs(m, r.layers, tokens, args.windows)
                who = {"signround": f"lowbit SignRound {args.iters} iters ({seconds:.0f} s)", "rtn": "lowbit RTN",
                       "rtn-plain": "lowbit RTN, min/max (no search)"}[algo]
                rows.append((who, kind, llama_cpp_ppl(path, windows), ref, as_run, os.path.getsize(path), block_bytes(path)))
                print(rows[-1], flush=True)
        for bits in args.plans or []:
            from lowbit.allocate.plan import make_plan, plan_schemes

            m, _ = load_model(folder)
            t0 = time.perf_counter()
            plan = make_plan(m, PLAN_OPTIONS, bits, calib[:16], tune_iters=args.plan_tune_iters)
            r = lowbit.quantize(m, "gguf:q3_k", lowbit.SignRound(iters=args.iters), calib, tokenizer=tok, nsamples=128,
                                seqlen=SEQLEN, overrides=plan_schemes(plan), progress=False)
            seconds = time.perf_counter() - t0
            path = os.path.join(tmp, f"lowbit-plan-{bits}.gguf")
            write_gguf(m, tok, r.layers, path, "q3_k", name=args.model)
            ref = perplexity(m, tokens=tokens, seqlen=SEQLEN, max_windows=args.windows)["ppl"]
            as_run = ppl_as_llama_cpp_runs(m, r.layers, tokens, args.windows)
            counts = {}
            for entry in plan["layers"].values():
                counts[entry["scheme"]] = counts.get(entry["scheme"], 0) + 1
            mix = ", ".join(f"{n} {o.removeprefix('gguf:').upper()}" for o, n in sorted(counts.items()))
            rows.append((f"lowbit plan, SignRound {args.iters} iters ({seconds:.0f} s with the plan)",
                         f"--target-bits {bits}: {plan['achieved_bits']:.3f} bits ({mix}), f32 outside the blocks",
                         llama_cpp_ppl(path, windows), ref, as_run, os.path.getsize(path), block_bytes(path)))
            print(rows[-1], flush=True)
    print(f"\n{about}\n")
    print("| quantizer | type | llama.cpp ppl | lowbit ppl (same weights) | lowbit ppl, inputs as llama.cpp rounds them "
          "| file MB | block weights MB |")
    print("|---|---|---|---|---|---|---|")
    for who, kind, ppl, ref, as_run, size, blocks in rows:
        show = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"| {who} | {kind} | {ppl:.4f} | {show(ref)} | {show(as_run)} | {size / 1e6:.2f} | {blocks / 1e6:.3f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=200)
    p.add_argument("--kquants", nargs="+", choices=list(LLAMA_FTYPES), help="the k-quant comparison instead")
    p.add_argument("--iters", type=int, default=200, help="SignRound's iterations; 0: no SignRound rows")
    p.add_argument("--model", choices=["pycode-7m", "smollm2"], default="pycode-7m")
    p.add_argument("--rtn", action="store_true", help="also lowbit's round to nearest of each type")
    p.add_argument("--rtn-plain", action="store_true",
                   help="also lowbit's round to nearest without the range search (RTN(search=False))")
    p.add_argument("--imatrix", action="store_true",
                   help="also llama.cpp's quantizer with an importance matrix from the calibration windows")
    p.add_argument("--only-llama", action="store_true", help="llama.cpp's quantizer only, no lowbit runs")
    p.add_argument("--q8", nargs="?", const="also", choices=["also", "only"],
                   help="also (or only) lowbit's runs of the -q8 schemes (tuned under llama.cpp's input rounding)")
    p.add_argument("--plans", nargs="+", type=float,
                   help="also --target-bits plans over Q2_K/Q3_K/Q4_K/Q6_K at these average bits (DeltaLoss after "
                        "--plan-tune-iters SignRound iterations per option, exact DP), with --kquants")
    p.add_argument("--plan-tune-iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama_cpp is not importable: pip install llama-cpp-python")
    if args.kquants:
        return kquants(args)
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
