"""GGUF export (llama.cpp): metadata, tokenizer, tensor names and shapes, and the weights read back
with the gguf package's own dequantizer, on the real stories260K (SentencePiece, tied, MLP 172)
and pycode-7m (byte-level BPE, untied)."""
import math
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF export needs: pip install gguf")

import lowbit  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.export.gguf import (  # noqa: E402
    encode_q4_k,
    gguf_name,
    read_gguf_weights,
    rotary_row_order,
    write_gguf,
)
from lowbit.quantized import quantize_weight  # noqa: E402
from lowbit.schemes import Scheme  # noqa: E402

from conftest import ASSETS, STORIES, TINYSTORIES, need_assets  # noqa: E402

PYCODE = os.path.join(ASSETS, "models", "pycode-7m")
Q = gguf.GGMLQuantizationType


def quantized(path, text, scheme):
    need_assets()
    torch.manual_seed(0)
    return lowbit.quantize(path, scheme, algorithm="rtn", dataset=text, nsamples=8, seqlen=64, progress=False)


@pytest.fixture(scope="module")
def stories():
    return quantized(STORIES, TINYSTORIES, "W4A16G32")


@pytest.fixture(scope="module")
def pycode():
    return quantized(PYCODE, os.path.join(PYCODE, "calib.txt"), "W4A16G32")


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def llama_rows(model, gname, w):
    """The HF weight in llama.cpp's row order (q/k rotary permutation undone as the converter does)."""
    cfg = model.config
    if ".attn_q." in gname:
        return w[rotary_row_order(w.shape[0], cfg.num_attention_heads)]
    if ".attn_k." in gname:
        return w[rotary_row_order(w.shape[0], cfg.num_key_value_heads)]
    return w


def expected_names(n_layers, untied):
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if untied else set())
    for i in range(n_layers):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                  "attn_norm", "ffn_norm"):
            names.add(f"blk.{i}.{t}.weight")
    return names


