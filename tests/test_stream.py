"""Streaming a checkpoint block by block (lowbit/checkpoint.py, lowbit/job.py): sharded reading and
writing, byte-identical output to the in-memory path, resume after SIGKILL, and bad checkpoints."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import lowbit
from lowbit.checkpoint import Checkpoint, ShardWriter
from lowbit.errors import LowbitError
from lowbit.export import export
from lowbit.job import quantize_folder
from lowbit.model import load_model

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")
STORIES = os.path.join(ASSETS, "models", "stories260K")
PYCODE = os.path.join(ASSETS, "models", "pycode-7m")
STORY_TEXT = os.path.join(ASSETS, "text", "tinystories_valid_prefix.txt")
PY_TEXT = os.path.join(PYCODE, "calib.txt")

pytestmark = pytest.mark.skipif(not os.path.isdir(PYCODE), reason="../shared/assets not present")


def sharded_copy(src: str, dst, max_shard_size: int, dtype: torch.dtype | None = None) -> str:
    """The model in src rewritten as safetensors shards (optionally cast), with its other files."""
    os.makedirs(dst)
    ckpt = Checkpoint(src)
    w = ShardWriter(str(dst), "model", max_shard_size)
    for name in ckpt.names:
        t = ckpt.get(name)
        w.add(name, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    w.close()
    for f in os.listdir(src):
        if f.endswith((".json", ".model", ".txt")):
            shutil.copy(os.path.join(src, f), dst)
    if dtype is not None:
        cfg = json.load(open(os.path.join(dst, "config.json")))
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def weight_hashes(folder) -> dict[str, str]:
    """sha256 of every weight file (.safetensors, .gguf) under folder, by relative path."""
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if f.endswith((".safetensors", ".gguf")):
            out[os.path.relpath(f, folder)] = hashlib.sha256(open(f, "rb").read()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------
# reading and writing shards


def test_sharded_copy_loads_as_the_original(tmp_path):
    d = sharded_copy(PYCODE, tmp_path / "m", 3_000_000)
    shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert len(shards) >= 8 and os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    a, _ = load_model(PYCODE)
    b, _ = load_model(d)  # transformers reads the index and the shards
    for (n, p), (m, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n == m and torch.equal(p, q)
    ckpt = Checkpoint(d)
    assert ckpt.float_dtype() == torch.float32 and set(ckpt.names) == set(Checkpoint(PYCODE).names)


def test_shard_writer_resumes_to_the_same_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = [(f"t{i}", torch.randn(50 + i, 30, generator=g).to(torch.bfloat16 if i % 3 else torch.float32))
               for i in range(12)]
    whole = tmp_path / "whole"
    whole.mkdir()
    w = ShardWriter(str(whole), "model", 20_000)
    for n, t in tensors:
        w.add(n, t)
    w.close()
    part = tmp_path / "part"
    part.mkdir()
    w = ShardWriter(str(part), "model", 20_000)
    for n, t in tensors[:5]:
        w.add(n, t)
    state = json.loads(json.dumps(w.commit()))
    for n, t in tensors[5:9]:  # written after the commit, then "killed"
        w.add(n, t)
    w = ShardWriter.resume(str(part), state)
    for n, t in tensors[5:]:
        w.add(n, t)
    w.close()
    assert weight_hashes(whole) == weight_hashes(part) and len(weight_hashes(whole)) > 2
    assert sorted(os.listdir(whole)) == sorted(os.listdir(part))


def test_bad_checkpoints_are_refused_by_name(tmp_path):
    d = sharded_copy(PYCODE, tmp_path / "m", 3_000_000)
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    shard = sorted(set(index["weight_map"].values()))[1]

    gone = shutil.copytree(d, tmp_path / "gone")
    os.remove(os.path.join(gone, shard))
    with pytest.raises(LowbitError, match=f"lacks shard {shard}"):
        Checkpoint(str(gone))

    moved = shutil.copytree(d, tmp_path / "moved")
    wm = dict(index["weight_map"])
    name = next(n for n, f in wm.items() if f == shard)
    wm[name] = sorted(set(wm.values()))[0]
    json.dump({**index, "weight_map": wm}, open(os.path.join(moved, "model.safetensors.index.json"), "w"))
    with pytest.raises(LowbitError, match=f"does not hold tensor {name}"):
        Checkpoint(str(moved))

    cut = shutil.copytree(d, tmp_path / "cut")
    path = os.path.join(cut, shard)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(LowbitError, match=f"{shard} is truncated"):
        Checkpoint(str(cut))


# ---------------------------------------------------------------------------------------------
# streamed == in memory


@pytest.mark.parametrize("model,text,algo,formats,dtype,scheme", [
    (STORIES, STORY_TEXT, "signround", "fake,auto_round,gguf:q4_0", None, "W4A16G32"),
    (PYCODE, PY_TEXT, "rtn", "fake,gptq", None, "W4A16G32"),
    (PYCODE, PY_TEXT, "signround", "auto_round", torch.bfloat16, "W4A16G32"),
    (PYCODE, PY_TEXT, "rtn", "fake,gptq", torch.bfloat16, "W4A16G32"),
    # llama.cpp's mix: the embedding and lm_head are rounded too, as they stream past
    (PYCODE, PY_TEXT, "signround", "fake,gguf:q4_k_m", None, "Q4_K_M"),
], ids=["stories-signround", "pycode-rtn", "pycode-bf16-signround", "pycode-bf16-rtn", "pycode-q4_k_m"])
def test_streamed_output_is_byte_identical_to_in_memory(tmp_path, model, text, algo, formats, dtype, scheme):
    if dtype is not None or model == PYCODE:
        model = sharded_copy(model, tmp_path / "src", 4_000_000, dtype)
    scheme = scheme if scheme == "Q4_K_M" else lowbit.get_scheme(scheme)
    algorithm = lowbit.get_algorithm(algo, **({"iters": 4} if algo == "signround" else {}))
    kw = dict(nsamples=4, seqlen=64, seed=3)
    m, tok = load_model(model)
    mem = lowbit.quantize(m, scheme, algorithm, text, tokenizer=tok, progress=False, **kw)
    export(mem, tmp_path / "mem", formats, max_shard_size=1_000_000)
    result, out = quantize_folder(model, tmp_path / "stream", formats, scheme, algorithm, text, progress=False,
                                  max_shard_size=1_000_000, **kw)
    a, b = weight_hashes(tmp_path / "mem"), weight_hashes(out)
    assert a == b and len(a) >= 3
    assert result.report["layers"] == mem.report["layers"] and result.report["unquantized"] == mem.report["unquantized"]
    if dtype is not None:  # floats stay in the original's dtype
        ckpt = Checkpoint(out if "," not in formats else os.path.join(out, formats.split(",")[0]))
        assert ckpt.dtype("model.embed_tokens.weight") == dtype
    assert not os.path.exists(str(out) + ".partial")


# ---------------------------------------------------------------------------------------------
# resume after SIGKILL, through the command line


def _cli(*args, **kw):
    cmd = [sys.executable, "-m", "lowbit.cli", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


RESUME_ARGS = ["quantize", PYCODE, "--scheme", "W4A16", "--group-size", "64", "--dataset", PY_TEXT, "--seqlen", 128,
               "--nsamples", 8, "--iters", 40, "--no-bf16", "--format", "fake,auto_round", "--max-shard-size", "2MB"]


def _kill_when(proc, ready, timeout=300):
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _next_block(partial) -> int:
    try:
        return json.load(open(os.path.join(partial, "resume.json")))["next_block"]
    except (OSError, ValueError):
        return -1


def test_resume_after_kill_gives_the_same_bytes(tmp_path):
    whole = tmp_path / "whole"
    p = _cli(*RESUME_ARGS, "--out", whole, "--quiet")
    assert p.wait() == 0, p.communicate()
    expected = weight_hashes(whole)
    assert len(expected) >= 6

    out = tmp_path / "out"
    partial = str(out) + ".partial"
    # killed right after block 2 is committed
    _kill_when(_cli(*RESUME_ARGS, "--out", out, "--quiet"), lambda: _next_block(partial) >= 2)
    assert not out.exists() and os.path.isdir(partial)
    # killed again once a shard of the second run is written
    shards = lambda: glob.glob(os.path.join(partial, "*", "model.shard*"))  # noqa: E731
    first = len(shards())
    p = _cli(*RESUME_ARGS, "--out", out)
    _kill_when(p, lambda: len(shards()) > first)
    p = _cli(*RESUME_ARGS, "--out", out)
    stdout, stderr = p.communicate()
    assert p.returncode == 0, stderr
    assert "resuming" in stderr and "continuing from block" in stderr
    assert weight_hashes(out) == expected
    assert not os.path.exists(partial)


def test_partial_of_another_run_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    partial = str(out) + ".partial"
    _kill_when(_cli(*RESUME_ARGS, "--out", out, "--quiet"), lambda: _next_block(partial) >= 1)
    before = weight_hashes(partial), sorted(os.listdir(partial))
    args = [a if a != "64" else "32" for a in RESUME_ARGS]  # another group size
    p = _cli(*args, "--out", out)
    _, stderr = p.communicate()
    errors = [line for line in stderr.splitlines() if line.startswith("lowbit: error:")]
    assert p.returncode == 2 and len(errors) == 1 and "partial run with another scheme" in errors[0]
    assert (weight_hashes(partial), sorted(os.listdir(partial))) == before
    # A partial run of a lowbit without the newer options (scheme.act, algorithm.drop) is the
    # same job while those options are off: it resumes.
    job = json.load(open(os.path.join(partial, "job.json")))
    del job["scheme"]["act"], job["algorithm"]["drop"]
    json.dump(job, open(os.path.join(partial, "job.json"), "w"))
    p = _cli(*RESUME_ARGS, "--out", out)
    _, stderr = p.communicate()
    assert p.returncode == 0 and "resuming" in stderr, stderr
    from lowbit.job import _same_setting

    assert not _same_setting({"iters": 40}, {"iters": 40, "drop": 0.001})  # an option turned on: another job
    assert _same_setting({"iters": 40}, {"iters": 40, "drop": 0.0})


def test_bad_checkpoint_through_the_cli(tmp_path):
    d = sharded_copy(PYCODE, tmp_path / "m", 3_000_000)
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[2]
    path = os.path.join(d, shard)
    os.truncate(path, os.path.getsize(path) // 2)
    p = _cli("quantize", d, "--algorithm", "rtn", "--out", tmp_path / "out")
    _, stderr = p.communicate()
    errors = [line for line in stderr.splitlines() if line.startswith("lowbit: error:")]
    assert p.returncode == 2 and len(errors) == 1 and f"{shard} is truncated" in errors[0]
    assert os.listdir(tmp_path) == ["m"]


def test_a_full_disk_is_one_line_and_keeps_the_partial_output(tmp_path):
    def small_files():  # a 10 MB file size limit stands in for a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000_000, 10_000_000))

    out = tmp_path / "out"
    p = _cli("quantize", PYCODE, "--algorithm", "rtn", "--format", "fake", "--out", out, preexec_fn=small_files)
    _, stderr = p.communicate()
    errors = [line for line in stderr.splitlines() if line.startswith("lowbit: error:")]
    assert p.returncode == 2 and len(errors) == 1 and "cannot write the output" in errors[0], stderr
    assert not out.exists() and os.path.isdir(str(out) + ".partial")
    p = _cli("quantize", PYCODE, "--algorithm", "rtn", "--format", "fake", "--out", out)  # room again: it resumes
    _, stderr = p.communicate()
    assert p.returncode == 0 and "resuming" in stderr, stderr
    assert Checkpoint(str(out)).names
