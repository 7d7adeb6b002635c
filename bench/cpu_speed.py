"""Why SignRound tunes the way it does on a CPU with fast bf16 (AVX512-BF16 / AMX): the measurements.

    python bench/cpu_speed.py       # ~4 minutes on 2 cores; run it alone

1. A pycode-7m-sized matmul (2048x256 @ 256x768) in fp32 and bf16.
2. Causal attention, forward + backward, at pycode-7m's shape (batch 8, 8 query heads sharing 4
   key/value heads, 256 tokens, head size 32) and stories260K's (head size 8): torch's SDPA in fp32
   and bf16, and lowbit's bf16 attention (lowbit/algorithms/cpu_attention.py).
3. The quantize-dequantize of a pycode-7m block's weights (786k, W4 G128), forward + backward:
   autograd through the reference formula vs the fused one with its written-out backward.
4. SignRound ms/iteration on both models (W4A16, 32 windows of 256, 40 iterations), amp off and on.
5. The work outside the tuning loop on pycode-7m: quantize() with 128 windows and 1 iteration,
   amp off and on (on: the targets and next-block inputs are computed in bf16 too).
6. Where the CPU time of one default (amp) iteration on a pycode-7m block goes (torch.profiler).
7. The compiled tuning step (SignRound(compile=True)) against eager on pycode-7m W4A16 (128 windows
   of 256, 100 iterations), each in a fresh process that loads its windows as a tensor (as
   compare.py's runs do): ms/iteration on blocks 1-5 (block 0 pays the compile) and block 0's
   extra seconds. Then the same compiled run with glibc's default malloc thresholds (lowbit's
   mallopt call skipped): seconds and minor page faults. Each twice, interleaved, after one
   compiled run with an empty compile cache (which leaves the cache warm for the others).
   Then with inductor's vector-ISA probe (one Python subprocess per ISA, which lowbit skips where
   ATen has vouched for the ISAs): block 0's extra seconds.
   `python bench/cpu_speed.py compile` runs this part alone.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lowbit  # noqa: E402
from lowbit.calib import calibration_windows  # noqa: E402
from lowbit.model import load_model  # noqa: E402

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")
PYCODE = os.path.join(ASSETS, "models", "pycode-7m")
STORIES = os.path.join(ASSETS, "models", "stories260K")
STORIES_TEXT = os.path.join(ASSETS, "text", "tinystories_valid_prefix.txt")


def timed(fn, reps: int, rounds: int = 5) -> float:
    """ms per call: the best of `rounds` rounds of `reps` calls (as timeit), which leaves out the
    other work of a shared machine."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps * 1e3)
    return best


def main():
    if sys.argv[1:] == ["compile"]:  # section 7 alone
        return compiled_step()
    from lowbit.algorithms.cpu_attention import attention as bf16_attention
    from lowbit.qdq.int import fake_quantize_groups, fake_quantize_tuned, group_range

    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 256, dtype=dt), torch.randn(256, 768, dtype=dt)
        print(f"matmul 2048x256 @ 256x768 {str(dt):15s} {timed(lambda: a @ b, 200):6.2f} ms")

    for d in (32, 8):
        for name, dt, fn in [
            ("torch SDPA", torch.float32, lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True)),
            ("torch SDPA", torch.bfloat16, lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True)),
            ("lowbit bf16 attention", torch.bfloat16, lambda *t: bf16_attention(*t, is_causal=True)),
        ]:
            q = torch.randn(8, 8, 256, d, dtype=dt, requires_grad=True)
            k, v = (torch.randn(8, 4, 256, d, dtype=dt, requires_grad=True) for _ in range(2))
            ms = timed(lambda: fn(q, k, v).sum().backward(), 20)
            print(f"attention fwd+bwd, head size {d:2d}: {name:22s} {str(dt):15s} {ms:6.2f} ms")

    rows = 786432 // 128
    wg, bits = torch.randn(rows, 128), torch.full((rows, 1), 4.0)
    v = torch.zeros_like(wg, requires_grad=True)
    mn, mx = (torch.ones(rows, 1, requires_grad=True) for _ in range(2))
    g, wrange = torch.randn(rows, 128).bfloat16(), group_range(wg)
    ref = timed(lambda: fake_quantize_groups(wg, bits, True, v, mn, mx).to(torch.bfloat16).backward(g), 50)
    fused = timed(lambda: fake_quantize_tuned(wg, bits, True, v, mn, mx, wrange, torch.bfloat16).backward(g), 50)
    print(f"quantize-dequantize fwd+bwd, 786k weights: autograd {ref:5.2f} ms, fused {fused:5.2f} ms")

    for name, path, calib, scheme in [
        ("pycode-7m", PYCODE, os.path.join(PYCODE, "calib.txt"), "W4A16"),
        ("stories260K", STORIES, STORIES_TEXT, "W4A16G32"),
    ]:
        model, tok = load_model(path)
        windows = calibration_windows(tok, calib, 32, 256, 0)
        for amp in (False, True):
            model, _ = load_model(path)
            r = lowbit.quantize(model, scheme, lowbit.SignRound(iters=40, amp=amp), windows, progress=False)
            ms = [b["seconds_per_iter"] * 1e3 for b in r.report["blocks"]]
            print(f"SignRound {name} {scheme} amp={amp!s:5s}: {sum(ms) / len(ms):5.1f} ms/iter (mean of {len(ms)} blocks)")

    # The work outside the tuning loop (targets and next-block inputs for 128 windows, capture,
    # final rounding): a whole quantize() with one iteration, in fp32 and in the tuning dtype.
    model, tok = load_model(PYCODE)
    windows = calibration_windows(tok, os.path.join(PYCODE, "calib.txt"), 128, 256, 0)
    for amp in (False, True):
        model, _ = load_model(PYCODE)
        r = lowbit.quantize(model, "W4A16", lowbit.SignRound(iters=1, amp=amp), windows, progress=False)
        print(f"quantize() pycode-7m W4A16, 128 windows, iters 1, amp={amp!s:5s}: {r.report['seconds']:5.1f} s")

    from torch.profiler import ProfilerActivity, profile

    model, tok = load_model(PYCODE)
    windows = calibration_windows(tok, os.path.join(PYCODE, "calib.txt"), 32, 256, 0)
    model.model.layers = model.model.layers[:1]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lowbit.quantize(model, "W4A16", lowbit.SignRound(iters=20), windows, progress=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    parts = {
        "matmuls": ("aten::mm", "aten::addmm"),
        "attention (bmm, softmax)": ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data"),
    }
    shares = {k: sum(e.self_cpu_time_total for e in events if e.key in keys) / total for k, keys in parts.items()}
    # the fused quantize-dequantize's own ops are its children: count them inclusively
    shares["quantize-dequantize"] = sum(e.cpu_time_total for e in events if e.key in ("_RoundTrip", "_RoundTripBackward")) / total
    print("default SignRound on one pycode-7m block, share of CPU time: "
          + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()) + f", rest {1 - sum(shares.values()):.0%}")

    compiled_step()


