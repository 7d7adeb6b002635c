"""A quantize job from a model folder to an output folder, streamed and resumable.

    result, out = quantize_folder("model_dir", "out_dir", "auto_round", "W4A16", "rtn")

The checkpoint is read a block at a time (checkpoint.Checkpoint): the model is a skeleton on the
meta device, and memory holds the block being quantized, the calibration activations and, only
while block 0's inputs are captured, the layers outside the blocks. Every format is written as
the blocks finish (export.Writer), into out_dir + ".partial", which is renamed to out_dir at the
end. After each block the writers and the activations the next block needs are committed there
(resume.json, replaced atomically), so after a crash or kill the same command continues from the
first unfinished block and writes the same bytes as a run that never stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict

import torch

from lowbit.algorithms import get_algorithm
from lowbit.checkpoint import Checkpoint, write_json_atomic
from lowbit.errors import LowbitError
from lowbit.host import release_free_memory
from lowbit.export import MAX_SHARD_SIZE, Layout, check_formats, parse_formats
from lowbit.model import ckpt_name, load_skeleton, load_weights, release, stored_names, stream_order
from lowbit.mixes import mix_name
from lowbit.pipeline import finish, needs_calibration, prepare, quantize_outside, run_blocks
from lowbit.quantized import QuantizeResult
from lowbit.schemes import Scheme, as_scheme, get_scheme
from lowbit.version import __version__


class NotStreamable(LowbitError):
    """The checkpoint cannot be streamed into its model (its tensor names differ from the model's,
    or it is not safetensors): load it whole instead."""


def quantize_folder(model_dir: str, out_dir: str, formats="fake", scheme: Scheme | str = "W4A16",
                    algorithm="signround", dataset=None, *, nsamples: int = 128, seqlen: int = 2048,
                    seed: int = 0, overrides: dict | None = None, outside: dict | None = None, device=None,
                    progress: bool = True,
                    max_shard_size: int = MAX_SHARD_SIZE, overwrite: bool = False, restart: bool = False,
                    report: dict | None = None) -> tuple[QuantizeResult, str]:
    """Quantize the model in `model_dir` block by block into `out_dir` in each format (a name
    list as in export.parse_formats; `scheme` a Scheme or a name, llama.cpp's mixes too, and
    `overrides` / `outside` as in pipeline.quantize); `report` adds entries to the report each
    format holds.
    Returns the result (its model a skeleton, its layers empty: the weights are on disk) and
    the output folder."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) and mix_name(scheme) is None else scheme
    algo = get_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
    formats = parse_formats(formats)
    ckpt, (model, tokenizer) = open_checkpoint(model_dir)
    check_formats(formats, [], getattr(model.config, "model_type", None))
    out_dir = os.path.abspath(out_dir)
    partial = out_dir.rstrip(os.sep) + ".partial"
    job = {"model": os.path.abspath(model_dir), "checkpoint": _fingerprint(ckpt),
           "scheme": scheme.to_dict() if isinstance(scheme, Scheme) else mix_name(scheme), "outside": _jsonable(outside),
           "algorithm": {"name": algo.name, **asdict(algo)}, "overrides": _jsonable(overrides),
           "dataset": _jsonable(dataset), "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
           "formats": [f.tag for f in formats], "max_shard_size": int(max_shard_size), "lowbit": __version__}
    state = _resume_state(partial, job, restart)

    run = _prepare(model, tokenizer, ckpt, scheme, algo, dataset, nsamples, seqlen, seed, overrides, outside, device,
                   progress)
    blocks_name, n = run.blocks_name, len(run.blocks)
    before, block_names, after = stream_order(stored_names(model), blocks_name, n)
    shapes = {f"{blocks_name}.{i}.{k}": tuple(m.weight.shape) for i, ls in enumerate(run.block_layers)
              for k, m in ls.items()}
    shapes.update({k: tuple(model.get_submodule(k).weight.shape) for k in run.outside})
    layout = Layout(model, tokenizer, {ckpt_name(model, n): s for n, s in {**run.schemes, **run.outside}.items()},
                    {ckpt_name(model, n): s for n, s in shapes.items()}, ckpt.float_dtype(), blocks_name,
                    int(max_shard_size), run.report.get("recipe"))
    folders = [partial if len(formats) == 1 else os.path.join(partial, f.tag) for f in formats]
    try:
        if state is None:
            os.makedirs(partial, exist_ok=True)
            write_json_atomic(os.path.join(partial, "job.json"), job)
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
            writers = [f.open(folder, layout) for f, folder in zip(formats, folders)]
            _add(writers, before, ckpt, run)
            start = 0
            _commit(partial, writers, run, 0)
        else:
            writers = [f.open(folder, layout, s) for f, folder, s in zip(formats, folders, state["writers"])]
            start = _restore(partial, run, state)
            _say(progress, f"resuming {partial}: blocks 1-{start} of {n} were done, continuing from block {start + 1}")

        _stream_blocks(run, ckpt, writers, block_names, partial, start, progress)
        _add(writers, after, ckpt, run)
        result = finish(run)
        result.report.update({"streamed": True, **(report or {})})
        for w in writers:
            w.close(result.report)
        for f in os.listdir(partial):
            if f in ("job.json", "resume.json") or f.startswith("activations-"):
                os.remove(os.path.join(partial, f))
        if os.path.exists(out_dir) and overwrite:
            shutil.rmtree(out_dir)
        os.rename(partial, out_dir)
    except OSError as e:
        raise LowbitError(f"cannot write the output in {partial}: {e.strerror or e}; what was done is kept there, "
                          "rerun the same command to continue") from None
    except LowbitError:
        if state is None:  # bad input found on the way: resuming would meet it again
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return result, out_dir


