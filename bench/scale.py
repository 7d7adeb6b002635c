"""Memory and time against depth and width: `lowbit quantize` streamed block by block from
random-weight bfloat16 checkpoints of real Llama shapes (sharded, written by this script), and
the real SmolLM2-135M. Every run is its own process; its peak resident memory is the kernel's
ru_maxrss for it. The in-memory Python API on the 1B shape is the baseline, in the same command.

    python bench/scale.py                          # everything below; ~40 min on 2 cores, 45 GB of disk
    python bench/scale.py --cases rtn-8B,rtn-8B-4L # a subset
    python bench/scale.py --work /big/disk         # where the checkpoints go (default bench/work)

Results: bench/results/scale.jsonl (one line per run) and bench/results/scale.md (the table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "..", "shared", "assets")
PYCODE = os.path.join(ASSETS, "models", "pycode-7m")

LLAMA = dict(max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, num_key_value_heads=8)
SHAPES = {  # Llama-3.2-1B, Llama-3.2-3B, Llama-3-8B
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               head_dim=128, vocab_size=128256, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
RTN = ["--algorithm", "rtn", "--scheme", "W4A16", "--format", "auto_round"]
SIGNROUND = ["--scheme", "W4A16", "--format", "auto_round", "--iters", "2", "--nsamples", "16", "--seqlen", "256",
             "--dataset", os.path.join(PYCODE, "calib.txt")]
# SignRound's tuning iterations at 1B width, the step compiled against eager, in float32 where bf16
# is not fast (where a 1B block is compiled by default; both forced here): ms per iteration.
SIGNROUND_I10 = [*SIGNROUND[:5], "10", *SIGNROUND[6:]]
# name -> (checkpoint: shape or "smollm2", layers or None for all, quantize arguments, in memory)
CASES = {
    "rtn-1B-memory": ("1B", None, RTN, True),
    "rtn-1B": ("1B", None, RTN, False),
    "rtn-3B": ("3B", None, RTN, False),
    "rtn-8B-4L": ("8B", 4, RTN, False),
    "rtn-8B": ("8B", None, RTN, False),
    "signround-1B-2L": ("1B", 2, SIGNROUND, False),
    "signround-1B": ("1B", None, SIGNROUND, False),
    "signround-1B-2L-i10-compiled": ("1B", 2, [*SIGNROUND_I10, "--compile"], False),
    "signround-1B-2L-i10-eager": ("1B", 2, [*SIGNROUND_I10, "--no-compile"], False),
    "rtn-smollm2": ("smollm2", None, RTN, False),
    "signround-smollm2": ("smollm2", None, SIGNROUND, False),
}


# SmolLM2-135M perplexity: wikitext2 test, the first 40 windows of 256 tokens; calibration on C4.
PPL_SCHEMES = ("W2A16G64", "W3A16", "W4A16")
PPL_EVAL = ["--eval-text", os.path.join(ASSETS, "text", "wikitext2_test.txt"), "--eval-seqlen", "256",
            "--eval-windows", "40"]
PPL_CALIB = ["--dataset", os.path.join(ASSETS, "text", "c4_validation_2k.parquet"), "--nsamples", "128",
             "--seqlen", "256"]


def run_ppl(scheme: str, algorithm: str, preset: str, work: str) -> dict:
    """One SmolLM2-135M run through the command line: quantize, then both perplexities."""
    src = subprocess.run([sys.executable, os.path.join(ASSETS, "scripts", "get_smollm2.py")], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    out = os.path.join(work, f"ppl-{scheme}-{algorithm}")
    shutil.rmtree(out, ignore_errors=True)
    args = ["--scheme", scheme, "--algorithm", algorithm, "--format", "fake", *PPL_EVAL]
    if algorithm == "signround":
        args += [*PPL_CALIB, "--preset", preset]
    rc, seconds, peak, stderr = measure([sys.executable, "-m", "lowbit.cli", "quantize", src, *args, "--out", out])
    r = {"case": f"ppl-smollm2-{scheme}-{algorithm}" + (f"-{preset}" if algorithm == "signround" else ""),
         "scheme": scheme, "algorithm": algorithm, "preset": preset if algorithm == "signround" else None,
         "seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 3), "rc": rc}
    if rc == 0:
        ev = json.load(open(os.path.join(out, "quantization.json")))["eval"]
        r |= {"ppl_fp": ev["ppl_original"], "ppl": ev["ppl_quantized"]}
    else:
        r["stderr"] = stderr[-2000:]
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(r), file=sys.stderr)
    return r


IDENTITY = """
import glob, hashlib, os, sys
import lowbit
from lowbit.export import export
from lowbit.job import quantize_folder
from lowbit.model import load_model
src, work, algo, text = sys.argv[1:5]
algorithm = lowbit.SignRound(iters=20) if algo == "signround" else lowbit.RTN()
kw = dict(nsamples=16, seqlen=256, seed=0)
m, tok = load_model(src)
r = lowbit.quantize(m, "W3A16", algorithm, text, tokenizer=tok, progress=False, **kw)
export(r, work + "/mem", "fake,auto_round", max_shard_size=100_000_000)
del m, r
quantize_folder(src, work + "/stream", "fake,auto_round", "W3A16", algorithm, text, progress=False,
                max_shard_size=100_000_000, **kw)