CHILD = """
import os, resource, sys, time
sys.path.insert(0, {root!r})
import torch
import lowbit
from lowbit import host
from lowbit.calib import calibration_windows
from lowbit.model import load_model
if {plain_malloc}:  # tuned_process without its parts, one at a time
    host._mallopt = lambda: None
if {isa_probe}:
    host._isa_list_without_probe = lambda: None
model, tok = load_model({path!r})
windows = torch.load({windows!r}, weights_only=True)  # as bench/compare.py's runs get them
t = time.perf_counter()
with host.tuned_process():  # as the lowbit command runs
    r = lowbit.quantize(model, "W4A16", lowbit.SignRound(iters=100, compile={compile}), windows, progress=False)
s = time.perf_counter() - t
b = r.report["blocks"]
later = sum(x["seconds_per_iter"] for x in b[1:]) / (len(b) - 1)
print(s, later * 1e3, b[0]["seconds"] - later * 100, resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
"""


def compiled_step():
    import subprocess
    import tempfile

    _, tok = load_model(PYCODE)
    windows_file = os.path.join(tempfile.mkdtemp(prefix="lowbit-cpu-speed-"), "windows.pt")
    torch.save(calibration_windows(tok, os.path.join(PYCODE, "calib.txt"), 128, 256, 0), windows_file)

    def child(compile: bool, plain_malloc: bool = False, isa_probe: bool = False, cold: bool = False):
        code = CHILD.format(root=os.path.join(os.path.dirname(__file__), ".."), path=PYCODE, compile=compile,
                            plain_malloc=plain_malloc, isa_probe=isa_probe, windows=windows_file)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="lowbit-cold-")) if cold else None
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        return [float(x) for x in out.stdout.split()]

    total, ms, extra, faults = child(True, cold=True)  # an empty compile cache: what a first run pays
    print(f"SignRound pycode-7m W4A16, 100 iters, {'compiled, cold cache':32s}: {total:5.1f} s, blocks 1-5 "
          f"{ms:5.1f} ms/iter, block 0 +{extra:4.1f} s")

    # Each configuration twice, interleaved, so that a slow minute of a shared machine shows up as
    # a spread rather than as a difference between them.
    runs = [("eager", False, False, False), ("compiled", True, False, False),
            ("compiled, glibc malloc defaults", True, True, False), ("compiled, inductor's ISA probe", True, False, True)]
    results = {name: [] for name, *_ in runs}
    for _ in range(2):
        for name, compile, plain, probe in runs:
            results[name].append(child(compile, plain, probe))
    for name, rows in results.items():
        for total, ms, extra, faults in rows:
            print(f"SignRound pycode-7m W4A16, 100 iters, {name:32s}: {total:5.1f} s, blocks 1-5 {ms:5.1f} ms/iter, "
                  f"block 0 +{extra:4.1f} s, {faults / 1e6:5.2f}M minor page faults")


if __name__ == "__main__":
    main()
