"""Command line: `lowbit quantize MODEL_DIR ...` and `lowbit eval MODEL_DIR --text FILE`."""
from __future__ import annotations

import argparse
import json
import os
import sys

from lowbit.api import context_length
from lowbit.calib import check_source
from lowbit.progress import Progress
from lowbit.allocate.plan import block_layers, make_plan, plan_schemes, read_plan, write_plan
from lowbit.mixes import MIXES, mix_base, mix_name
from lowbit.errors import LowbitError
from lowbit.export import check_formats, parse_formats
from lowbit.job import NotStreamable


def _add_eval_args(p, text_flag: str, required: bool = False):
    p.add_argument(text_flag, dest="text", required=required, help="text file to measure perplexity on (.txt, .jsonl, .parquet)")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="window length (capped at the model's context)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")


def _add_alloc_args(p, required: bool = False):
    p.add_argument("--target-bits", type=float, required=required, default=None,
                   help="average bits per weight, scales and zero points included")
    p.add_argument("--options", default="W2A16,W4A16,W8A16", help="schemes a layer may take (default W2A16,W4A16,W8A16)")
    p.add_argument("--metric", default="deltaloss", help="deltaloss (default), deltaloss_signed, hessian or output_mse")
    p.add_argument("--solver", default="dp", help="dp (exact, default) or milp (needs scipy)")
    p.add_argument("--no-tie", action="store_true", help="let q/k/v and gate/up take different schemes")
    p.add_argument("--fix", action="append", default=[], metavar="LAYER=SCHEME",
                   help="force a layer (name or regex) to a scheme; repeatable")
    p.add_argument("--min-bits", type=int, default=None, help="drop options below this bit width")
    p.add_argument("--metric-tune-iters", type=int, default=50,
                   help="score the weights a SignRound of N iterations gives for each option "
                        "(default 50; 0: score rounded weights, much faster, worse plans)")


FORMAT_HELP = ("fake (default: dequantized weights + codes), auto_round, gptq, compressed_tensors, "
               "gguf:q2_k|q3_k|q4_k|q5_k|q6_k|q4_0|q5_0|q8_0|f16|f32; "
               "several at once, comma-separated, go to one subfolder each")


def _size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the size must be positive: {text!r}")
    return value


