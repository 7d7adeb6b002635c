"""SignRound's compiled tuning step: when it is chosen, that it tunes as eager does, that it is
deterministic, and that a failing compile falls back to eager for the rest of that run only."""
import os
import shutil

import pytest
import torch

import lowbit
from lowbit.algorithms import signround
from lowbit.algorithms.signround import COMPILE_MIN_WORK, FP32_COMPILE_MIN_WEIGHTS, SignRound, _compile_mode
from lowbit.calib import make_windows, tokenize
from lowbit.model import load_model

from conftest import STORIES


def test_compile_mode():
    cpu, cuda, bf, w = torch.device("cpu"), torch.device("cuda"), torch.bfloat16, 10**6
    assert _compile_mode(SignRound(), cpu, bf, COMPILE_MIN_WORK, w, {}) == "step"
    assert _compile_mode(SignRound(), cpu, bf, COMPILE_MIN_WORK / 2, w, {}) is None  # small: eager is faster
    # float32: only blocks with many weights, where the eager quantize-dequantize is slow
    assert _compile_mode(SignRound(), cpu, None, 100 * COMPILE_MIN_WORK, w, {}) is None
    assert _compile_mode(SignRound(), cpu, None, COMPILE_MIN_WORK, FP32_COMPILE_MIN_WEIGHTS, {}) == "step"
    assert _compile_mode(SignRound(), cpu, None, COMPILE_MIN_WORK / 2, FP32_COMPILE_MIN_WEIGHTS, {}) is None
    assert _compile_mode(SignRound(), cuda, bf, 0, w, {}) == "qdq"
    assert _compile_mode(SignRound(compile=True), cpu, None, 0, w, {}) == "step"
    assert _compile_mode(SignRound(compile=False), cpu, bf, 100 * COMPILE_MIN_WORK, w, {}) is None
    # a failure earlier in the same run; a new run (a new dict) tries again
    assert _compile_mode(SignRound(compile=True), cpu, bf, 0, w, {"compile_failed": "earlier failure"}) is None


@pytest.fixture(scope="module")
def windows(stories_text):
    _, tok = load_model(STORIES)
    return make_windows(tokenize(tok, stories_text[0]), 16, 128, seed=0)


def run(windows, amp=True, **algo):
    model, _ = load_model(STORIES)
    r = lowbit.quantize(model, "W4A16G32", SignRound(iters=12, batch_size=4, amp=amp, **algo), windows, seed=1,
                        progress=False)
    return r


def same_codes(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n].codes, b[n].codes) and torch.equal(a[n].scale, b[n].scale)
                                        for n in a)


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize("amp", [True, False], ids=["bf16", "fp32"])
def test_compiled_step_tunes_like_eager(windows, amp):
    eager = run(windows, amp, compile=False)
    compiled = run(windows, amp, compile=True)
    again = run(windows, amp, compile=True)
    assert [b["compiled"] for b in compiled.report["blocks"]] == ["step"] * 5
    assert [b["compiled"] for b in eager.report["blocks"]] == [None] * 5
    assert same_codes(compiled.layers, again.layers)  # deterministic
    # Same steps, fused kernels: block 0's first loss (same inputs, same weights) agrees closely.
    # After that, rounding differences flip a few signs and later blocks see other inputs: the best
    # losses stay close.
    e_blocks, c_blocks = eager.report["blocks"], compiled.report["blocks"]
    assert c_blocks[0]["loss_first"] == pytest.approx(e_blocks[0]["loss_first"], rel=2e-3)
    for e, c in zip(e_blocks, c_blocks):
        assert c["loss_best"] == pytest.approx(e["loss_best"], rel=0.05)


def test_failed_compile_falls_back_to_eager(windows, monkeypatch):
    calls = []

    def broken():
        def step(*args):
            calls.append(1)
            raise RuntimeError("InductorError: no C++ compiler found\nmore detail")
        return step

    monkeypatch.setattr(signround, "_compiled_step", broken)
    with pytest.warns(UserWarning, match="torch.compile failed, tuning eager instead .RuntimeError: InductorError"):
        fallen = run(windows, compile=True)
    assert [b["compiled"] for b in fallen.report["blocks"]] == [None] * 5
    assert len(calls) == 1  # not retried for later blocks of the run
    assert same_codes(fallen.layers, run(windows, compile=False).layers)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        run(windows, compile=True)
    assert len(calls) == 2  # the next run tries again: the failure belonged to the first one


ISA_LIST = """
import sys
from contextlib import nullcontext
from lowbit.host import before_compile, tuned_process
from torch._inductor import cpu_vec_isa
before_compile()  # outside tuned_process: nothing
print(cpu_vec_isa.valid_vec_isa_list.cache_info().currsize)
with tuned_process() if sys.argv[1] == "skip" else nullcontext():
    before_compile()
    print(" ".join(str(i) for i in cpu_vec_isa.valid_vec_isa_list()))
    print(cpu_vec_isa.valid_vec_isa_list.cache_info().currsize)
print(cpu_vec_isa.valid_vec_isa_list.cache_info().currsize)
"""


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="the probe builds with a C++ compiler")
def test_skipping_the_isa_probe_finds_the_same_isas():
    """The vector ISAs inductor compiles for: taken from ATen's CPU check without the probe
    subprocesses, they are the ones torch's own probes find (each in a fresh process: both are
    cached for the process)."""
    import subprocess
    import sys

    def isas(how):
        out = subprocess.run([sys.executable, "-c", ISA_LIST, how], capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    from torch._inductor import cpu_vec_isa

    skip, probe = isas("skip"), isas("probe")
    assert skip[0] == probe[0] == "0"
    assert skip[1] == probe[1]
    if "amx_tile" not in cpu_vec_isa.x86_isa_checker():  # with AMX torch's own probe runs
        assert skip[2:] == ["1", "0"]  # taken inside tuned_process, forgotten on leaving it
