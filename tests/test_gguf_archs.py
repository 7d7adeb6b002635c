"""GGUF export of every architecture the writer knows (export/gguf.py ARCHS): tensor names from the
gguf package's own tables, weights that decode to the model's (llama's rotary row order, Gemma's
norm offset), and, where llama-cpp-python is installed (the `llamacpp` mark), llama.cpp's logits
equal to transformers' on the same tokens."""
import math
import re

import numpy as np
import pytest
import torch
import transformers

import lowbit

gguf = pytest.importorskip("gguf")

from lowbit.export.gguf import ARCHS, gguf_name, read_gguf_weights, rotary_row_order, write_gguf  # noqa: E402

from conftest import STORIES, need_assets  # noqa: E402

CFG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, bos_token_id=1,
           eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**CFG),
    "mistral": lambda: transformers.MistralConfig(**CFG, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**CFG),
    "qwen3": lambda: transformers.Qwen3Config(**CFG, head_dim=64),
    "phi3": lambda: transformers.Phi3Config(**CFG),
    "gemma": lambda: transformers.GemmaConfig(**CFG, head_dim=64),
    "gemma2": lambda: transformers.Gemma2Config(**CFG, head_dim=64, query_pre_attn_scalar=64, sliding_window=4096),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**CFG, head_dim=64, query_pre_attn_scalar=64,
                                                         sliding_window=16),
    "mixtral": lambda: transformers.MixtralConfig(**CFG, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**CFG, head_dim=64, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=256, norm_topk_prob=True),
}
# tokens llama.cpp's vocabulary code looks up for Phi-3 (its chat markers)
PHI3_TOKENS = ["<|end|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]


def test_every_architecture_has_a_tiny_model():
    assert set(CONFIGS) == set(ARCHS)


def tiny(model_type):
    """A 2-block model of the architecture with stories260K's tokenizer (and vocabulary), its
    norms moved off 1 so that a missed norm offset shows."""
    from lowbit.model import load_model

    need_assets()
    _, tok = load_model(STORIES)
    if model_type == "phi3":
        tok.add_special_tokens({"additional_special_tokens": PHI3_TOKENS})
    cfg = CONFIGS[model_type]()
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model, tok


def expected_weight(model, name, arch, tensor):
    a = tensor.detach().float().numpy()
    g = gguf_name(name, model.config.model_type)
    if arch.rotary_rows and ".attn_q." in g:
        a = a[rotary_row_order(a.shape[0], model.config.num_attention_heads)]
    elif arch.rotary_rows and ".attn_k." in g:
        a = a[rotary_row_order(a.shape[0], model.config.num_key_value_heads)]
    if arch.norm_offset and g.endswith("norm.weight"):
        a = a + arch.norm_offset
    return g, a


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_names_and_weights(model_type, tmp_path):
    """Quantized to Q4_K by RTN: every tensor of the file is where gguf's tables put it and decodes
    to exactly the fake-quantized model's values."""
    model, tok = tiny(model_type)
    r = lowbit.quantize(model, "gguf:q4_k", "rtn", progress=False)
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, tok, r.layers, path, "q4_k")
    reader = gguf.GGUFReader(path)
    arch = ARCHS[model_type]
    arch_name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)]
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch_name
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), 2)
    got = read_gguf_weights(path)
    state = model.state_dict()
    names = [n for n in state if not (model.config.tie_word_embeddings and n == "lm_head.weight")]
    want = {}
    for name in names:
        g, a = expected_weight(model, name, arch, state[name])
        expert = re.search(r"\.experts\.(\d+)\.", name)
        if expert:  # stacked: one tensor [experts, rows, cols] per block and projection
            module, _, kind = re.sub(r"\.experts\.\d+\.", ".experts.", name).rpartition(".")
            want.setdefault(g, {})[int(expert.group(1))] = a
        else:
            module, _, kind = name.rpartition(".")
            want[g] = a
        assert g == f"{table.get_name(module)}.{kind}", name
    want = {g: np.stack([a[e] for e in range(len(a))]) if isinstance(a, dict) else a for g, a in want.items()}
    assert set(got) == set(want)
    for g, a in want.items():
        assert np.array_equal(got[g].reshape(a.shape), a.astype(np.float32)), g
    if "moe" in model_type or model_type == "mixtral":
        assert got["blk.1.ffn_down_exps.weight"].shape[0] == 4 and "blk.0.ffn_gate_inp.weight" in got
    assert all(v == "q4_k exact" for k, v in summary.items() if k.startswith("blk.") and "norm" not in k
               and k.endswith("weight") and "gate_inp" not in k), summary  # routers stay float


def llama_cpp_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check needs: pip install llama-cpp-python")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=1, verbose=False)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()


@pytest.mark.llamacpp
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_llama_cpp_computes_what_transformers_does(model_type, tmp_path):
    """The file in f32 gives llama.cpp's logits within 2% of their spread of transformers' (what
    is left is llama.cpp's f16 KV cache); quantized to Q4_K, whose matmuls llama.cpp runs on 8-bit
    rounded activations, the mean difference stays under 5% of the spread."""
    pytest.importorskip("llama_cpp", reason="llama.cpp check needs: pip install llama-cpp-python")
    model, tok = tiny(model_type)
    ids = torch.randint(3, 512, (48,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float()
    write_gguf(model, tok, {}, tmp_path / "f32.gguf", "f32")
    got = llama_cpp_logits(tmp_path / "f32.gguf", ids.tolist())
    spread = ref.std().item()
    assert (got - ref).abs().max().item() < 0.02 * spread, model_type

    r = lowbit.quantize(model, "gguf:q4_k", "rtn", progress=False)
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float()
    write_gguf(model, tok, r.layers, tmp_path / "q4_k.gguf", "q4_k")
    got = llama_cpp_logits(tmp_path / "q4_k.gguf", ids.tolist())
    assert (got - ref).abs().mean().item() < 0.05 * spread, model_type
    assert math.isfinite(got.sum().item())


def test_gemma3_layout_llama_cpp_cannot_run_is_refused(tmp_path):
    """llama.cpp fixes Gemma 3's attention layout; a config off it is refused, nothing written."""
    from lowbit.errors import LowbitError

    model, tok = tiny("gemma3_text")
    model.config.query_pre_attn_scalar = 256  # queries scaled unlike llama.cpp's 1/sqrt(head_dim)
    with pytest.raises(LowbitError, match="needs llama.cpp's Gemma 3 layout"):
        write_gguf(model, tok, {}, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def qwen2_style_tokenizer(text: str):
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer (its Split regex, then ByteLevel),
    trained here on `text`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def test_qwen2_tokenizer_is_named_for_llama_cpp(tmp_path):
    """Qwen2's byte-level BPE (digits split one by one) is written as llama.cpp's "qwen2"
    pre-tokenizer; with llama-cpp-python there, llama.cpp tokenizes a text as transformers does."""
    from conftest import ASSETS

    need_assets()
    with open(f"{ASSETS}/text/wikitext2_valid.tokens") as f:
        text = f.read()[:200_000]
    tok = qwen2_style_tokenizer(text)
    cfg = CONFIGS["qwen2"]()
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    path = tmp_path / "q.gguf"
    write_gguf(model, tok, {}, path, "f16")
    fields = gguf.GGUFReader(path).fields
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "qwen2"
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    sample = text[5000:8000] + " 12345 year 2024, x=10.5"
    assert llm.tokenize(sample.encode(), add_bos=False, special=False) == tok(sample, add_special_tokens=False)["input_ids"]
    llm.close()
