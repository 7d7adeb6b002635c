"""GPU timings on Llama-3-8B shapes with random weights (timing only; needs CUDA).

    python bench/gpu.py kernel            # QuantLinear (Triton) vs fp16 matmul, per layer shape
    python bench/gpu.py signround         # lowbit W4G128 iters 200 on 8B-shaped blocks -> whole-model projection
    python bench/gpu.py signround --auto-round   # the same run through auto-round, when importable

The 8B shape: hidden 4096, MLP 14336, 32 heads, 8 KV heads, 32 blocks. Only --layers blocks are
built; the per-block time is extrapolated to 32 blocks (blocks are identical in cost).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {  # name: (out_features, in_features) of Llama-3-8B
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
BLOCKS_8B = 32


def bench_kernel(args) -> list[dict]:
    import triton.testing

    from lowbit.quantized import quantize_weight
    from lowbit.runtime import QuantLinear
    from lowbit.schemes import Scheme
    from lowbit.runtime.triton_matmul import quant_matmul

    rows = []
    for bits in args.bits:
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device="cuda")
            q = quantize_weight(w, Scheme(bits, 128, True))
            layer = QuantLinear.from_quantized(q).cuda()
            w16 = q.dequantize(torch.float16)
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                err = (quant_matmul(x, layer).float() - (x @ w16.t()).float()).abs().max().item()
                t16 = triton.testing.do_bench(lambda: x @ w16.t(), warmup=50, rep=200)
                tdq = triton.testing.do_bench(lambda: x @ layer.dequantize(torch.float16), warmup=50, rep=200)
                tq = triton.testing.do_bench(lambda: quant_matmul(x, layer), warmup=50, rep=200)
                row = {"bits": bits, "layer": name, "n": n, "k": k, "m": m, "fp16_us": t16 * 1e3, "quant_us": tq * 1e3, "dequant_then_mm_us": tdq * 1e3,
                       "speedup": t16 / tq, "max_abs_err": err}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def make_model(layers: int, dtype=torch.bfloat16):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=8192, rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def _tokenizer(path):
    """auto-round insists on a tokenizer object even when given token ids: any local one will do."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.model_max_length = 1 << 20  # else auto-round cuts seqlen to the tokenizer's limit
    return tok


class _BlockTimes:
    """Per-block times of auto-round, read off its log lines ("quantized N/N layers in the block")."""

    def __init__(self):
        import logging

        self.stamps = []
        handler = logging.Handler()
        handler.emit = lambda rec: self.stamps.append(time.perf_counter()) if "layers in the block" in rec.getMessage() else None
        logging.getLogger("autoround").addHandler(handler)
        logging.getLogger("auto_round").addHandler(handler)


def bench_signround(args) -> dict:
    import lowbit
    from lowbit.algorithms import SignRound

    model = make_model(args.layers)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=gen)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if args.auto_round:
        from auto_round import AutoRound

        ar = AutoRound(model, tokenizer=_tokenizer(args.tokenizer), bits=4, group_size=128, sym=True, iters=args.iters,
                       nsamples=args.nsamples, seqlen=args.seqlen, batch_size=8, seed=0,
                       dataset=[windows[i : i + 1] for i in range(len(windows))], device_map="cuda")
        times = _BlockTimes()
        t_start = time.perf_counter()
        ar.quantize()
        tool = f"auto-round {__import__('auto_round').__version__}"
        per_block = [b - a for a, b in zip([t_start] + times.stamps, times.stamps)] or None
    else:
        algo = SignRound(iters=args.iters, compile=args.compile)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                lowbit.quantize(model, "W4A16", algo, windows, nsamples=args.nsamples, seqlen=args.seqlen, device="cuda")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
            return {}
        r = lowbit.quantize(model, "W4A16", algo, windows, nsamples=args.nsamples, seqlen=args.seqlen, device="cuda")
        tool = f"lowbit {lowbit.__version__}"
        per_block = [b["seconds"] for b in r.report["blocks"]]
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    block_s = (sum(per_block[1:]) / len(per_block[1:])) if per_block and len(per_block) > 1 else total / args.layers
    overhead = total - (sum(per_block) if per_block else total)
    row = {
        "tool": tool, "scheme": "W4G128", "iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "blocks_run": args.layers, "seconds_total": total, "seconds_per_block": block_s, "per_block": per_block,
        "compile": args.compile, "projected_8b_minutes": (overhead + BLOCKS_8B * block_s) / 60, "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["kernel", "signround"])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 2048], help="tokens per matmul")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--auto-round", action="store_true")
    p.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets", "models", "pycode-7m"),
                   help="a local tokenizer folder, which auto-round requires (the token windows are random)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="SignRound(compile=...): default on for CUDA")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels instead of timing")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    rows = bench_kernel(args) if args.what == "kernel" else [bench_signround(args)]
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
