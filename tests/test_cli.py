"""The command line, end to end, and its answers to bad input (one line, exit 2, nothing written)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import STORIES, TINYSTORIES, need_assets


def lowbit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    need_assets()
    d = tmp_path_factory.mktemp("texts")
    with open(TINYSTORIES) as f:
        text = f.read()
    n = len(text)
    (d / "calib.txt").write_text(text[: int(0.6 * n)])
    (d / "eval.txt").write_text(text[int(0.8 * n) :])
    (d / "short.txt").write_text("Once upon a time.")
    return d


def test_quantize_and_eval_end_to_end(tmp_path, texts):
    out = tmp_path / "q"
    r = lowbit("quantize", STORIES, "--scheme", "W4A16", "--group-size", "32", "--dataset", texts / "calib.txt",
               "--seqlen", 128, "--nsamples", 16, "--iters", 20, "--no-prescale", "--no-bf16", "--keep", "best", "--block-target", "block", "--loss", "mse", "--out", out, "--eval-text", texts / "eval.txt",
               "--eval-seqlen", 256, "--eval-windows", 20)
    assert r.returncode == 0, r.stderr
    assert "block 5/5" in r.stderr and "loss" in r.stderr and "ms/iter" in r.stderr
    assert "perplexity on" in r.stdout and f"wrote {out}" in r.stdout
    report = json.loads((out / "quantization.json").read_text())
    assert report["scheme"]["bits"] == 4 and report["scheme"]["group_size"] == 32
    assert report["algorithm"] == {"name": "signround", "iters": 20, "lr": None, "batch_size": 8, "tune_minmax": True,
                                   "prescale": False, "minmax_max": 1.0, "keep": "best", "compile": None, "amp": False,
                                   "drop": 0.0, "target": "block", "loss": "mse"}
    assert all(b["amp"] is None for b in report["blocks"])  # --no-bf16: float32 tuning
    assert len(report["layers"]) == 35 and report["unquantized"] == ["model.embed_tokens.weight"]  # tied to lm_head
    assert len(report["calibration"]["sha256"]) == 64 and report["calibration"]["nsamples"] == 16
    assert len(report["blocks"]) == 5 and all(b["loss_best"] > 0 and b["kept"] == "best" for b in report["blocks"])
    # every block has its loss on all the windows, and its start's: the lower one was kept
    assert all(0 < b["loss_calib"] <= b["loss_start"] for b in report["blocks"])
    assert report["lowbit_version"]
    ppl_q = report["eval"]["ppl_quantized"]
    assert report["eval"]["ppl_original"] < ppl_q < 2 * report["eval"]["ppl_original"]

    # Plain transformers loads the folder; lowbit eval gives the same perplexity.
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    from safetensors.torch import load_file

    codes = load_file(out / "quantized_weights.safetensors")
    w = model.model.layers[0].mlp.down_proj.weight
    assert codes["model.layers.0.mlp.down_proj.codes"].shape == w.shape
    e = lowbit("eval", out, "--text", texts / "eval.txt", "--eval-seqlen", 256, "--eval-windows", 20)
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["ppl"] == pytest.approx(ppl_q, rel=1e-5)


def test_light_preset_and_what_overrides_it(tmp_path, texts):
    """--preset light is 100 steps of 4 windows; a flag given wins over the preset, the rest stays."""
    def algorithm(name, *flags):
        out = tmp_path / name
        r = lowbit("quantize", STORIES, "--scheme", "W4A16G32", "--dataset", texts / "calib.txt", "--seqlen", 64,
                   "--nsamples", 8, "--preset", "light", *flags, "--out", out, "--quiet")
        assert r.returncode == 0, r.stderr
        report = json.loads((out / "quantization.json").read_text())
        assert all(b["iters"] == report["algorithm"]["iters"] for b in report["blocks"])
        return report["algorithm"], report["calibration"]["nsamples"]

    light, nsamples = algorithm("light")
    assert (light["iters"], light["batch_size"], nsamples) == (100, 4, 8)
    short, _ = algorithm("short", "--iters", 3)
    assert (short["iters"], short["batch_size"]) == (3, 4)
    wide, _ = algorithm("wide", "--batch-size", 8)
    assert (wide["iters"], wide["batch_size"]) == (100, 8)


def test_rtn_needs_no_dataset_and_parents_are_created(tmp_path):
    need_assets()
    out = tmp_path / "new" / "dir" / "q"
    r = lowbit("quantize", STORIES, "--algorithm", "rtn", "--scheme", "W8A16", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").exists()


def corrupt_model(tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(STORIES, d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    return d


def nan_model(tmp_path):
    d = tmp_path / "nan"
    shutil.copytree(STORIES, d)
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    k = next(k for k in sd if "q_proj" in k)
    sd[k][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def no_blocks_model(tmp_path):
    d = tmp_path / "noblocks"
    d.mkdir()
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)  # Conv1D layers, no nn.Linear blocks
    shutil.copy(os.path.join(STORIES, "tokenizer.json"), d)
    shutil.copy(os.path.join(STORIES, "tokenizer_config.json"), d)
    return d


BAD = {
    "missing model": (lambda t, x: ["quantize", t / "nope", "--dataset", x / "calib.txt"], "model folder not found"),
    "corrupt model": (lambda t, x: ["quantize", corrupt_model(t), "--dataset", x / "calib.txt"], "corrupt safetensors header"),
    "nan weights": (lambda t, x: ["quantize", nan_model(t), "--dataset", x / "calib.txt"], "NaN or Inf"),
    "no blocks": (lambda t, x: ["quantize", no_blocks_model(t), "--dataset", x / "calib.txt"], "no transformer blocks"),
    "bits 1": (lambda t, x: ["quantize", STORIES, "--bits", 1, "--dataset", x / "calib.txt"], "bits must be an integer from 2 to 8"),
    "bits 9": (lambda t, x: ["quantize", STORIES, "--bits", 9, "--dataset", x / "calib.txt"], "bits must be an integer from 2 to 8"),
    "group 0": (lambda t, x: ["quantize", STORIES, "--group-size", 0, "--dataset", x / "calib.txt"], "group_size must be"),
    "group -2": (lambda t, x: ["quantize", STORIES, "--group-size", -2, "--dataset", x / "calib.txt"], "group_size must be"),
    "short text": (lambda t, x: ["quantize", STORIES, "--dataset", x / "short.txt", "--seqlen", 128], "calibration text too short"),
    "empty text": (lambda t, x: ["quantize", STORIES, "--dataset", _empty(t)], "empty.txt is empty"),
    "missing text": (lambda t, x: ["quantize", STORIES, "--dataset", t / "nope.txt"], "calibration text not found"),
    "no dataset": (lambda t, x: ["quantize", STORIES], "--dataset is required"),
    "unknown scheme": (lambda t, x: ["quantize", STORIES, "--scheme", "W5Z", "--dataset", x / "calib.txt"], "unknown scheme"),
    "unknown algorithm": (lambda t, x: ["quantize", STORIES, "--algorithm", "magic", "--dataset", x / "calib.txt"], "unknown algorithm"),
}


def _empty(t):
    (t / "empty.txt").write_text("")
    return t / "empty.txt"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, tmp_path, texts):
    make_args, message = BAD[case]
    out = tmp_path / "out"
    r = lowbit(*make_args(tmp_path, texts), "--out", out, "--iters", 1, "--nsamples", 2, "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.startswith("lowbit: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lowbit-tmp")]


def test_existing_output_refused_then_overwritten(tmp_path, texts):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["quantize", STORIES, "--algorithm", "rtn", "--out", out, "--quiet"]
    r = lowbit(*args)
    assert r.returncode == 2 and "output folder already exists" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = lowbit(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "quantization.json").exists()


def test_eval_missing_text(tmp_path):
    need_assets()
    r = lowbit("eval", STORIES, "--text", tmp_path / "nope.txt")
    assert r.returncode == 2 and "evaluation text not found" in r.stderr
