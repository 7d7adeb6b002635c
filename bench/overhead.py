"""What SignRound's machinery costs on top of the matmuls it cannot avoid (issue 19).

    python bench/overhead.py                          # every shape below; run it alone
    python bench/overhead.py --shapes pycode-7m smollm2 --reps 20
    python bench/overhead.py --shapes smollm2 --block 15 --losses mse relative   # SignRound's two losses

For one block of each shape, the same minibatch (8 windows of 256 tokens), the same dtype and
autocast SignRound picks on this CPU, the same threads:

  plain   forward + backward of the block with float weights that take gradients, MSE loss
          against targets: the work any gradient-based tuning must do
  tuning  one SignRound iteration as its loop runs it (W4A16 G128 and W2A16 G64): the
          quantize-dequantize of all the block's layers, forward, backward, the signed step

Each is timed per iteration, in rounds that alternate plain and tuning (a shared machine's slow
spells hit both); the table gives the best and the median iteration and their ratios. Shapes:
pycode-7m (block 1 of the real model), SmolLM2-135M (real; ../shared/assets/scripts/get_smollm2.py,
see lowbit's README), and random-weight Llama blocks of Llama-3.2-1B's and Llama-3-8B's widths.
Rows go to bench/results/overhead.jsonl with the CPU kind, dtype and threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import lowbit  # noqa: E402
from lowbit.algorithms.cpu_attention import attention_context  # noqa: E402
from lowbit.model import block_output, load_model, run_block  # noqa: E402
from lowbit.pipeline import prepare  # noqa: E402

ASSETS = os.path.join(HERE, "..", "..", "shared", "assets")
SMOLLM2 = os.path.expanduser("~/.cache/lowbit-assets/SmolLM2-135M-Instruct")
# name -> folder, or a Llama config (hidden, intermediate, heads, kv heads)
SHAPES = {
    "pycode-7m": os.path.join(ASSETS, "models", "pycode-7m"),
    "smollm2": SMOLLM2,
    "1B": (2048, 8192, 32, 8),
    "8B": (4096, 14336, 32, 8),
}
ITERS = 200  # the run whose defaults (compile or not) the tuning iteration takes
SCHEMES = ["W4A16", "W2A16G64"]
BATCH, SEQLEN = 8, 256


def cpu_kind() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    kind = "AMX" if " amx_bf16" in info else "AVX512-BF16" if " avx512_bf16" in info else (
        "AVX512" if " avx512f" in info else "AVX2" if " avx2" in info else "no AVX2")
    return f"{name}, {kind}"


def random_llama(hidden: int, inter: int, heads: int, kv: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=1, vocab_size=256,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model


def block_setup(shape: str, block_index: int = 1):
    """(block, inputs [8, 256, hidden], kwargs, targets) under the autocast SignRound uses here;
    block `block_index` of a real model (of the random ones, the first)."""
    src = SHAPES[shape]
    if isinstance(src, str):
        if not os.path.isdir(src):
            raise SystemExit(f"{shape}: no model folder at {src}")
        model, _ = load_model(src)
        index = block_index
    else:
        model, index = random_llama(*src), 0
    vocab = model.get_input_embeddings().weight.shape[0]
    windows = torch.randint(0, vocab, (BATCH, SEQLEN), generator=torch.Generator().manual_seed(0))
    algo = lowbit.SignRound(iters=1)
    run = prepare(model, "W4A16", algo, windows, nsamples=BATCH, seqlen=SEQLEN)
    x = run.q_in
    for i in range(index):  # the inputs of block `index`
        x = run_block(run.blocks[i], x, run.kwargs[i], BATCH, run.fwd_dtype)
    block, kwargs = run.blocks[index], run.kwargs[index]
    with attention_context(run.fwd_dtype, x.device, block):
        targets = run_block(block, x, kwargs, BATCH, run.fwd_dtype)
    return run, block, x, kwargs, targets, index


def _timed(step, reps: int) -> tuple[float, float]:
    """(min, median) ms of step() over reps calls after one warm-up call. The min is the cleanest
    estimate on a shared machine; the median says how typical it is."""
    step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[0], times[len(times) // 2]


def plain_ms(block, x, kwargs, targets, amp, reps: int) -> tuple[float, float]:
    """forward + backward with the block's weights taking gradients, on the first minibatch."""
    params = [p for p in block.parameters()]
    autocast = torch.autocast("cpu", dtype=amp) if amp is not None else torch.autocast("cpu", enabled=False)
    xb, tb = x[:BATCH], targets[:BATCH]

    def step():
        with autocast:
            out = block_output(block(xb, **kwargs))
            loss = F.mse_loss(out.float(), tb.float())
        loss.backward()
        for p in params:
            p.grad = None

    for p in params:
        p.requires_grad_(True)
    with attention_context(amp, x.device, block):
        return _timed(step, reps)