SCHEME_HELP = ("integer weights: W<bits>A16[G<group>|PC][-asym], bits 2-8, group 128 unless named, PC "
               "per output channel (W4A16, W3A16G64, W2A16G32, W8A16PC, W4A16G128-asym); with int8 inputs "
               "per token: W<bits>A8 (W4A8, W8A8). Float types with their own inputs: MXFP4, MXFP8, NVFP4, "
               "FP8, FP8_BLOCK (128x128 tiles); weights only: MXFP4A16, MXFP8A16, NVFP4A16, FP8A16, FP8G128A16, "
               "FP8_BLOCKA16; other inputs: "
               "-<input type> (W4A16-MXFP4, MXFP4-MXFP8); -rceil after MX inputs rounds their scale up as "
               "NVIDIA's kernels do (MXFP8-rceil). llama.cpp's block types, tuned on their grid: "
               "gguf:q2_k, gguf:q3_k, gguf:q4_k, gguf:q5_k, gguf:q6_k, gguf:q4_0, gguf:q4_1, gguf:q5_0, gguf:q5_1, "
               "gguf:q8_0; "
               "llama.cpp's mixes of them, the embedding and output layer included: "
               "Q2_K_MIX (llama.cpp's Q2_K), "
               "Q2_K_S, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M; -q8 after a type or mix "
               "(gguf:q2_k-q8, Q4_K_M-q8) tunes and evaluates with each block layer's input rounded to 8 bits "
               "as llama.cpp's CPU kernels round it. Default W4A16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit post-training quantization of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a local Hugging Face model folder")
    q.add_argument("model", help="local model folder")
    q.add_argument("--scheme", default="W4A16", help=SCHEME_HELP)
    q.add_argument("--group-size", type=int, default=None, help="override the scheme's group size (-1: per channel)")
    q.add_argument("--bits", type=int, default=None, help="override the scheme's bit width (2-8)")
    q.add_argument("--asym", action="store_true", help="asymmetric (min/max with zero point) instead of symmetric")
    q.add_argument("--algorithm", default="signround", help="signround (default) or rtn")
    q.add_argument("--preset", choices=["default", "light", "best"], default="default",
                   help="default: 200 steps of 8 windows; light: 100 steps of 4 (a quarter of the "
                        "windows); best: 1000 steps, 512 samples")
    q.add_argument("--iters", type=int, default=None)
    q.add_argument("--lr", type=float, default=None, help="default 1/iters (at >= 3 bits at most 1/sqrt(200*iters))")
    q.add_argument("--batch-size", type=int, default=None, help="windows per tuning step (default 8; light 4)")
    q.add_argument("--prescale", action=argparse.BooleanOptionalAction, default=None,
                   help="activation-weighted range search before tuning (default: on at <= 3 bits)")
    q.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="run the block under bfloat16 autocast while tuning (default: where bf16 is fast, i.e. CUDA and "
                        "CPUs with AVX512-BF16/AMX); --no-bf16 tunes in float32")
    q.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the tuning step (default: on a CPU when the model is big enough for it to "
                        "pay: with bf16 e.g. pycode-7m at 200 iterations, in float32 blocks of 20 M weights and more; "
                        "on CUDA the quantize-dequantize only)")
    q.add_argument("--keep", choices=["last", "best"], default=None,
                   help="parameters each block keeps: last (default) or those of the lowest minibatch loss "
                        "(auto-round's rule)")
    q.add_argument("--drop", type=float, default=None,
                   help="leave this share of the largest output errors out of SignRound's loss (e.g. 0.001)")
    q.add_argument("--block-target", dest="target", choices=["model", "block"], default=None,
                   help="what SignRound tunes each block to reproduce: the float model's outputs there (model, "
                        "default) or the float block's on the quantized model's inputs (block)")
    q.add_argument("--loss", choices=["mse", "relative"], default=None,
                   help="SignRound's block loss: each token's squared error relative to its size (relative, "
                        "default: a few huge attention-sink tokens do not outweigh the rest) or plain mean squared "
                        "error (mse, auto-round's)")
    q.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=2048, help="calibration window length in tokens (default 2048)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dataset", default=None, help="calibration text: .txt, .jsonl, .parquet, or a datasets name")
    q.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--restart", action="store_true",
                   help="discard the partial output of an interrupted run (OUT.partial) instead of resuming it")
    q.add_argument("--max-shard-size", type=_size, default="5GB", help="largest weight file (default 5GB)")
    q.add_argument("--format", default="fake", help=FORMAT_HELP)
    q.add_argument("--quantize-lm-head", action="store_true", help="also round lm_head (kept in full precision by default)")
    q.add_argument("--device", default=None, help="cpu (default) or cuda")
    q.add_argument("--quiet", action="store_true", help="no progress output")
    q.add_argument("--plan", default=None, help="per-layer schemes from a plan file (lowbit plan)")
    _add_alloc_args(q)
    _add_eval_args(q, "--eval-text")

    pl = sub.add_parser("plan", help="allocate bits per layer under an average-bit budget")
    pl.add_argument("model", help="local model folder")
    pl.add_argument("--dataset", required=True, help="calibration text for the sensitivity metric")
    pl.add_argument("--quiet", action="store_true", help="no progress output")
    pl.add_argument("--nsamples", type=int, default=16, help="calibration windows for the metric (default 16)")
    pl.add_argument("--seqlen", type=int, default=2048)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--out", required=True, help="plan file to write (.json)")
    pl.add_argument("--overwrite", action="store_true")
    pl.add_argument("--png", default=None, help="also draw the sensitivities and the choice (needs matplotlib)")
    _add_alloc_args(pl, required=True)

    x = sub.add_parser("export", help="write a quantized folder in other formats, without re-tuning")
    x.add_argument("model", help="a folder written by lowbit quantize (fake, auto_round or gptq)")
    x.add_argument("--format", required=True, help=FORMAT_HELP)
    x.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    x.add_argument("--overwrite", action="store_true")

    e = sub.add_parser("eval", help="perplexity of a model folder on a text")
    e.add_argument("model", help="local model folder (original or quantized; a multi-format output: its fake/)")
    _add_eval_args(e, "--text", required=True)
    e.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def cmd_quantize(args) -> None:
    import lowbit
    from lowbit.allocate.plan import parse_options
    from lowbit.export.fake import check_out_dir
    from lowbit.pipeline import PRESETS, calibrated_inputs, needs_calibration

    # Everything that can be checked is checked before any work starts.
    check_out_dir(args.out, args.overwrite)
    mix = mix_name(args.scheme)
    if mix is not None:  # llama.cpp's mix: a type per layer, the embedding's and output's too
        given = {"--group-size": args.group_size, "--bits": args.bits, "--asym": args.asym or None,
                 "--quantize-lm-head": args.quantize_lm_head or None, "--plan": args.plan,
                 "--target-bits": args.target_bits}
        for flag, value in given.items():
            if value is not None:
                raise LowbitError(f"--scheme {args.scheme} sets every layer's type; it does not take {flag}")
        scheme = mix
    else:
        scheme = lowbit.get_scheme(args.scheme, group_size=args.group_size, sym=False if args.asym else None)
    if args.bits is not None:
        scheme = scheme.replace(bits=args.bits)
    algo_preset, pipe_preset = PRESETS[args.preset]
    settings = {"iters": args.iters, "lr": args.lr, "batch_size": args.batch_size, "prescale": args.prescale,
                "amp": args.bf16, "compile": args.compile, "keep": args.keep,
                "drop": args.drop, "target": args.target, "loss": args.loss}
    if args.algorithm.lower() == "signround":
        settings = {**algo_preset, **{k: v for k, v in settings.items() if v is not None}}
    algo = lowbit.get_algorithm(args.algorithm, **settings)
    if algo.needs_data and args.dataset is None:
        raise LowbitError(f"--dataset is required for --algorithm {algo.name}")
    if args.dataset is not None:
        check_source(args.dataset)
    if args.text is not None:
        check_source(args.text, "evaluation text")
    nsamples = args.nsamples if args.nsamples is not None else pipe_preset["nsamples"]
    if args.plan and args.target_bits is not None:
        raise LowbitError("give --plan or --target-bits, not both")
    plan = read_plan(args.plan) if args.plan else None
    formats = parse_formats(args.format)
    _gguf_option(formats, args.format, mix)
    planned = [lowbit.get_scheme(f"gguf:{MIXES[mix_base(mix)][0]}") if mix else scheme]
    planned += list(plan_schemes(plan).values()) if plan else []
    if args.target_bits is not None:
        planned += list(parse_options(args.options).values())
    check_formats(formats, planned)
    if args.dataset is None and needs_calibration(algo, planned):
        raise LowbitError(f"--dataset is required to calibrate the input scales of {', '.join(calibrated_inputs(planned))}")

    if args.target_bits is None and not args.quantize_lm_head:
        try:
            return _quantize_streamed(args, scheme, algo, nsamples, plan, formats)
        except NotStreamable as e:
            _say(args, f"{e}: loading the whole model instead")
    _quantize_in_memory(args, scheme, algo, nsamples, plan, formats)


