"""Quantized inputs through the whole tool: a W4A4 model computes with its inputs quantized after
lowbit.quantize, after its fake folder is loaded back, and in the perplexity the command line
reports; SignRound tunes under them; formats that cannot store a scheme refuse it up front."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lowbit
from conftest import TINYSTORIES, STORIES, need_assets
from lowbit.export import export, load
from lowbit.model import load_model


def lowbit_cli(*args):
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)], capture_output=True, text=True)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids():
    need_assets()
    return torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme", ["MXFP4", "NVFP4", "FP8", "W4A8"])
def test_quantized_model_quantizes_its_inputs(scheme, ids, tmp_path, stories_text):
    model, tok = load_model(STORIES)
    # NVFP4's input global scales are calibrated: RTN runs the calibration windows through the blocks
    data = dict(dataset=TINYSTORIES, nsamples=8, seqlen=64) if scheme == "NVFP4" else {}
    r = lowbit.quantize(model, scheme, "rtn", tokenizer=tok, progress=False, **data)
    if scheme == "NVFP4":
        assert all("input_global_scale" in q.extras for q in r.layers.values())
    assert all(s["act"] == lowbit.get_scheme(scheme).act for s in r.report["layers"].values())
    with_inputs = logits(r.model, ids)
    # the same dequantized weights with 16-bit inputs compute something else
    plain, _ = load_model(STORIES)
    modules = dict(plain.named_modules())
    with torch.no_grad():
        for name, q in r.layers.items():
            modules[name].weight.copy_(q.dequantize())
    assert not torch.allclose(logits(plain, ids), with_inputs)
    # the fake folder loads back with its inputs quantized: the same function
    export(r, tmp_path / "q", "fake")
    again, _ = load(str(tmp_path / "q"))
    assert torch.equal(logits(again, ids), with_inputs)
    # and the codes read back as written (NVFP4's global scale too)
    from lowbit.export.fake import read_fake_layers

    back = read_fake_layers(str(tmp_path / "q"))
    for name, q in r.layers.items():
        assert torch.equal(back[name].dequantize(), q.dequantize()), name


def test_signround_tunes_under_quantized_inputs(stories_text):
    model, tok = load_model(STORIES)
    rtn = lowbit.quantize(load_model(STORIES)[0], "MXFP4", "rtn", progress=False)
    from lowbit.calib import make_windows, tokenize

    windows = make_windows(tokenize(tok, stories_text[0]), 16, 128, seed=0)
    r = lowbit.quantize(model, "MXFP4", lowbit.SignRound(iters=30, batch_size=4, amp=False, drop=0.001), windows,
                        progress=False)
    blocks = r.report["blocks"]
    assert all(0 < b["loss_calib"] <= b["loss_start"] for b in blocks)
    assert any(b["loss_calib"] < b["loss_start"] for b in blocks)
    changed = sum(int((r.layers[n].codes != rtn.layers[n].codes).sum()) for n in r.layers)
    assert changed > 0


@pytest.mark.parametrize("args,message", [
    (["--scheme", "MXFP4", "--format", "auto_round"], "format auto_round stores integer weights, not mxfp (MXFP4)"),
    (["--scheme", "W4A8", "--format", "gptq"], "format gptq stores weight-only schemes; W4A8 quantizes inputs"),
    (["--scheme", "NVFP4", "--format", "gguf:q4_0"], "gguf:q4_0 stores integer weights with 16-bit inputs"),
    (["--scheme", "NVFP4", "--group-size", "32"], "nvfp needs groups of 16"),
    (["--scheme", "MXFP4", "--asym"], "mxfp is symmetric only"),
])
def test_bad_float_input_is_refused_before_work(args, message, tmp_path):
    need_assets()
    out = tmp_path / "out"
    r = lowbit_cli("quantize", STORIES, "--algorithm", "rtn", "--out", out, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial")


def test_cli_reports_the_w4a4_perplexity(tmp_path, stories_text):
    """The streamed command's perplexity is the quantized-input model's: lowbit eval on the folder
    gives the same number, and it differs from the same weights with 16-bit inputs."""
    need_assets()
    text = tmp_path / "eval.txt"
    text.write_text(stories_text[1])
    out = tmp_path / "q"
    r = lowbit_cli("quantize", STORIES, "--scheme", "MXFP4", "--algorithm", "rtn", "--out", out,
                   "--eval-text", text, "--eval-seqlen", 128, "--eval-windows", 8)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "quantization.json").read_text())
    e = lowbit_cli("eval", out, "--text", text, "--eval-seqlen", 128, "--eval-windows", 8)
    assert e.returncode == 0, e.stderr
    assert f"perplexity {report['eval']['ppl_quantized']:.4f}" in e.stderr
    weights_only = tmp_path / "w"
    r = lowbit_cli("quantize", STORIES, "--scheme", "MXFP4A16", "--algorithm", "rtn", "--out", weights_only,
                   "--eval-text", text, "--eval-seqlen", 128, "--eval-windows", 8)
    assert r.returncode == 0, r.stderr
    ppl_a16 = json.loads((weights_only / "quantization.json").read_text())["eval"]["ppl_quantized"]
    assert ppl_a16 != report["eval"]["ppl_quantized"]