def test_rotary_order_matches_llama_cpp_converter():
    w = np.arange(16 * 3).reshape(16, 3)
    # convert_hf_to_gguf.py's LlamaModel.permute
    ref = w.reshape(4, 2, 16 // 4 // 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert (w[rotary_row_order(16, 4)] == ref).all()


def test_stories_metadata_and_sentencepiece_vocab(stories, tmp_path):
    path = tmp_path / "s.gguf"
    write_gguf(stories.model, stories.tokenizer, stories.layers, path, "q4_0")
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == "llama"
    expect = {
        "llama.context_length": 512, "llama.embedding_length": 64, "llama.block_count": 5,
        "llama.feed_forward_length": 172, "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 4, "llama.rope.dimension_count": 8,
        "llama.vocab_size": 512, "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    for k, v in expect.items():
        assert field(r, k) == v, k
    assert field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(r, "tokenizer.ggml.model") == "llama"
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    tokens = field(r, "tokenizer.ggml.tokens")
    vocab = stories.tokenizer.get_vocab()
    assert len(tokens) == 512 and all(vocab[t] == i for i, t in enumerate(tokens))
    types = field(r, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.UNKNOWN
    assert types[1] == types[2] == gguf.TokenType.CONTROL
    assert all(types[i] == gguf.TokenType.BYTE for i in range(3, 259))
    assert all(t == gguf.TokenType.NORMAL for t in types[259:])
    scores = field(r, "tokenizer.ggml.scores")
    try:  # the real SentencePiece scores when sentencepiece can read tokenizer.model
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=os.path.join(STORIES, "tokenizer.model"))
        assert scores == pytest.approx([sp.get_score(i) for i in range(512)])
    except ImportError:
        assert scores[259:] == pytest.approx([-float(i) for i in range(512 - 259)])


def test_pycode_metadata_and_bpe_vocab(pycode, tmp_path):
    path = tmp_path / "p.gguf"
    write_gguf(pycode.model, pycode.tokenizer, pycode.layers, path, "q8_0")
    r = gguf.GGUFReader(path)
    expect = {
        "llama.context_length": 1024, "llama.embedding_length": 256, "llama.block_count": 6,
        "llama.feed_forward_length": 768, "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 4, "llama.rope.dimension_count": 32,
        "llama.vocab_size": 4096, "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False,
    }
    for k, v in expect.items():
        assert field(r, k) == v, k
    tokens = field(r, "tokenizer.ggml.tokens")
    vocab = pycode.tokenizer.get_vocab()
    assert len(tokens) == 4096 and all(vocab[t] == i for i, t in enumerate(tokens))
    merges = field(r, "tokenizer.ggml.merges")
    assert len(merges) == 3838 and merges[0] == "Ġ Ġ"
    types = field(r, "tokenizer.ggml.token_type")
    assert types[0] == types[1] == gguf.TokenType.CONTROL and set(types[2:]) == {gguf.TokenType.NORMAL}


@pytest.mark.parametrize("which", ["stories", "pycode"])
def test_tensor_names_and_shapes(which, request, tmp_path):
    res = request.getfixturevalue(which)
    path = tmp_path / "m.gguf"
    summary = write_gguf(res.model, res.tokenizer, res.layers, path, "q4_0")
    r = gguf.GGUFReader(path)
    cfg = res.model.config
    untied = not cfg.tie_word_embeddings
    assert {t.name for t in r.tensors} == expected_names(cfg.num_hidden_layers, untied) == set(summary)
    params = dict(res.model.named_parameters())
    for t in r.tensors:
        hf = next(n for n in params if gguf_name(n) == t.name)
        assert tuple(reversed(t.shape.tolist())) == tuple(params[hf].shape), t.name  # ne0 = input size
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert kinds["token_embd.weight"] == Q.F32 and kinds["output_norm.weight"] == Q.F32
    assert kinds["blk.0.attn_q.weight"] == Q.Q4_0
    if which == "stories":  # MLP width 172: down_proj's rows cannot be cut into blocks of 32
        assert kinds["blk.0.ffn_down.weight"] == Q.F32
        assert summary["blk.0.ffn_down.weight"] == "f32 (rows of 172 not a multiple of 32)"
        assert summary["blk.0.ffn_up.weight"] == "q4_0 exact"
    else:
        assert kinds["output.weight"] == Q.F32  # lm_head was not quantized by lowbit
        assert all(v == "q4_0 exact" for k, v in summary.items() if k.startswith("blk.") and "norm" not in k)


@pytest.mark.parametrize("which", ["stories", "pycode"])
def test_exact_q4_0_holds_lowbit_weights(which, request, tmp_path):
    res = request.getfixturevalue(which)
    path = tmp_path / "m.gguf"
    write_gguf(res.model, res.tokenizer, res.layers, path, "q4_0")
    got = read_gguf_weights(path)
    for name, p in res.model.named_parameters():
        g = gguf_name(name)
        if g not in got:
            continue
        want = llama_rows(res.model, g, p.detach().numpy())
        # the scales are fp16 in the file: a relative 2^-11 of the scale, times |q - 8| <= 8
        tol = 8 * 2.0**-11 * np.abs(want).max() + 1e-7 if "norm" not in g and "embd" not in g else 0
        np.testing.assert_allclose(got[g], want, rtol=0, atol=tol, err_msg=g)
    # and the nibbles are lowbit's codes, bit for bit (packing: low nibbles 0..15, high 16..31)
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == "blk.1.attn_k.weight")
    q = res.layers["model.layers.1.self_attn.k_proj"]
    blocks = np.asarray(t.data).reshape(q.codes.shape[0], -1, 18)
    codes = np.concatenate([blocks[..., 2:] & 0x0F, blocks[..., 2:] >> 4], axis=-1).reshape(q.codes.shape)
    assert (codes == llama_rows(res.model, t.name, q.codes.numpy())).all()
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    want_d = llama_rows(res.model, t.name, q.scale.numpy()).astype(np.float16)
    assert (d == want_d).all()


def test_exact_q8_0_and_wider_groups(tmp_path):
    """8-bit symmetric -> Q8_0 exactly; a group of 128 (a multiple of 32) -> Q4_0 exactly too."""
    res = quantized(PYCODE, os.path.join(PYCODE, "calib.txt"), "W8A16G32")
    path = tmp_path / "m8.gguf"
    summary = write_gguf(res.model, res.tokenizer, res.layers, path, "q8_0")
    assert summary["blk.0.ffn_down.weight"] == "q8_0 exact"
    got = read_gguf_weights(path)
    for name, p in res.model.named_parameters():
        g = gguf_name(name)
        want = llama_rows(res.model, g, p.detach().numpy())
        np.testing.assert_allclose(got[g], want, rtol=0, atol=128 * 2.0**-11 * np.abs(want).max() / 127 + 1e-7)

    model = res.model
    layer = "model.layers.0.mlp.up_proj"
    w = model.get_submodule(layer).weight.detach()
    q = quantize_weight(w, Scheme(4, 128, True))
    with torch.no_grad():
        model.get_submodule(layer).weight.copy_(q.dequantize())
    path = tmp_path / "m4.gguf"
    summary = write_gguf(model, res.tokenizer, {layer: q}, path, "q4_0")
    assert summary["blk.0.ffn_up.weight"] == "q4_0 exact"
    assert summary["blk.0.ffn_down.weight"] == "f32"  # not in layers: written as the model has it
    got = read_gguf_weights(path)["blk.0.ffn_up.weight"]
    np.testing.assert_allclose(got, q.dequantize().numpy(), rtol=0, atol=8 * 2.0**-11 * w.abs().max().item())


def block_bound_check(got, want, block):
    """Round-to-nearest into a symmetric 4-bit block: error at most absmax/8 per block."""
    rows, cols = want.shape
    amax = np.abs(want).reshape(rows, cols // block, block).max(-1, keepdims=True)
    err = np.abs(got - want).reshape(rows, cols // block, block)
    assert (err <= amax / 8 * 1.01 + 1e-7).all()


def test_requantized_paths(tmp_path):
    """Asymmetric codes have no exact Q4_0 form: requantized by round-to-nearest, within bounds;
    Q4_K (always requantized) stays close to lowbit's weights."""
    res = quantized(PYCODE, os.path.join(PYCODE, "calib.txt"), "W4A16G32-asym")
    path = tmp_path / "a.gguf"
    summary = write_gguf(res.model, res.tokenizer, res.layers, path, "q4_0")
    assert summary["blk.2.attn_q.weight"] == "q4_0 requantized"
    got = read_gguf_weights(path)
    for name, p in res.model.named_parameters():
        g = gguf_name(name)
        if summary[g] == "q4_0 requantized":
            block_bound_check(got[g], llama_rows(res.model, g, p.detach().numpy()), 32)

    path = tmp_path / "k.gguf"
    summary = write_gguf(res.model, res.tokenizer, res.layers, path, "q4_k")
    assert summary["blk.2.attn_q.weight"] == "q4_k requantized"
    r = gguf.GGUFReader(path)
    assert {t.name: t.tensor_type for t in r.tensors}["blk.2.attn_q.weight"] == Q.Q4_K
    got = read_gguf_weights(path)
    for name, p in res.model.named_parameters():
        g = gguf_name(name)
        if summary[g] == "q4_k requantized":
            want = llama_rows(res.model, g, p.detach().numpy())
            rel = np.linalg.norm(got[g] - want) / np.linalg.norm(want)
            assert rel < 0.12, (g, rel)


def test_q4_k_encoder_against_gguf_dequantizer():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 512)) * np.linspace(0.01, 3, 512)).astype(np.float32)
    w[0] = 0.0  # an all-zero super-block
    w[1] = np.abs(w[1])  # no negative values: min 0
    data = encode_q4_k(w)
    assert data.shape == (8, 2 * 144)
    back = gguf.quants.dequantize(data, Q.Q4_K).reshape(w.shape)
    assert (back[0] == 0).all()
    sub = w.reshape(16, 8, 32)  # super-blocks of 8 sub-blocks
    lo = np.minimum(sub.min(-1), 0)
    step = (sub.max(-1) - lo) / 15  # one code step per sub-block
    d = step.max(-1, keepdims=True) / 63  # the 6-bit units of the sub-block scales and mins
    dmin = -lo.min(-1, keepdims=True) / 63
    err = np.abs(back - w).reshape(16, 8, 32).max(-1)
    # half a step from rounding; a scale off by d/2 moves the top code by 15 d/2, a min by dmin/2
    assert (err <= 0.5 * step + 8 * d + dmin + 1e-6).all()
    assert np.linalg.norm(back - w) / np.linalg.norm(w) < 0.1