def h(d):
    return {os.path.relpath(f, d): hashlib.sha256(open(f, "rb").read()).hexdigest()
            for f in sorted(glob.glob(d + "/**/*.safetensors", recursive=True))}
a, b = h(work + "/mem"), h(work + "/stream")
print(len(a), "weight files,", "byte-identical" if a == b else "DIFFERENT")
sys.exit(0 if a == b else 1)
"""


def run_identity(algorithm: str, work: str) -> dict:
    """SmolLM2-135M at W3A16 in memory (lowbit.quantize + export) and streamed (quantize_folder):
    the sha256 of every weight file, compared."""
    src = subprocess.run([sys.executable, os.path.join(ASSETS, "scripts", "get_smollm2.py")], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    folder = os.path.join(work, f"identity-{algorithm}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    p = subprocess.run([sys.executable, "-c", IDENTITY, src, folder, algorithm,
                        os.path.join(ASSETS, "text", "wikitext2_valid.tokens")], capture_output=True, text=True)
    shutil.rmtree(folder, ignore_errors=True)
    r = {"case": f"identity-smollm2-{algorithm}", "rc": p.returncode, "result": p.stdout.strip()[-200:]}
    print(json.dumps(r), file=sys.stderr)
    return r


def write_checkpoint(folder: str, shape: str, layers: int | None, seed: int = 0) -> int:
    """A random-weight bf16 Llama of `shape` (its first `layers` blocks) as 2 GB safetensors
    shards, with pycode-7m's tokenizer; returns its size in bytes. Written a tensor at a time."""
    import torch
    import transformers

    from lowbit.checkpoint import ShardWriter
    from lowbit.model import stored_names

    if os.path.isfile(os.path.join(folder, "config.json")):
        return _size(folder)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cfg = SHAPES[shape] | LLAMA | ({"num_hidden_layers": layers} if layers else {})
    config = transformers.LlamaConfig(**cfg, bos_token_id=0, eos_token_id=1)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    state = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    w = ShardWriter(tmp, "model", 2_000_000_000)
    for name in stored_names(model):
        shape_ = state[name].shape
        t = torch.ones(shape_) if name.endswith("norm.weight") else torch.randn(shape_, generator=g) * 0.02
        w.add(name, t.to(torch.bfloat16))
        del t
    w.close()
    config.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(PYCODE, f), tmp)
    os.rename(tmp, folder)
    return _size(folder)


def _size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


IN_MEMORY = """
import sys, lowbit
from lowbit.export import export
from lowbit.model import load_model
model, tok = load_model(sys.argv[1])
r = lowbit.quantize(model, "W4A16", "rtn", progress=False)
export(r, sys.argv[2], "auto_round")
"""


# Runs the command as its only child and prints that child's peak RSS (kB) last on stderr.
PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def measure(cmd: list[str]) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS in bytes, stderr) of cmd run in a process of its own."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    *rest, peak = p.stderr.rstrip().splitlines()
    return p.returncode, seconds, int(peak) * 1024, "\n".join(rest)


