"""The compressed_tensors format against the real `compressed-tensors` package: its own
decompressor unpacks every layer to exactly lowbit's dequantized weights; transformers (which
loads these folders through the package) computes the logits of lowbit's fake export; mixed plans,
MoE experts, re-export, the size of the packed tensors and refusals."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import detect_format, export, read_quantized
from lowbit.export.compressed import CompressedTensors
from lowbit.export.fake import Fake
from lowbit.model import ckpt_name

from conftest import PYCODE, STORIES, need_assets
from test_moe import build as build_moe
from tiny_models import ARCHS, build, data

WEIGHT_ONLY = ["W4A16G32", "W3A16G64-asym", "W2A16PC", "W5A16G32", "W8A16PC", "MXFP4A16", "NVFP4A16", "MXFP8A16",
               "FP8A16", "FP8G32A16", "FP8_BLOCKG16A16"]
WITH_INPUTS = ["W8A8", "W4A8G32", "MXFP4", "MXFP8", "FP8", "FP8_BLOCKG16"]  # tiny models: tiles of 16


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith("model") and f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as s:
                out |= {k: s.get_tensor(k) for k in s.keys()}
    return out


def _quant_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["quantization_config"]


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _close(got, want, what):
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max logit difference {err:.3g} (logits up to {scale:.3g})"


@pytest.mark.parametrize("scheme", WEIGHT_ONLY + WITH_INPUTS)
def test_package_decompressor_gives_lowbit_weights(scheme, tmp_path):
    """compressed-tensors' own compressor for each config group unpacks each layer's tensors to
    exactly what lowbit dequantizes (in the dtype the package unpacks to)."""
    model = build(ARCHS[0])
    r = lowbit.quantize(model, scheme, "rtn", progress=False)
    out = str(tmp_path / "ct")
    export(r, out, "compressed_tensors")
    cfg = QuantizationConfig.model_validate(_quant_config(out))
    groups = list(cfg.config_groups.values())
    tensors = _tensors(out)
    checked = 0
    for name, q in r.layers.items():
        cname = ckpt_name(model, name)
        if f"{cname}.weight" in tensors and f"{cname}.weight_scale" not in tensors:
            assert q.shape[1] % q.group_size, f"{name} written dense without a reason"
            assert cname in cfg.ignore
            continue
        group = next(g for g in groups if "Linear" in g.targets or cname in g.targets)
        compressor = BaseCompressor.get_value_from_registry(group.format)
        state = {k[len(cname) + 1:]: v for k, v in tensors.items() if k.startswith(cname + ".")}
        got = compressor.decompress(state, group)["weight"]
        want = q.dequantize(torch.float32).to(got.dtype)
        assert torch.equal(got, want), f"{scheme} {name}: unpacked weights differ"
        checked += 1
    assert checked >= 4


def _llama(dtype=torch.bfloat16):
    """A random Llama whose every layer packs (input sizes multiples of 128)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _fake_and_ct(model, scheme, tmp_path, tokenizer=None, **kw):
    r = lowbit.quantize(model, scheme, "rtn", progress=False, tokenizer=tokenizer, **kw)
    out = str(tmp_path / "out")
    export(r, out, "fake,compressed_tensors")
    return r, out + "/fake", out + "/compressed_tensors"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_transformers_loads_every_architecture(arch, tmp_path):
    _, ids = data()
    _, fake, ct = _fake_and_ct(build(arch), lowbit.Scheme(4, 32), tmp_path)
    assert detect_format(ct) is CompressedTensors
    want = _logits(transformers.AutoModelForCausalLM.from_pretrained(fake, local_files_only=True), ids)
    got = _logits(transformers.AutoModelForCausalLM.from_pretrained(ct, local_files_only=True), ids)
    _close(got, want, f"{arch.name} through transformers")
    _close(_logits(lowbit.load(ct)[0], ids), want, f"{arch.name} through lowbit.load")


@pytest.mark.parametrize("scheme", ["W4A16", "W8A16", "W2A16PC", "W3A16G64", "FP8A16", "MXFP4A16", "NVFP4A16",
                                    "MXFP8A16", "FP8", "FP8_BLOCK"])