def _quantize_streamed(args, scheme, algo, nsamples: int, plan, formats) -> None:
    """The checkpoint streamed block by block into the output (resumable); the perplexities
    are measured on the original and on the written model."""
    from lowbit.api import load
    from lowbit.job import open_checkpoint, quantize_folder
    from lowbit.model import load_model

    readable = [f for f in formats if f.loads]
    if args.text and not readable:
        raise NotStreamable("--eval-text with no format lowbit loads back")
    _, (skeleton, _) = open_checkpoint(args.model)
    check_formats(formats, [], skeleton.config.model_type)
    seqlen = _seqlen(args, skeleton)
    overrides = _plan_overrides(args, plan, skeleton)
    before = None
    if args.text:
        with _step(args, f"loading {args.model}"):
            model, tokenizer = load_model(args.model)
        before = _eval(model, tokenizer, args)
        del model
    _say(args, f"quantizing {args.model} to {_name(scheme)} with {algo.name} "
               f"({_describe(algo, scheme, overrides, args.device, skeleton)}), block by block")
    result, out = quantize_folder(
        args.model, args.out, formats, scheme, algo, args.dataset, nsamples=nsamples, seqlen=seqlen, seed=args.seed,
        overrides=overrides, device=args.device, progress=not args.quiet, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite, restart=args.restart, report={"plan": plan} if plan is not None else None)
    after = None
    if args.text:
        folder = out if len(formats) == 1 else os.path.join(out, readable[0].tag)
        with _step(args, f"loading {folder}"):
            model, tokenizer = load(folder)
        after = _eval(model, tokenizer, args)
        result.report["eval"] = _eval_entry(args, before, after, model)
        for f in formats:  # the report each format holds gets the perplexities too
            path = os.path.join(out if len(formats) == 1 else os.path.join(out, f.tag), "quantization.json")
            if os.path.isfile(path):
                with open(path) as fh:
                    report = json.load(fh)
                report["eval"] = result.report["eval"]
                with open(path, "w") as fh:
                    json.dump(report, fh, indent=2, default=str)
    _summary(args, result, scheme, plan, before, after, out, formats)