def tuning_ms(run, block, x, kwargs, targets, index, scheme: str, reps: int, **settings) -> tuple[tuple, str | None]:
    """One SignRound iteration as the tuning loop runs it (signround._Tuner: the quantize-dequantize
    of every layer, forward, backward, the signed step), timed alone, after a warm-up (and compile).
    Its settings by default are those of a whole model's run at ITERS iterations."""
    from lowbit.algorithms import signround as sr
    from lowbit.algorithms.base import BlockData
    from lowbit.schemes import get_scheme

    s = get_scheme(scheme)
    layers = {n: (lin, s) for n, lin in run.block_layers[index].items()}
    algo = lowbit.SignRound(iters=max(reps + 1, ITERS), prescale=False, **settings)
    buckets = sr._buckets(algo, layers, {})
    params = [p for b in buckets for p in b.params(algo.tune_minmax)]
    tuner = sr._Tuner(algo, block, buckets, BlockData(x, kwargs, targets), x.dtype, 0, {})
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    t = [0]

    def step():
        tuner.first_step(next(tuner.batches), params) if t[0] == 0 else tuner.loss_and_backward(next(tuner.batches))
        tuner.signed_step(t[0], params)
        t[0] += 1

    try:
        with sr.attention_context(tuner.amp, tuner.device, block):
            return _timed(step, reps), tuner.mode
    finally:
        for p in frozen:
            p.requires_grad_(True)


def wake_ms(reps: int = 200) -> dict:
    """The cost of an elementwise op right after a matmul, against alone: on a VM whose OpenMP
    threads sleep between parallel regions, the op after the matmul waits for them to wake.
    Shapes: pycode-7m's MLP on 8 x 256 tokens. (Try OMP_WAIT_POLICY / GOMP_SPINCOUNT in the
    environment to see what waiting differently changes.)"""
    x, w = torch.randn(2048, 256), torch.randn(768, 256)
    a, b = torch.randn(2048, 768), torch.randn(2048, 768)

    def per_call(fn):
        for _ in range(5):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3

    mm, mul, both = per_call(lambda: F.linear(x, w)), per_call(lambda: a * b), per_call(lambda: (F.linear(x, w), a * b))
    return {"matmul_ms": mm, "mul_alone_ms": mul, "mul_after_matmul_ms": both - mm}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--schemes", nargs="+", default=SCHEMES)
    ap.add_argument("--reps", type=int, default=0, help="timed iterations per round (default: 30; 3 for 1B/8B)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of plain and tuning, alternating")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--block", type=int, default=1, help="which block of a real model (default 1)")
    ap.add_argument("--losses", nargs="+", choices=["mse", "relative"], default=[lowbit.SignRound.loss],
                    help="SignRound's loss (default: its default); several are timed alternating in each round")
    ap.add_argument("--label", default="", help="a note stored with each row")
    ap.add_argument("--wake", action="store_true", help="only the matmul-then-elementwise wake-up timing")
    args = ap.parse_args()
    if args.wake:
        print(f"CPU: {cpu_kind()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
              + ", ".join(f"{k} {v:.2f}" for k, v in wake_ms().items()))
        return
    settings = {}
    if args.amp != "auto":
        settings["amp"] = args.amp == "on"
    if args.compile != "auto":
        settings["compile"] = args.compile == "on"
    cpu = cpu_kind()
    out = os.path.join(HERE, "results", "overhead.jsonl")
    print(f"CPU: {cpu}; threads {torch.get_num_threads()}; torch {torch.__version__}")
    print(f"{'':41s} {'--- best iteration ---':>27s}   {'--- median iteration ---':>27s}")
    print(f"{'shape':10s} {'scheme':10s} {'loss':9s} {'dtype':9s} {'plain ms':>9s} {'tuning ms':>10s} {'ratio':>6s}"
          f"   {'plain ms':>9s} {'tuning ms':>10s} {'ratio':>6s}")
    for shape in args.shapes:
        run, block, x, kwargs, targets, index = block_setup(shape, args.block)
        algo = lowbit.SignRound(**settings)
        amp = algo.tuning_dtype(x.device)
        reps = args.reps or (3 if isinstance(SHAPES[shape], tuple) else 30)
        for scheme in args.schemes:
            # plain and tuning alternate, so a slow spell of a shared machine hits both
            base, ms, mode = [], {loss: [] for loss in args.losses}, None
            for _ in range(args.rounds):
                base.append(plain_ms(block, x, kwargs, targets, amp, reps))
                for loss in args.losses:
                    t, mode = tuning_ms(run, block, x, kwargs, targets, index, scheme, reps, **settings, loss=loss)
                    ms[loss].append(t)
            b_min, b_med = min(b[0] for b in base), min(b[1] for b in base)
            for loss, times in ms.items():
                t_min, t_med = min(t[0] for t in times), min(t[1] for t in times)
                row = {"shape": shape, "block": index, "scheme": scheme, "loss": loss, "cpu": cpu,
                       "threads": torch.get_num_threads(),
                       "dtype": str(amp or x.dtype).removeprefix("torch."), "compiled": mode,
                       "tokens": BATCH * SEQLEN, "plain_ms": round(b_min, 2), "tuning_ms": round(t_min, 2),
                       "ratio": round(t_min / b_min, 3), "plain_median_ms": round(b_med, 2),
                       "tuning_median_ms": round(t_med, 2), "ratio_median": round(t_med / b_med, 3),
                       "reps": reps, "rounds": args.rounds, "label": args.label,
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "date": time.strftime("%Y-%m-%d %H:%M")}
                print(f"{shape:10s} {scheme:10s} {loss:9s} {row['dtype']:9s} {b_min:9.1f} {t_min:10.1f} {t_min / b_min:6.2f}"
                      f"   {b_med:9.1f} {t_med:10.1f} {t_med / b_med:6.2f}"
                      + (f"  (compiled: {mode})" if mode else ""), flush=True)
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        del run, block, x, targets


if __name__ == "__main__":
    main()
