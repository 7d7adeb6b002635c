"""Packed exports (auto_round, gptq), QuantLinear, lowbit.load of packed folders, lowbit export."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export import check_formats, export, parse_formats, read_quantized
from lowbit.quantized import quantize_weight
from lowbit.qdq.pack import unpack_rows
from lowbit.runtime import QuantLinear
from lowbit.export.packed import load_packed
from lowbit.runtime.quant_linear import unpack_words
from lowbit.schemes import Scheme

from conftest import PYCODE, STORIES, TINYSTORIES


def _ids(tokenizer, text_file, n=96):
    with open(text_file) as f:
        text = f.read()[:4000]
    return tokenizer(text, return_tensors="pt").input_ids[:, :n]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group,sym", [((64, 128), 32, True), ((40, 172), 32, False), ((96, 100), -1, True), ((32, 256), 128, False)])
def test_quant_linear_matches_dequantized(bits, shape, group, sym):
    torch.manual_seed(bits)
    w = torch.randn(*shape)
    q = quantize_weight(w, Scheme(bits, group, sym))
    bias = torch.randn(shape[0])
    layer = QuantLinear.from_quantized(q, bias)
    x = torch.randn(3, 5, shape[1])
    # scales are stored in float16, as in the checkpoint
    qh = q.replace(scale=q.scale.half().float())
    torch.testing.assert_close(layer(x), F.linear(x, qh.dequantize(), bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_words_matches_general_unpacker(bits):
    p = torch.randint(-2**31, 2**31 - 1, (bits * 3, 7), dtype=torch.int32)
    want = unpack_rows(p, bits, 0, p.shape[0] // bits * 32)
    assert torch.equal(unpack_words(p, bits, 0), want)


@pytest.fixture(scope="module")
def pycode_rtn():
    return lowbit.quantize(PYCODE, "W4A16", algorithm="rtn", progress=False)


@pytest.mark.parametrize("fmt", ["auto_round", "gptq"])
def test_packed_round_trip_pycode(pycode_rtn, fmt, tmp_path):
    r = pycode_rtn
    out = export(r, str(tmp_path / fmt), fmt)
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["bits"] == 4 and cfg["group_size"] == 128 and cfg["sym"] is True
    assert cfg["quant_method"] == ("auto-round" if fmt == "auto_round" else "gptq")
    model, tok = load_packed(out)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == len(r.layers) == 42
    ids = _ids(tok, f"{PYCODE}/heldout.txt")
    with torch.no_grad():
        ref, got = r.model(ids).logits, model(ids).logits
    # float16 storage of scales and embeddings is the only difference
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()
    assert got.argmax(-1).eq(ref.argmax(-1)).float().mean() > 0.97
    # the codes come back exactly
    back = read_quantized(out)
    for name, q in r.layers.items():
        assert torch.equal(back.layers[name].codes, q.codes), name
        assert torch.equal(back.layers[name].zero, q.zero.float()), name


def test_packed_file_is_small(pycode_rtn, tmp_path):
    out = export(pycode_rtn, str(tmp_path / "ar"), "auto_round")
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    fp16_bytes = sum(p.numel() * 2 for p in pycode_rtn.model.parameters())
    linear_fp16 = sum(q.codes.numel() * 2 for q in pycode_rtn.layers.values())
    # packed linears: 4/16 of fp16 plus scales; the embeddings and lm_head stay fp16
    expect = fp16_bytes - linear_fp16 + linear_fp16 * (4 + 16 * 2 / 128) / 16
    assert size < expect * 1.02
    model, _ = load_packed(out, dtype=torch.float16)
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert held < size * 1.15  # memory of the loaded model is close to the file size


def test_stories_dense_layers_and_mixed_plan(tmp_path):
    # stories260K's MLP (172 wide) cannot be packed for standard kernels: stored dense, marked
    # unquantized; a mixed plan gives per-layer overrides in both formats.
    overrides = {r"model\.layers\.0\.self_attn\..*": Scheme(8, 32, True), r"model\.layers\.4\.self_attn\.o_proj": Scheme(2, 32, False)}
    r = lowbit.quantize(STORIES, "W4A16G32", algorithm="rtn", overrides=overrides, progress=False)
    out = export(r, str(tmp_path / "q"), "auto_round,gptq")
    ar = json.load(open(os.path.join(out, "auto_round", "config.json")))["quantization_config"]
    gq = json.load(open(os.path.join(out, "gptq", "config.json")))["quantization_config"]
    assert ar["packing_format"] == "auto_round"  # an asymmetric layer: zero points stored as is
    assert ar["extra_config"]["model.layers.0.mlp.down_proj"]["bits"] == 16
    assert ar["extra_config"]["model.layers.0.self_attn.q_proj"]["bits"] == 8
    assert ar["extra_config"]["model.layers.4.self_attn.o_proj"] == {"bits": 2, "group_size": 32, "sym": False}
    assert gq["checkpoint_format"] == "gptq_v2"
    assert any(k.startswith("-:") and "down_proj" in k for k in gq["dynamic"])
    ids = _ids(r.tokenizer, TINYSTORIES)
    with torch.no_grad():
        ref = r.model(ids).logits
    for fmt in ("auto_round", "gptq"):
        model, _ = load_packed(os.path.join(out, fmt))
        bits = {n: m.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        assert bits["model.layers.0.self_attn.k_proj"] == 8 and bits["model.layers.4.self_attn.o_proj"] == 2
        assert "model.layers.0.mlp.up_proj" not in bits
        with torch.no_grad():
            got = model(ids).logits
        assert (got - ref).abs().max() < 0.03 * ref.abs().max(), fmt


def test_auto_round_loads_lowbit_checkpoint(pycode_rtn, tmp_path):
    auto_round = pytest.importorskip("auto_round", reason="auto-round is not installed (pip install auto-round)")
    import transformers

    out = export(pycode_rtn, str(tmp_path / "ar"), "auto_round")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, device_map="cpu")
    assert any("auto_round" in type(m).__module__ for m in hf.modules()), "auto-round did not build its layers"
    ids = _ids(pycode_rtn.tokenizer, f"{PYCODE}/heldout.txt")
    with torch.no_grad():
        ref = pycode_rtn.model(ids).logits
        got = hf(ids).logits.float()  # auto-round computes in float16 on CPU
    assert (got - ref).abs().max() < 0.03 * ref.abs().max(), auto_round.__version__


def test_format_checks():
    assert [f.tag for f in parse_formats("auto_round,gguf:q4_k")] == ["auto_round", "gguf-q4_k"]
    assert parse_formats("gguf")[0].option == "q4_0"
    for bad, msg in [("onnx", "unknown format"), ("gguf:q5_9", "unknown GGUF type"), ("gptq:x", "takes no option"),
                     ("gptq,gptq", "named twice")]:
        with pytest.raises(LowbitError, match=msg):
            parse_formats(bad)
    with pytest.raises(LowbitError, match="no 5-bit layout"):
        check_formats(parse_formats("gptq"), [Scheme(5, 128, True)])
    with pytest.raises(LowbitError, match="3 bits"):
        check_formats(parse_formats("gguf:q4_0"), [Scheme(3, 32, True)])
    with pytest.raises(LowbitError, match="symmetric only"):
        check_formats(parse_formats("gguf:q4_0"), [Scheme(4, 32, False)])
    with pytest.raises(LowbitError, match="multiple of 32"):
        check_formats(parse_formats("gguf:q8_0"), [Scheme(8, 48, True)])
    check_formats(parse_formats("gguf:q4_0"), [Scheme(4, 128, True), Scheme(4, -1, True)])  # 32-blocks of the same scale
    with pytest.raises(LowbitError, match="llama"):
        check_formats(parse_formats("gguf:f16"), [], "gpt_neox")
    check_formats(parse_formats("auto_round,gguf:q4_k"), [Scheme(4, 128, False)], "llama")


def test_export_is_atomic(pycode_rtn, tmp_path, monkeypatch):
    import lowbit.export.packed as packed

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(packed.PackedWriter, "close", boom)
    with pytest.raises(RuntimeError):
        export(pycode_rtn, str(tmp_path / "q"), "fake,auto_round")
    assert os.listdir(tmp_path) == []  # neither the folder nor a temporary one is left


def test_cli_format_errors_write_nothing(tmp_path, capsys):
    out = tmp_path / "q"
    for argv, msg in [(["--scheme", "W3A16", "--format", "gguf:q4_0"], "3 bits"),
                      (["--bits", "5", "--format", "auto_round"], "no 5-bit layout"),
                      (["--format", "tflite"], "unknown format")]:
        rc = main(["quantize", PYCODE, "--algorithm", "rtn", "--out", str(out), *argv])
        assert rc == 2 and msg in capsys.readouterr().err
        assert not out.exists()


def test_cli_quantize_export_eval(tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", STORIES, "--scheme", "W4A16G32", "--algorithm", "rtn", "--out", str(q), "--quiet"]) == 0
    assert main(["export", str(q), "--format", "auto_round,gptq", "--out", str(tmp_path / "x")]) == 0
    assert main(["export", str(q), "--format", "gptq", "--out", str(tmp_path / "x")]) == 2
    assert "already exists" in capsys.readouterr().err
    text = TINYSTORIES
    ppl = {}
    for name, folder in [("fake", q), ("auto_round", tmp_path / "x" / "auto_round"), ("gptq", tmp_path / "x" / "gptq")]:
        capsys.readouterr()
        assert main(["eval", str(folder), "--text", text, "--eval-seqlen", "128", "--eval-windows", "8"]) == 0
        ppl[name] = json.loads(capsys.readouterr().out)["ppl"]
    assert abs(ppl["auto_round"] / ppl["fake"] - 1) < 0.01 and abs(ppl["gptq"] / ppl["fake"] - 1) < 0.01
    assert main(["export", str(tmp_path / "missing"), "--format", "gptq", "--out", str(tmp_path / "y")]) == 2


def test_cli_gguf_export(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    from lowbit.export.gguf import read_gguf_weights

    q = tmp_path / "q"
    assert main(["quantize", PYCODE, "--scheme", "W4A16G32", "--algorithm", "rtn", "--out", str(q), "--quiet",
                 "--format", "fake,gguf:q4_0"]) == 0
    path = q / "gguf-q4_0" / "model-q4_0.gguf"
    weights = read_gguf_weights(str(path))
    fake = lowbit.load(str(q / "fake"))[0]
    want = fake.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(torch.from_numpy(weights["blk.0.ffn_down.weight"]).float(), want, rtol=0, atol=2e-3)
    assert main(["export", str(q / "fake"), "--format", "gguf:q8_0", "--out", str(tmp_path / "g")]) == 2


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_words_along_columns(bits):
    p = torch.randint(-2**31, 2**31 - 1, (5, bits * 2), dtype=torch.int32)
    assert torch.equal(unpack_words(p, bits, 1), unpack_rows(p, bits, 1, p.shape[1] // bits * 32))