def test_float_reference_and_q4_k_fallback(stories, tmp_path):
    path = tmp_path / "f16.gguf"
    summary = write_gguf(stories.model, stories.tokenizer, stories.layers, path, "f16")
    r = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == Q.F16 and kinds["blk.0.attn_norm.weight"] == Q.F32
    got = read_gguf_weights(path)
    w = stories.model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    np.testing.assert_allclose(got["blk.0.ffn_up.weight"], w, rtol=1e-3, atol=1e-6)
    # q4_k needs rows that are multiples of 256: stories260K (64 and 172 wide) keeps every weight in float
    summary = write_gguf(stories.model, stories.tokenizer, stories.layers, tmp_path / "k.gguf", "q4_k")
    assert summary["blk.0.attn_q.weight"] == "f32 (rows of 64 not a multiple of 256)"


def test_refusals(stories, tmp_path):
    with pytest.raises(LowbitError, match="unknown GGUF type"):
        write_gguf(stories.model, stories.tokenizer, stories.layers, tmp_path / "x.gguf", "q3_x")
    with pytest.raises(LowbitError, match="float type"):
        write_gguf(stories.model, stories.tokenizer, stories.layers, tmp_path / "x.gguf", "q4_0", float_type="f8")
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LowbitError, match="does not know the .gpt2. architecture"):
        write_gguf(gpt2, stories.tokenizer, {}, tmp_path / "x.gguf", "q4_0")
    assert not list(tmp_path.iterdir())  # nothing left behind