def _quantize_in_memory(args, scheme, algo, nsamples: int, plan, formats) -> None:
    import lowbit
    from lowbit.export import export
    from lowbit.model import load_model

    with _step(args, f"loading {args.model}"):
        model, tokenizer = load_model(args.model)
    check_formats(formats, [], model.config.model_type)
    seqlen = _seqlen(args, model)
    before = _eval(model, tokenizer, args) if args.text else None
    if args.target_bits is not None:
        plan = _make_plan(model, tokenizer, args, min(nsamples, 16), seqlen)
    overrides = _plan_overrides(args, plan, model)
    _say(args, f"quantizing {args.model} to {_name(scheme)} with {algo.name} "
               f"({_describe(algo, scheme, overrides, args.device, model)})")
    result = lowbit.quantize(
        model, scheme, algo, args.dataset, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen,
        seed=args.seed, overrides=overrides, lm_head=args.quantize_lm_head, device=args.device,
        progress=not args.quiet,
    )
    if plan is not None:
        result.report["plan"] = plan
    after = None
    if args.text:
        after = _eval(model, tokenizer, args)
        result.report["eval"] = _eval_entry(args, before, after, model)
    with _step(args, f"writing {', '.join(f.tag for f in formats)}"):
        out = export(result, args.out, formats, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    _summary(args, result, scheme, plan, before, after, out, formats)


def _seqlen(args, model) -> int:
    seqlen = min(args.seqlen, context_length(model))
    if seqlen != args.seqlen:
        _say(args, f"seqlen capped at the model's context: {seqlen}")
    return seqlen


def _plan_overrides(args, plan, model):
    if plan is None:
        return None
    overrides = plan_schemes(plan)
    unknown = sorted(set(overrides) - set(block_layers(model)))
    if unknown:
        raise LowbitError(f"the plan names layers this model does not have: {', '.join(unknown[:3])}")
    _say(args, f"plan: {plan.get('achieved_bits', float('nan')):.3f} average bits over {len(overrides)} layers")
    return overrides


def _eval_entry(args, before, after, model) -> dict:
    return {"text": args.text, "ppl_original": before["ppl"], "ppl_quantized": after["ppl"],
            "windows": after["windows"], "seqlen": min(args.eval_seqlen, context_length(model))}


def _summary(args, result, scheme, plan, before, after, out, formats) -> None:
    n_q, left = len(result.report["layers"]), result.report["unquantized"]
    target = "the plan's schemes" if plan is not None else _name(scheme)
    print(f"quantized {n_q} layers to {target} in {result.report['seconds']:.1f}s; "
          f"left in full precision: {', '.join(left) or 'none'} "
          f"({len(left)} tensors, {result.report['unquantized_share']:.1%} of the weights)")
    if args.text:
        print(f"perplexity on {args.text}: original {before['ppl']:.4f}, quantized {after['ppl']:.4f}")
    if len(formats) == 1:
        print(f"wrote {out} ({formats[0].tag}: {formats[0].loaded_by})")
        return
    print(f"wrote {out}:")
    for f in formats:
        print(f"  {f.tag}/  {f.loaded_by}")


def _make_plan(model, tokenizer, args, nsamples: int, seqlen: int) -> dict:
    from lowbit.calib import calibration_windows

    if args.dataset is None:
        raise LowbitError("--dataset is required to allocate bits")
    fixed = {}
    for item in args.fix:
        layer, sep, scheme = item.partition("=")
        if not sep:
            raise LowbitError(f"--fix takes LAYER=SCHEME, got {item!r}")
        fixed[layer] = scheme
    windows = calibration_windows(tokenizer, args.dataset, nsamples, seqlen, args.seed)
    tuned = f" after SignRound({args.metric_tune_iters} iters) per option" if args.metric_tune_iters else ""
    _say(args, f"scoring layers with {args.metric} on {len(windows)} windows{tuned}, solving with {args.solver}")
    with Progress(f"scoring with {args.metric}", enabled=not getattr(args, "quiet", False)):
        plan = make_plan(model, args.options, args.target_bits, windows, metric=args.metric, solver=args.solver,
                         tie=not args.no_tie, fixed=fixed, min_bits=args.min_bits, tune_iters=args.metric_tune_iters)
    _say(args, f"plan: {plan['achieved_bits']:.3f} average bits (target {args.target_bits}); "
               f"metric {plan['seconds']['metric']:.1f}s, solver {plan['seconds']['solve']:.2f}s")
    return plan


def cmd_plan(args) -> None:
    from lowbit.export.fake import check_out_dir
    from lowbit.model import load_model

    check_out_dir(args.out, args.overwrite)
    if args.png:
        check_out_dir(args.png, args.overwrite)
    check_source(args.dataset)
    with _step(args, f"loading {args.model}"):
        model, tokenizer = load_model(args.model)
    seqlen = min(args.seqlen, context_length(model))
    plan = _make_plan(model, tokenizer, args, args.nsamples, seqlen)
    write_plan(plan, args.out)
    counts = {}
    for entry in plan["layers"].values():
        counts[entry["scheme"]] = counts.get(entry["scheme"], 0) + 1
    print(f"plan for {len(plan['layers'])} layers: {', '.join(f'{n} x {o}' for o, n in counts.items())}; "
          f"{plan['achieved_bits']:.3f} average bits (target {args.target_bits})")
    print(f"wrote {os.path.abspath(args.out)}")
    if args.png:
        from lowbit.allocate.picture import draw_plan

        draw_plan(plan, args.png)
        print(f"wrote {os.path.abspath(args.png)}")


def _eval(model, tokenizer, args) -> dict:
    from lowbit.api import evaluate

    return evaluate(model, args.text, tokenizer=tokenizer, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                    progress=not getattr(args, "quiet", False))


def _gguf_option(formats, spec: str, mix: str | None) -> None:
    """A plain "gguf" in spec writes a llama.cpp mix's file (model-q4_k_m.gguf) for a mix's layers."""
    if mix is not None and "gguf" in [f.strip().lower() for f in spec.split(",")]:
        for f in formats:
            if f.name == "gguf" and f.option == f.default_option:
                f.option = mix_base(mix)


def _name(scheme) -> str:
    """A scheme's name, or a llama.cpp mix's ("Q4_K_M")."""
    return scheme.upper() if isinstance(scheme, str) else scheme.name


def _describe(algo, scheme, overrides, device, model) -> str:
    """The algorithm's settings as they take effect (defaults resolved), the device and threads;
    for a llama.cpp mix, its types per layer and outside the blocks."""
    import torch

    from lowbit.mixes import expand_mix
    from lowbit.model import find_blocks
    from lowbit.pipeline import run_settings
    from lowbit.schemes import as_scheme

    mix = None
    if isinstance(scheme, str):
        mix = expand_mix(scheme, model, list(block_layers(model)), find_blocks(model)[0])
        scheme, overrides = mix.scheme, mix.layers
    schemes = [as_scheme(s) for s in (scheme, *(overrides or {}).values())]
    show = lambda v: ("on" if v else "off") if isinstance(v, bool) else (  # noqa: E731
        ", ".join(f"{show(x)} ({k})" for k, x in v.items()) if isinstance(v, dict) else str(v))
    settings = run_settings(algo, schemes, torch.device(device or "cpu"))
    text = ", ".join(f"{k}={show(v)}" for k, v in settings.items())
    if mix is not None:
        counts = {}
        for s in mix.layers.values():
            counts[s.name] = counts.get(s.name, 0) + 1
        text += ("; layers " + ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))
                 + "; outside the blocks " + ", ".join(f"{k} {s.name}" for k, s in mix.outside.items()))
    return text