def _stream_blocks(run, ckpt, writers, block_names, partial: str, start: int, progress: bool) -> None:
    """Blocks start.. in order: load each from the checkpoint, quantize it, hand its tensors to
    the writers, free it, commit."""
    model, blocks_name = run.model, run.blocks_name
    # Blocks are computed in float32; an algorithm that runs no block (RTN) rounds each layer in
    # float32 from the stored dtype (qdq upcasts), so the block stays as stored: half the memory.
    dtype = torch.float32 if run.needs_data else None

    def load_block(i):
        load_weights(run.blocks[i], f"{blocks_name}.{i}.", ckpt, dtype, rename=lambda n: ckpt_name(model, n))

    def store_block(i, weights, stats):
        block_state = run.blocks[i].state_dict()
        prefix = f"{blocks_name}.{i}."
        for w in writers:
            for name in block_names[i]:
                w.add(ckpt_name(model, name), block_state[name[len(prefix):]],
                      run.quantized.get(name.removesuffix(".weight")))
        release(run.blocks[i])
        run.quantized.clear()
        _commit(partial, writers, run, i + 1)
        release_free_memory()

    run_blocks(run, start, progress=progress, before_block=load_block, on_block=store_block)


def open_checkpoint(model_dir: str):
    """The checkpoint and the model skeleton; NotStreamable when the two do not match."""
    if not os.path.isdir(model_dir):
        raise LowbitError(f"model folder not found: {model_dir}")
    has_safetensors = any(os.path.isfile(os.path.join(model_dir, f))
                          for f in ("model.safetensors", "model.safetensors.index.json"))
    if not has_safetensors:
        raise NotStreamable(f"{model_dir} has no safetensors checkpoint to stream")
    ckpt = Checkpoint(model_dir)
    model, tokenizer = load_skeleton(model_dir)
    model.source_dtype = ckpt.float_dtype()
    names = [ckpt_name(model, n) for n in stored_names(model)]
    if set(names) != set(ckpt.names):
        missing = sorted(set(names) - set(ckpt.names))
        if missing and not (set(ckpt.names) - set(names)):
            raise LowbitError(f"the checkpoint in {model_dir} lacks {missing[0]}"
                              + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else ""))
        raise NotStreamable(f"the tensor names of {model_dir} differ from its model's "
                            f"(e.g. {sorted(set(ckpt.names) ^ set(names))[0]})")
    for name, t in model.state_dict().items():
        name = ckpt_name(model, name)
        if name in ckpt and list(t.shape) != ckpt.info[name]["shape"]:
            raise LowbitError(f"tensor {name} has shape {ckpt.info[name]['shape']} in the checkpoint, "
                              f"the config makes it {list(t.shape)}")
    return ckpt, (model, tokenizer)


def _prepare(model, tokenizer, ckpt, scheme, algo, dataset, nsamples, seqlen, seed, overrides, outside, device,
             progress=False):
    """pipeline.prepare on the skeleton; the layers outside the blocks are loaded only for it to
    capture block 0's inputs, and freed after."""
    planned = [] if mix_name(scheme) else [as_scheme(s) for s in (scheme, *(overrides or {}).values())]
    if not needs_calibration(algo, planned):  # (a mix's k-quants take no calibrated input scales)
        return prepare(model, scheme, algo, dataset, tokenizer=tokenizer, seed=seed, overrides=overrides,
                       outside=outside, device=device)
    blocks_name = _blocks_name(model)
    rest = [n for n in stored_names(model) if not n.startswith(blocks_name + ".")]
    _assign(model, {n: _compute_dtype(ckpt.get(ckpt_name(model, n))) for n in rest})
    run = prepare(model, scheme, algo, dataset, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                  overrides=overrides, outside=outside, device=device, progress=progress)
    _assign(model, {n: torch.empty(ckpt.info[ckpt_name(model, n)]["shape"], device="meta") for n in rest})
    return run


def _compute_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32) if t.is_floating_point() else t


def _blocks_name(model) -> str:
    from lowbit.model import find_blocks

    return find_blocks(model)[0]


