"""llama.cpp's mixes (lowbit/mixes.py): the per-tensor types follow llama.cpp's rules
(llama_tensor_get_type in src/llama-quant.cpp), the embedding and output are rounded too, and the
GGUF file holds exactly the fake-quantized model's weights in the mix's types."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lowbit
from lowbit.mixes import MIXES, expand_mix, mix_name, tensor_type, use_more_bits
from lowbit.errors import LowbitError
from lowbit.pipeline import quantize_outside
from lowbit.schemes import get_scheme

from conftest import ASSETS, assert_quantize_refused, need_assets

PYCODE = os.path.join(ASSETS, "models", "pycode-7m")


def types(mix, category, n=32, gqa=1, n_expert=1):
    return [tensor_type(mix, category, i, n, gqa, n_expert) for i in range(n)]


def test_layers_that_get_more_bits():
    # 32 layers: the first 4, the last 4, and every third between (6, 9, ..., 27)
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    # 6 layers (pycode-7m): n/8 = 0, so layers 2 and 5 (every third) and 5 (7n/8 = 5)
    assert [i for i in range(6) if use_more_bits(i, 6)] == [2, 5]


def test_mix_rules_as_llama_cpp_states_them():
    more = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    q4km = ["q6_k" if i in more else "q4_k" for i in range(32)]
    assert types("q4_k_m", "attn_v") == q4km and types("q4_k_m", "ffn_down") == q4km
    assert set(types("q4_k_m", "attn_q") + types("q4_k_m", "ffn_up") + types("q4_k_m", "attn_output")) == {"q4_k"}
    # Q3_K_M: attn_v Q5_K in the first two layers, Q4_K after; ffn_down Q5_K in the first 32/16; attn_output Q4_K
    assert types("q3_k_m", "attn_v") == ["q5_k"] * 2 + ["q4_k"] * 30
    assert types("q3_k_m", "ffn_down") == ["q5_k"] * 2 + ["q4_k"] * 30
    assert set(types("q3_k_m", "attn_output")) == {"q4_k"} and set(types("q3_k_m", "ffn_gate")) == {"q3_k"}
    assert set(types("q3_k_s", "attn_v") + types("q3_k_s", "ffn_down")) == {"q3_k"}
    assert set(types("q3_k_l", "attn_v") + types("q3_k_l", "ffn_down") + types("q3_k_l", "attn_output")) == {"q5_k"}
    # Q2_K_S: ffn_down Q4_K in the first eighth; attn_v Q4_K only with grouped-query attention of 4+
    assert types("q2_k_s", "ffn_down") == ["q4_k"] * 4 + ["q2_k"] * 28
    assert set(types("q2_k_s", "attn_v", gqa=1)) == {"q2_k"} and set(types("q2_k_s", "attn_v", gqa=4)) == {"q4_k"}
    # llama.cpp's Q2_K: attn_v Q3_K (Q4_K with gqa 4+), ffn_down and attn_output Q3_K
    assert set(types("q2_k_mix", "attn_v", gqa=2)) == {"q3_k"} and set(types("q2_k_mix", "attn_v", gqa=4)) == {"q4_k"}
    assert set(types("q2_k_mix", "ffn_down") + types("q2_k_mix", "attn_output")) == {"q3_k"}
    assert set(types("q2_k_mix", "ffn_up") + types("q2_k_mix", "attn_q")) == {"q2_k"}
    # Q4_K_S: attn_v Q5_K in the first 4, ffn_down in the first eighth
    assert types("q4_k_s", "attn_v") == ["q5_k"] * 4 + ["q4_k"] * 28
    assert types("q4_k_s", "ffn_down") == ["q5_k"] * 4 + ["q4_k"] * 28
    # 8 experts (Mixtral): attn_v and attn_k Q8_0, attn_output Q5_K
    assert set(types("q4_k_m", "attn_v", n_expert=8) + types("q4_k_m", "attn_k", n_expert=8)) == {"q8_0"}
    assert set(types("q3_k_m", "attn_output", n_expert=8)) == {"q5_k"}
    # fused attention (phi3)
    assert set(types("q4_k_m", "attn_qkv")) == {"q5_k"} and set(types("q3_k_s", "attn_qkv")) == {"q3_k"}


def test_mix_names():
    assert mix_name("Q4_K_M") == "q4_k_m" and mix_name("gguf:q3_k_m") == "q3_k_m"
    assert mix_name("Q2_K_MIX") == "q2_k_mix" and mix_name("Q2_K") is None  # the plain type
    assert mix_name("Q4_K") is None and mix_name("W4A16") is None and mix_name(get_scheme("W4A16")) is None
    with pytest.raises(LowbitError, match="unknown llama.cpp mix 'Q9_K_M'"):
        expand_mix("Q9_K_M", None, [], "model.layers")


def _model(tied: bool, hidden: int, vocab: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=vocab, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied,hidden,outside", [
    (False, 256, {"model.embed_tokens": "gguf:q3_k", "lm_head": "gguf:q6_k"}),
    (True, 256, {"model.embed_tokens": "gguf:q6_k"}),  # one tensor for both: the output's type
    (True, 320, {"model.embed_tokens": "gguf:q8_0"}),  # rows that are not whole super-blocks
])
def test_outside_the_blocks(tied, hidden, outside):
    from lowbit.allocate.plan import block_layers

    model = _model(tied, hidden)
    m = expand_mix("Q3_K_M", model, list(block_layers(model)), "model.layers")
    assert {k: s.name for k, s in m.outside.items()} == outside
    assert m.file_type == "MOSTLY_Q3_K_M" and m.scheme.name == "gguf:q3_k"
    assert m.layers["model.layers.0.self_attn.v_proj"].name == "gguf:q5_k"
    assert m.layers["model.layers.2.self_attn.v_proj"].name == "gguf:q4_k"
    assert m.layers["model.layers.7.mlp.up_proj"].name == "gguf:q3_k"
    # 4 heads over 1 kv head (gqa 4): Q2_K_S gives attn_v Q4_K
    m2 = expand_mix("Q2_K_S", model, list(block_layers(model)), "model.layers")
    assert m2.layers["model.layers.5.self_attn.v_proj"].name == "gguf:q4_k"


def test_outside_rounding_searches_the_range_and_chunks_alike():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 512, generator=g) * 0.02
    w[3, 5] = 0.5
    for name in ("gguf:q2_k", "gguf:q4_k", "gguf:q6_k"):
        scheme = get_scheme(name)
        searched = quantize_outside(w, scheme)
        plain = lowbit.quantized.quantize_weight(w, scheme)
        err = lambda q: (q.dequantize() - w).pow(2).sum().item()  # noqa: E731
        assert err(searched) <= err(plain)
        if name == "gguf:q2_k":
            assert err(searched) < 0.95 * err(plain)
        chunked = quantize_outside(w, scheme, rows=7)
        assert torch.equal(chunked.dequantize(), searched.dequantize())
        assert torch.equal(chunked.codes, searched.codes)


def test_outside_of_a_bad_module_is_refused():
    model = _model(False, 256)
    with pytest.raises(LowbitError, match="model.norm has a 1-D weight"):
        lowbit.quantize(model, "gguf:q4_k", "rtn", outside={"model.norm": "gguf:q4_k"}, progress=False)
    with pytest.raises(LowbitError, match="no module 'model.nothing'"):
        lowbit.quantize(model, "gguf:q4_k", "rtn", outside={"model.nothing": "gguf:q4_k"}, progress=False)


def test_mix_through_the_cli_writes_the_fake_weights_in_llama_cpp_types(tmp_path):
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    from lowbit.allocate.plan import block_layers
    from lowbit.export.gguf import gguf_name, read_gguf_weights, rotary_row_order
    from lowbit.model import load_model

    need_assets()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", PYCODE, "--scheme", "Q3_K_M", "--algorithm", "rtn",
                        "--format", "fake,gguf", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "left in full precision: none" in r.stdout and "gguf-q3_k_m/" in r.stdout
    assert "outside the blocks model.embed_tokens gguf:q3_k, lm_head gguf:q6_k" in r.stderr
    path = out / "gguf-q3_k_m" / "model-q3_k_m.gguf"
    reader = gguf.GGUFReader(path)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q3_K_M)
    kinds = {t.name: t.tensor_type.name.lower() for t in reader.tensors}

    model, _ = load_model(PYCODE)
    mix = expand_mix("Q3_K_M", model, list(block_layers(model)), "model.layers")
    expected = {gguf_name(n + ".weight"): s.dtype for n, s in {**mix.layers, **mix.outside}.items()}
    assert {k: kinds[k] for k in expected} == expected
    assert expected["token_embd.weight"] == "q3_k" and expected["output.weight"] == "q6_k"
    assert expected["blk.0.attn_v.weight"] == "q5_k" and expected["blk.0.ffn_gate.weight"] == "q3_k"

    got = read_gguf_weights(path)
    cfg = model.config
    for name, t in load_file(out / "fake" / "model.safetensors").items():
        g, a = gguf_name(name), t.float().numpy()
        if ".attn_q." in g:
            a = a[rotary_row_order(a.shape[0], cfg.num_attention_heads)]
        elif ".attn_k." in g:
            a = a[rotary_row_order(a.shape[0], cfg.num_key_value_heads)]
        assert np.array_equal(got[g].reshape(a.shape), a), g

    # re-exported from the fake folder: the same file, named for the mix
    again = tmp_path / "again"
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "export", str(out / "fake"), "--format", "gguf",
                        "--out", str(again)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (again / "model-q3_k_m.gguf").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--scheme", "Q4_K_M", "--bits", "3"], "--scheme Q4_K_M sets every layer's type; it does not take --bits"),
    (["--scheme", "q4_k_m", "--quantize-lm-head"], "it does not take --quantize-lm-head"),
    (["--scheme", "Q4_K_M", "--format", "auto_round"], "format auto_round stores integer weights, not q4_k"),
])
def test_bad_mix_input_is_refused_before_work(args, message, tmp_path):
    assert_quantize_refused(PYCODE, args, message, tmp_path)


# a model whose every mix rule shows: 16 layers (the n/8 and n/16 rules), gqa 4 or 2, 8 experts
LLAMA_CPP_MODELS = {
    "llama-gqa4": lambda t: t.LlamaConfig(num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=1),
    "llama-gqa2": lambda t: t.LlamaConfig(num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=True),
    "mixtral-8": lambda t: t.MixtralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
}


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("model_kind", list(LLAMA_CPP_MODELS))
def test_every_mix_has_llama_cpp_quantizers_tensor_types(model_kind, tmp_path):
    """lowbit's file of each mix holds every tensor in the type llama.cpp's own quantizer gives it
    (llama_model_quantize on the f16 file), so the two files are the same size. Q2_K_S is left out:
    llama.cpp refuses it without an importance matrix."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check needs: pip install llama-cpp-python")
    gguf = pytest.importorskip("gguf")
    import copy
    import ctypes

    import transformers

    from lowbit.export.gguf import write_gguf
    from lowbit.model import load_model

    need_assets()
    _, tok = load_model(os.path.join(ASSETS, "models", "stories260K"))
    cfg = LLAMA_CPP_MODELS[model_kind](transformers)
    cfg.update(dict(hidden_size=256, intermediate_size=512, vocab_size=len(tok), max_position_embeddings=64))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    f16 = tmp_path / "f16.gguf"
    write_gguf(model, tok, {}, f16, "f16", name="m")
    kinds = lambda path: {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}  # noqa: E731
    for mix in [m for m in MIXES if m != "q2_k_s"]:
        theirs = tmp_path / f"llama-{mix}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{MIXES[mix][1]}")
        params.nthread = 1
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
        m = copy.deepcopy(model)
        r = lowbit.quantize(m, mix.upper(), "rtn", progress=False)
        ours = tmp_path / f"lowbit-{mix}.gguf"
        write_gguf(m, tok, r.layers, ours, mix, name="m")
        assert kinds(ours) == kinds(theirs), mix
        assert ours.stat().st_size == theirs.stat().st_size, mix