def run_case(name: str, work: str) -> dict:
    shape, layers, args, in_memory = CASES[name]
    if shape == "smollm2":
        src = subprocess.run([sys.executable, os.path.join(ASSETS, "scripts", "get_smollm2.py")], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        size = _size(src)
    else:
        src = os.path.join(work, f"llama-{shape}" + (f"-{layers}L" if layers else ""))
        t0 = time.perf_counter()
        size = write_checkpoint(src, shape, layers)
        print(f"{name}: checkpoint {src} ({size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    out = os.path.join(work, "out-" + name)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + ".partial", ignore_errors=True)
    if in_memory:
        cmd = [sys.executable, "-c", IN_MEMORY, src, out]
    else:
        cmd = [sys.executable, "-m", "lowbit.cli", "quantize", src, *args, "--out", out, "--quiet"]
    rc, seconds, peak, stderr = measure(cmd)
    r = {"case": name, "checkpoint": src, "checkpoint_gb": round(size / 1e9, 3), "layers": _layers(src),
         "in_memory": in_memory, "args": " ".join(args) if not in_memory else "python API, W4A16 rtn, auto_round",
         "seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 3), "rc": rc,
         "output_gb": round(_tree_size(out) / 1e9, 3)}
    if rc != 0:
        r["stderr"] = stderr[-2000:]
    elif not in_memory and "rtn" not in args:  # SignRound: how long its iterations took, and compiled or not
        with open(os.path.join(out, "quantization.json")) as f:
            blocks = json.load(f)["blocks"]
        r |= {"ms_per_iter": [round(b["seconds_per_iter"] * 1e3) for b in blocks],
              "compiled": [b["compiled"] for b in blocks]}
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(r), file=sys.stderr)
    return r


def _layers(folder: str) -> int:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["num_hidden_layers"]


def _tree_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def cpu_kind() -> str:
    flags = ""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), name)
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    isa = "AVX512-BF16" if "avx512_bf16" in flags else ("AVX2 only" if "avx2" in flags else "no AVX2")
    return f"{name}, {isa}, {os.cpu_count()} cores"


def table(results: list[dict]) -> str:
    rows = ["| case | layers | checkpoint (GB) | run | wall (s) | peak RSS (GB) | peak / checkpoint |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['case']} | {r['layers']} | {r['checkpoint_gb']:.2f} | {r['args']} | {r['seconds']:.0f} | "
                    f"{r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / r['checkpoint_gb']:.2f} |")
    by = {r["case"]: r for r in results}
    notes = []
    for big, small, floor in (("rtn-8B", "rtn-8B-4L", 1.15), ("signround-1B", "signround-1B-2L", 1.15),
                              ("rtn-1B-memory", "rtn-1B", None)):
        if big in by and small in by:
            ratio = by[big]["peak_rss_gb"] / by[small]["peak_rss_gb"]
            notes.append(f"- peak RSS {big} / {small}: {ratio:.2f}" + (f" (floor: at most {floor})" if floor else ""))
    return "\n".join(rows + [""] + notes) + "\n"


def ppl_table(rows: list[dict]) -> str:
    out = ["", "| SmolLM2-135M | scheme | wikitext2 ppl (fp) | ppl | wall (s) | peak RSS (GB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = r["algorithm"] + (f" ({r['preset']})" if r["preset"] else "")
        out.append(f"| {name} | {r['scheme']} | {r.get('ppl_fp', float('nan')):.2f} | {r.get('ppl', float('nan')):.2f} | "
                   f"{r['seconds']:.0f} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(out) + "\n"


def _log(out: str, r: dict) -> None:
    with open(out + ".jsonl", "a") as f:
        f.write(json.dumps(r | {"cpu": cpu_kind(), "date": time.strftime("%Y-%m-%d")}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="where checkpoints and outputs go")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "scale"))
    ap.add_argument("--ppl", default="", help="SmolLM2-135M perplexity runs, e.g. 'rtn,signround' (default: none)")
    ap.add_argument("--ppl-schemes", default=",".join(PPL_SCHEMES))
    ap.add_argument("--ppl-preset", default="light", help="SignRound preset for the perplexity runs (default light)")
    ap.add_argument("--identity", default="", help="streamed vs in-memory bytes on SmolLM2-135M, e.g. 'rtn,signround'")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    results, ppl = [], []
    for name in filter(None, args.cases.split(",")):
        results.append(run_case(name.strip(), args.work))
        _log(args.out, results[-1])
    for algorithm in filter(None, args.ppl.split(",")):
        for scheme in args.ppl_schemes.split(","):
            ppl.append(run_ppl(scheme, algorithm, args.ppl_preset, args.work))
            _log(args.out, ppl[-1])
    same = [run_identity(a, args.work) for a in filter(None, args.identity.split(","))]
    for r in same:
        _log(args.out, r)
    text = f"CPU: {cpu_kind()}\n\n" + (table(results) if results else "") + (ppl_table(ppl) if ppl else "")
    text += "".join(f"\n- {r['case']}: {r['result']}" for r in same)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