def _step(args, desc: str) -> Progress:
    """A step with no unit of work: a line when it starts, while it runs, and when it ends."""
    return Progress(desc, enabled=not getattr(args, "quiet", False))


def _say(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def cmd_export(args) -> None:
    from lowbit.export import check_out_dir, export, parse_formats, read_quantized

    formats = parse_formats(args.format)
    check_out_dir(args.out, args.overwrite)
    if not os.path.isdir(args.model):
        raise LowbitError(f"model folder not found: {args.model}")
    with _step(args, f"reading {args.model}"):
        result = read_quantized(args.model)
    _gguf_option(formats, args.format, result.report.get("recipe"))
    with _step(args, f"writing {', '.join(f.tag for f in formats)}"):
        out = export(result, args.out, formats, overwrite=args.overwrite)
    print(f"exported {len(result.layers)} quantized layers of {args.model} as {', '.join(f.tag for f in formats)}")
    print(f"wrote {out}")


def cmd_eval(args) -> None:
    from lowbit.api import load

    check_source(args.text, "evaluation text")
    if not os.path.isfile(args.text):
        raise LowbitError(f"evaluation text not found: {args.text}")
    if not os.path.isdir(args.model):
        raise LowbitError(f"model folder not found: {args.model}")
    from lowbit.export import model_folder

    folder = model_folder(args.model)
    if folder != args.model:
        _say(args, f"{args.model} holds several formats: evaluating {folder}")
    with _step(args, f"loading {folder}"):
        model, tokenizer = load(folder)
    r = _eval(model, tokenizer, args)
    print(json.dumps({"model": args.model, "text": args.text, **r}))
    print(f"perplexity {r['ppl']:.4f} ({r['windows']} windows, {r['tokens']} tokens)", file=sys.stderr)


def main(argv=None) -> int:
    from lowbit.host import tuned_process

    args = build_parser().parse_args(argv)
    try:
        with tuned_process():  # the command owns its process: faster CPU tuning (host.py)
            {"quantize": cmd_quantize, "eval": cmd_eval, "plan": cmd_plan, "export": cmd_export}[args.command](args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