def test_llama_cpp_input_rounding():
    """q8_k / q8_0: llama.cpp's rounding of a layer's input before the integer dot product. q8_0
    against the gguf package's quantizer (which rounds ties away from zero: at most one step
    apart, and rarely); q8_k by its definition (blocks of 256, the largest magnitude onto 127)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    from lowbit.qdq.act import get_activation

    x = torch.randn(6, 1024, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 1024)
    x[2, :256] = 0  # an empty block stays zero
    q8_0 = get_activation("q8_0")(x)
    ref = torch.from_numpy(dequantize(quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                      gguf.GGMLQuantizationType.Q8_0)).reshape(x.shape)
    step = x.view(6, -1, 32).abs().amax(-1, keepdim=True).half().float() / 127
    off = ((q8_0 - ref).view(6, -1, 32).abs() / step.clamp(min=1e-30))
    assert off.max() <= 1.001 and (off > 0.5).float().mean() < 1e-3
    q8_k = get_activation("q8_k")(x)
    blocks, got = x.view(6, 4, 256), q8_k.view(6, 4, 256)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    codes = got / d.clamp(min=1e-30)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.001
    assert torch.equal(got.abs().amax(-1), blocks.abs().amax(-1))
    assert ((got - blocks).abs() <= d / 2 * 1.0001 + 1e-12).all()
    assert torch.equal(q8_k[2, :256], torch.zeros(256)) and not torch.equal(q8_k, x)


def test_q8_mix_rounds_block_inputs_and_writes_the_same_file(tmp_path):
    """`Q3_K_M-q8` gives every block layer llama.cpp's input rounding for its type (q8_k, or q8_0
    for a fallback type), the outside layers none, the same llama.cpp file type; round to nearest
    does not look at inputs, so its weights and GGUF file are those of plain Q3_K_M, while the
    model computes with its inputs rounded."""
    pytest.importorskip("gguf")
    from lowbit.allocate.plan import block_layers
    from lowbit.export.gguf import write_gguf
    from lowbit.model import load_model

    need_assets()
    _, tok = load_model(os.path.join(ASSETS, "models", "stories260K"))

    assert mix_name("Q3_K_M-q8") == "q3_k_m-q8" and mix_name("gguf:q4_k_m-Q8") == "q4_k_m-q8"
    assert mix_name("Q3_K-q8") is None and get_scheme("Q3_K-q8").name == "gguf:q3_k-q8"
    model = _model(False, 320, len(tok))  # 512-wide ffn_down: q3_k / q4_k; 320 wide: not whole super-blocks
    m = expand_mix("Q3_K_M-q8", model, list(block_layers(model)), "model.layers")
    assert m.file_type == "MOSTLY_Q3_K_M" and m.scheme.name == "gguf:q3_k-q8"
    assert all(s.act is None for s in m.outside.values())
    r = lowbit.quantize(model, "Q3_K_M-q8", lowbit.RTN(search=False), progress=False)
    acts = {n: (q.scheme.dtype, q.scheme.act) for n, q in r.layers.items() if ".layers." in n}
    assert acts["model.layers.0.mlp.down_proj"] == ("q4_k", "q8_k")  # 512 inputs
    assert acts["model.layers.0.mlp.up_proj"] == ("q4_0", "q8_0")  # 320 inputs: llama.cpp's fallback
    assert {a for _, a in acts.values()} == {"q8_k", "q8_0"}

    plain_model = _model(False, 320, len(tok))
    plain = lowbit.quantize(plain_model, "Q3_K_M", lowbit.RTN(search=False), progress=False)
    for n, q in plain.layers.items():
        assert torch.equal(q.dequantize(), r.layers[n].dequantize()), n
    ids = torch.randint(0, len(tok), (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, plain_model(input_ids=ids).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05 * b.abs().max().item())
    write_gguf(model, tok, r.layers, tmp_path / "q8.gguf", "q3_k_m", name="m")
    write_gguf(plain_model, tok, plain.layers, tmp_path / "plain.gguf", "q3_k_m", name="m")
    assert (tmp_path / "q8.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()