def test_pycode_through_transformers(scheme, tmp_path):
    """pycode-7m (float32; MX and NV folders are bfloat16, as the package unpacks them) through
    transformers with the package, against lowbit's fake export of the same dtype. FP8 quantizes
    inputs per token (FP8_BLOCK per group of 128) exactly as the package's reference does."""
    need_assets()
    model, tok = lowbit.load(PYCODE)
    ids = tok("def add(a, b):\n    return a + b\n\nclass Stack:\n", return_tensors="pt").input_ids
    if scheme.startswith(("MX", "NV")):
        model = model.to(torch.bfloat16)
    _, fake, ct = _fake_and_ct(model, scheme, tmp_path, tok)
    got = transformers.AutoModelForCausalLM.from_pretrained(ct, local_files_only=True)
    assert got.dtype == (torch.bfloat16 if scheme.startswith(("MX", "NV")) else torch.float32)
    ref = Fake.load(fake)[0] if scheme in ("FP8", "FP8_BLOCK") else transformers.AutoModelForCausalLM.from_pretrained(fake,
                                                                                                      dtype=got.dtype)
    _close(_logits(got, ids), _logits(ref, ids), f"pycode-7m {scheme}")


@pytest.mark.parametrize("scheme", WITH_INPUTS + ["W3A16G64-asym", "MXFP8-rceil"])
def test_lowbit_loads_its_folders_with_their_inputs(scheme, tmp_path):
    """lowbit.load reads each folder back to the fake export's function, the inputs quantized as
    declared. (transformers cannot load asymmetric pack-quantized folders: compressed-tensors sizes
    their zero points unpacked when it builds the model; and its reference int8 input rounding
    divides by 127.5 where vLLM's kernels divide by 127, as lowbit does.)"""
    _, ids = data()
    # float32 for integer and FP8 weights (their scales are stored in the checkpoint's dtype);
    # bfloat16 for MX (E8M0 scales), as compressed-tensors unpacks them
    model = _llama(torch.bfloat16 if scheme.startswith("MX") else torch.float32)
    _, fake, ct = _fake_and_ct(model, scheme, tmp_path)
    _close(_logits(lowbit.load(ct)[0], ids), _logits(Fake.load(fake)[0], ids), scheme)
    back, mem = read_quantized(ct), read_quantized(fake)
    assert set(back.layers) == set(mem.layers)
    for n, q in back.layers.items():
        assert q.scheme == mem.layers[n].scheme
        assert torch.equal(q.codes, mem.layers[n].codes) and torch.equal(q.scale, mem.layers[n].scale)
    if scheme.endswith("rceil"):  # the rule rides in a key of its own, which the package's config ignores
        with open(os.path.join(ct, "config.json")) as f:
            assert json.load(f)["quantization_config"]["mx_input_scale"] == "rceil"
        transformers.AutoModelForCausalLM.from_pretrained(ct, local_files_only=True)


@pytest.mark.parametrize("model_dir", ["pycode", "stories"])
def test_mixed_plans_are_config_groups(model_dir, tmp_path):
    need_assets()
    model, tok = lowbit.load(PYCODE if model_dir == "pycode" else STORIES)
    ids = tok("def f(x):\n" if model_dir == "pycode" else "Once upon a time", return_tensors="pt").input_ids
    overrides = {r".*\.mlp\.down_proj": "W8A16PC", r".*\.0\.self_attn\..*": "W2A16G32", r".*\.1\.mlp\.up_proj": "FP8A16"}
    r, fake, ct = _fake_and_ct(model, "W4A16G32", tmp_path, tok, overrides=overrides)
    cfg = _quant_config(ct)
    assert cfg["format"] == "mixed-precision" and len(cfg["config_groups"]) == 4
    named = [n for g in cfg["config_groups"].values() for n in g["targets"]]
    assert sorted(named) == sorted(ckpt_name(model, n) for n in r.layers)
    assert "lm_head" in cfg["ignore"]
    want = _logits(transformers.AutoModelForCausalLM.from_pretrained(fake), ids)
    _close(_logits(transformers.AutoModelForCausalLM.from_pretrained(ct), ids), want, f"{model_dir} mixed")


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_experts_are_per_expert_modules(arch, tmp_path):
    need_assets()
    tok = lowbit.load(STORIES)[1]
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    r, fake, ct = _fake_and_ct(build_moe(arch), lowbit.Scheme(4, 32), tmp_path, tok)
    names = _tensors(ct)
    expert = "block_sparse_moe.experts.7.w2" if arch == "mixtral" else "mlp.experts.7.down_proj"
    assert f"model.layers.1.{expert}.weight_packed" in names
    router = "block_sparse_moe.gate" if arch == "mixtral" else "mlp.gate"
    assert f"model.layers.0.{router}" in _quant_config(ct)["ignore"]
    assert not [n for n in names if n.endswith(("gate_up_proj", "experts.down_proj"))]
    want = _logits(transformers.AutoModelForCausalLM.from_pretrained(fake), ids)
    _close(_logits(transformers.AutoModelForCausalLM.from_pretrained(ct), ids), want, arch)