# ---------------------------------------------------------------------------------------------
# llama.cpp itself (pip install llama-cpp-python)


def llama_cpp_ppl(path, windows):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check needs: pip install llama-cpp-python")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=windows.shape[1], n_batch=windows.shape[1],
                          n_threads=1, verbose=False)
    total, count = 0.0, 0
    for win in windows.tolist():
        llm.reset()
        llm.eval(win)
        logits = torch.from_numpy(np.array(llm.scores[: len(win)], dtype=np.float32))
        total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(win[1:]), reduction="sum").item()
        count += len(win) - 1
    return math.exp(total / count)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "q4_k"])
def test_llama_cpp_perplexity_matches(qtype, pycode, tmp_path):
    """llama.cpp running the file scores heldout code like lowbit's fake-quantized model (1%):
    exactly the same weights for q4_0 (W4 G32 sym), a requantization of them for q8_0 and q4_k."""
    pytest.importorskip("llama_cpp", reason="llama.cpp check needs: pip install llama-cpp-python")
    from lowbit.calib import tokenize
    from lowbit.eval.perplexity import perplexity

    with open(os.path.join(PYCODE, "heldout.txt")) as f:
        tokens = tokenize(pycode.tokenizer, f.read())
    seqlen, n = 256, 16
    windows = tokens[: n * seqlen].view(n, seqlen)
    ref = perplexity(pycode.model, tokens=tokens, seqlen=seqlen, max_windows=n)["ppl"]
    path = tmp_path / f"pycode-{qtype}.gguf"
    write_gguf(pycode.model, pycode.tokenizer, pycode.layers, path, qtype)
    got = llama_cpp_ppl(path, windows)
    tol = 0.01 if qtype == "q4_0" else 0.03
    assert abs(got / ref - 1) < tol, (qtype, got, ref)


@pytest.mark.llamacpp
@pytest.mark.parametrize("which", ["stories", "pycode"])
def test_llama_cpp_tokenizes_like_transformers(which, request, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check needs: pip install llama-cpp-python")
    res = request.getfixturevalue(which)
    path = tmp_path / "t.gguf"
    write_gguf(res.model, res.tokenizer, res.layers, path, "q8_0")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    text_file = TINYSTORIES if which == "stories" else os.path.join(PYCODE, "heldout.txt")
    with open(text_file) as f:
        text = f.read()[:3000]
    want = res.tokenizer(text, add_special_tokens=True)["input_ids"]
    # add_bos=True adds BOS only where the file says the model wants one (tokenizer.ggml.add_bos_token)
    assert llm.tokenize(text.encode(), add_bos=True) == want


@pytest.mark.llamacpp
def test_llama_cpp_perplexity_of_a_q8_mix(pycode, tmp_path):
    """Q2_K_MIX-q8: lowbit evaluates the mix's weights with each block layer's input rounded as
    llama.cpp's CPU kernels round it; llama.cpp's perplexity of the file is lowbit's within 0.2%."""
    pytest.importorskip("llama_cpp", reason="llama.cpp check needs: pip install llama-cpp-python")
    import lowbit
    from lowbit.calib import tokenize
    from lowbit.eval.perplexity import perplexity
    from lowbit.model import load_model

    model, tok = load_model(PYCODE)
    r = lowbit.quantize(model, "Q2_K_MIX-q8", lowbit.RTN(search=False), progress=False)
    with open(os.path.join(PYCODE, "heldout.txt")) as f:
        tokens = tokenize(tok, f.read())
    seqlen, n = 256, 16
    ours = perplexity(model, tokens=tokens, seqlen=seqlen, max_windows=n)["ppl"]
    path = tmp_path / "pycode-q2_k_mix.gguf"
    write_gguf(model, tok, r.layers, path, "q2_k_mix")
    theirs = llama_cpp_ppl(path, tokens[: n * seqlen].view(n, seqlen))
    assert abs(theirs / ours - 1) < 0.002, (theirs, ours)