def _assign(model, tensors: dict) -> None:
    """Put tensors into the model by name (re-tying a tied output embedding)."""
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None:
            out.weight = inp.weight


def _add(writers, names, ckpt, run) -> None:
    """Tensors outside the blocks, copied through from the checkpoint, or rounded first where
    run.outside names their module (pipeline.quantize_outside); those count as done."""
    model = run.model
    for name in names:
        tensor, q = ckpt.get(ckpt_name(model, name)), None
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in run.outside:
            q = quantize_outside(tensor, run.outside[module])
            tensor = q.dequantize(tensor.dtype)
            run.done[module] = q.scheme
        for w in writers:
            w.add(ckpt_name(model, name), tensor, q)


def _commit(partial: str, writers, run, next_block: int) -> None:
    """Make the job durable up to block next_block: writers, the activations the next block
    starts from, then resume.json (the commit point) naming them."""
    states = [w.commit() for w in writers]
    activations = None
    if run.q_in is not None and next_block < len(run.blocks):
        from safetensors.torch import save_file

        activations = f"activations-{next_block:05d}.safetensors"
        tmp = os.path.join(partial, activations + ".tmp")
        saved = {"q_in": run.q_in.contiguous()}
        if run.fp_in is not run.q_in:  # they are one tensor before the first block
            saved["fp_in"] = run.fp_in.contiguous()
        save_file(saved, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(partial, activations))
    write_json_atomic(os.path.join(partial, "resume.json"), {
        "next_block": next_block, "writers": states, "activations": activations,
        "blocks": run.report["blocks"], "done": {n: s.to_dict() for n, s in run.done.items()},
        "calibration": run.report.get("calibration", {}).get("sha256"),
    })
    for f in os.listdir(partial):
        if f.startswith("activations-") and f != activations:
            os.remove(os.path.join(partial, f))


def _same_setting(earlier, now) -> bool:
    """Whether a job setting is unchanged. A key of a settings dict that the earlier run did not
    record (a lowbit without that option) matches an option that is off now (None, 0, False), so
    an upgrade that adds an option does not orphan a partial run."""
    if isinstance(earlier, dict) and isinstance(now, dict):
        off = {k for k, v in now.items() if k not in earlier and v in (None, 0, False)}
        return earlier == {k: v for k, v in now.items() if k not in off}
    return earlier == now


def _resume_state(partial: str, job: dict, restart: bool) -> dict | None:
    """The committed state of an earlier run of the same job in `partial`, or None to start
    afresh. A partial folder of another job is refused, and left as it is."""
    if not os.path.exists(partial):
        return None
    if restart:
        shutil.rmtree(partial)
        return None
    try:
        with open(os.path.join(partial, "job.json")) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        raise LowbitError(f"{partial} exists but is not a lowbit partial output; remove it") from None
    for key in job:
        if not _same_setting(earlier.get(key), job[key]):
            raise LowbitError(f"{partial} holds a partial run with another {key} "
                              f"({_short(earlier.get(key))} there, {_short(job[key])} now); "
                              "remove it or pass --restart")
    try:
        with open(os.path.join(partial, "resume.json")) as f:
            return json.load(f)
    except OSError:  # killed before its first commit: nothing to keep
        shutil.rmtree(partial)
        return None
    except ValueError:
        raise LowbitError(f"{partial}/resume.json is corrupt; remove {partial} or pass --restart") from None


def _restore(partial: str, run, state: dict) -> int:
    """Put the committed state back into the run; returns the first block to quantize."""
    sha = run.report.get("calibration", {}).get("sha256")
    if sha != state["calibration"]:
        raise LowbitError(f"{partial} was made with other calibration windows (the text changed?); "
                          "remove it or pass --restart")
    run.report["blocks"] = state["blocks"]
    run.done = {n: Scheme.from_dict(d) for n, d in state["done"].items()}
    if state["activations"] is not None:
        from safetensors.torch import load_file

        saved = load_file(os.path.join(partial, state["activations"]))
        run.q_in = saved["q_in"].to(run.device)
        run.fp_in = saved["fp_in"].to(run.device) if "fp_in" in saved else run.q_in
    return state["next_block"]


def _fingerprint(ckpt: Checkpoint) -> str:
    """Names, dtypes, shapes and offsets of every tensor, and the shards' sizes."""
    sizes = {f: os.path.getsize(os.path.join(ckpt.folder, f)) for f in set(ckpt.file.values())}
    text = json.dumps([sorted(ckpt.info.items()), sorted(sizes.items())], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(x):
    if x is None or isinstance(x, (str, int, float, bool)):
        return os.path.abspath(x) if isinstance(x, str) and os.path.exists(x) else x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, Scheme):
        return x.to_dict()
    if isinstance(x, torch.Tensor):
        return hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()[:16]
    return repr(x)


def _short(x) -> str:
    text = json.dumps(x, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr)