def test_packed_size_for_4_bits_group_128(tmp_path):
    """A bfloat16 model at W4A16: the block tensors take at most 4/16 of their float16 bytes, +5%."""
    r = lowbit.quantize(_llama(), "W4A16", "rtn", progress=False)
    export(r, str(tmp_path / "ct"), "compressed_tensors")
    t = _tensors(str(tmp_path / "ct"))
    packed = sum(v.numel() * v.element_size() for k, v in t.items() if ".layers." in k and k.rsplit(".", 1)[1]
                 in ("weight_packed", "weight_scale", "weight_shape"))
    fp16 = sum(2 * q.codes.numel() for q in r.layers.values())
    assert packed <= fp16 * 4 / 16 * 1.05, f"{packed / fp16:.4f} of the float16 bytes"


def test_reexport_from_fake_is_byte_identical(tmp_path):
    need_assets()
    model, tok = lowbit.load(PYCODE)
    r = lowbit.quantize(model, "W4A16G32", "rtn", progress=False, tokenizer=tok,
                        overrides={r".*down_proj": "W3A16G64"})
    export(r, str(tmp_path / "a"), "fake,compressed_tensors")
    cmd = [sys.executable, "-m", "lowbit.cli", "export", str(tmp_path / "a" / "fake"), "--format",
           "compressed_tensors", "--out", str(tmp_path / "b")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with open(tmp_path / "a" / "compressed_tensors" / "model.safetensors", "rb") as a, \
            open(tmp_path / "b" / "model.safetensors", "rb") as b:
        assert a.read() == b.read()
    # and back: a compressed-tensors folder re-exports (here to fake) with the same codes
    cmd[4], cmd[-1] = str(tmp_path / "b"), str(tmp_path / "c")
    cmd[6] = "fake"
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    before, after = read_quantized(str(tmp_path / "a" / "fake")), read_quantized(str(tmp_path / "c"))
    for n, q in before.layers.items():
        assert torch.equal(after.layers[n].codes, q.codes) and torch.equal(after.layers[n].scale, q.scale)


def test_nvfp4_inputs_carry_their_calibrated_global_scale(tmp_path):
    """W4A4 NVFP4: each layer's input global scale is calibrated (448 * 6 / the largest input it
    saw on the calibration windows) and stored as input_global_scale; lowbit's fake export, its
    compressed-tensors folder and transformers' reading of that folder compute the same logits."""
    windows, ids = data()
    model = _llama()
    r = lowbit.quantize(model, "NVFP4", "rtn", windows, progress=False)
    scales = {n: q.extras["input_global_scale"] for n, q in r.layers.items()}
    assert len(scales) == len(r.layers) and all(float(v) > 0 for v in scales.values())
    assert len({float(v) for v in scales.values()}) > 1  # one per layer, not one for the model
    out = str(tmp_path / "out")
    export(r, out, "fake,compressed_tensors")
    t = _tensors(out + "/compressed_tensors")
    for n, v in scales.items():
        assert torch.equal(t[f"{ckpt_name(model, n)}.input_global_scale"], v.float().reshape(1))
    cfg = _quant_config(out + "/compressed_tensors")
    group = next(iter(cfg["config_groups"].values()))
    assert group["format"] == "nvfp4-pack-quantized" and group["input_activations"]["dynamic"] == "local"
    want = _logits(Fake.load(out + "/fake")[0], ids)
    _close(_logits(lowbit.load(out + "/compressed_tensors")[0], ids), want, "lowbit.load NVFP4")
    # transformers with the package: the same input global scales; the same function with the
    # inputs left unquantized on both sides (the package's reference quantizes bfloat16 inputs in
    # bfloat16 arithmetic, lowbit and the kernels in float32: see the next test for float32)
    got = transformers.AutoModelForCausalLM.from_pretrained(out + "/compressed_tensors", local_files_only=True)
    for n, v in scales.items():
        assert torch.equal(got.get_submodule(n).input_global_scale.float().reshape(()), v.float())
    _logits(got, ids)  # the package unpacks the weights on the first forward
    for m in got.modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = False
    plain = transformers.AutoModelForCausalLM.from_pretrained(out + "/fake", local_files_only=True)
    _close(_logits(got, ids), _logits(plain, ids), "transformers NVFP4 weights")


def test_nvfp4_input_quantizer_matches_the_package():
    """NVFP4 inputs with a static global scale: lowbit's quantizer and the package's reference give
    the same values in float32, inputs beyond the calibrated range included (they saturate)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from lowbit.qdq.act import get_activation

    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic="local",
                            symmetric=True, scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn)
    act = get_activation("nvfp4")
    torch.manual_seed(0)
    x = torch.randn(2, 9, 256) * 3
    for calibrated_amax in (x.abs().amax() * 1.5, x.abs().amax(), x.abs().amax() / 4):
        module = nn.Module()
        module.quantization_status = QuantizationStatus.FROZEN
        gs = act.calibrate(calibrated_amax)
        module.input_global_scale = gs.reshape(1)
        assert torch.equal(forward_quantize(module, x, "input", args), act(x, gs))
    assert act(x, act.calibrate(x.abs().amax() / 4)).abs().max() <= x.abs().amax() / 4 * (1 + 1e-6)


def test_refusals_and_warnings(tmp_path):
    need_assets()
    model, tok = lowbit.load(PYCODE)
    r = lowbit.quantize(model, "W3A16", "rtn", progress=False, tokenizer=tok)
    with pytest.warns(UserWarning, match="vLLM"):
        export(r, str(tmp_path / "w3"), "compressed_tensors")
    assert CompressedTensors().check(lowbit.get_scheme("W4A16-MXFP4")) is not None
    with pytest.raises(LowbitError, match="calibration data"):
        lowbit.quantize(build(ARCHS[0]), "NVFP4", "rtn", progress=False)
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", PYCODE, "--scheme", "NVFP4",
                        "--algorithm", "rtn", "--format", "compressed_tensors", "--out", str(tmp_path / "cli")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and not os.path.exists(tmp_path / "cli")
    assert len(p.stderr.strip().splitlines()) == 1 and "--dataset is required to calibrate" in p.stderr
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", PYCODE, "--scheme", "W4A16-MXFP4",
                        "--algorithm", "rtn", "--format", "compressed_tensors", "--out", str(tmp_path / "cli")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and not os.path.exists(tmp_path / "cli")
    assert len(p.stderr.strip().splitlines()) == 1 and "cannot declare mxfp4 inputs" in p.stderr


def test_cli_streams_nvfp4_with_calibrated_inputs(tmp_path):
    """The command line, streaming pycode-7m block by block: RTN runs the calibration windows
    through the blocks for the input scales, and the folder loads back as the fake export."""
    need_assets()
    out = tmp_path / "nv"
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", PYCODE, "--scheme", "NVFP4", "--algorithm",
                        "rtn", "--dataset", os.path.join(PYCODE, "calib.txt"), "--nsamples", "8", "--seqlen", "64",
                        "--format", "fake,compressed_tensors", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    t = _tensors(str(out / "compressed_tensors"))
    layers = read_quantized(str(out / "fake")).layers
    assert len(layers) == 42
    for n, q in layers.items():
        assert torch.equal(t[f"{n}.input_global_scale"], q.extras["input_global_scale"].reshape(1))
