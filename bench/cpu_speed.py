"""Why SignRound runs blocks in bf16 with fp32 attention on this CPU: the measurements.

    python bench/cpu_speed.py       # ~1 minute on 2 cores; run it alone

1. A pycode-7m-sized matmul (2048x256 @ 256x768) in fp32 and bf16.
2. Causal scaled-dot-product attention, forward + backward, at pycode-7m's shape (batch 8,
   8 heads, 256 tokens, head size 32) in fp32 and bf16.
3. SignRound ms/iteration on pycode-7m (W4A16, 32 windows of 256, 40 iterations) with amp off
   and on, and where the CPU time of an fp32 iteration goes (torch.profiler, one block).
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

PYCODE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets", "models", "pycode-7m")


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 256, dtype=dt), torch.randn(256, 768, dtype=dt)
        print(f"matmul 2048x256 @ 256x768 {str(dt):15s} {timed(lambda: a @ b, 200):6.2f} ms")
    for dt in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(8, 8, 256, 32, dtype=dt, requires_grad=True) for _ in range(3))

        def attention():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        print(f"attention fwd+bwd          {str(dt):15s} {timed(attention, 20):6.2f} ms")

    model, tok = load_model(PYCODE)
    windows = calibration_windows(tok, os.path.join(PYCODE, "calib.txt"), 32, 256, 0)
    for amp in (False, True):
        model, _ = load_model(PYCODE)
        r = lowbit.quantize(model, "W4A16", lowbit.SignRound(iters=40, amp=amp), windows, progress=False)
        ms = [b["seconds_per_iter"] * 1e3 for b in r.report["blocks"]]
        print(f"SignRound pycode-7m W4A16 amp={amp!s:5s}: {sum(ms) / len(ms):5.1f} ms/iter (mean of {len(ms)} blocks)")

    from torch.profiler import ProfilerActivity, profile

    model, _ = load_model(PYCODE)
    model.model.layers = model.model.layers[:1]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lowbit.quantize(model, "W4A16", lowbit.SignRound(iters=20, amp=False), windows, progress=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm"))
    att = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    print(f"fp32 SignRound on one pycode-7m block: matmuls {mm / total:.0%}, attention {att / total:.0%} of CPU time")


if __name__ == "__main__":
    main()
