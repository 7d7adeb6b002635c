"""The "gguf" format: one llama.cpp GGUF file, for the architectures in ARCHS (llama, mistral,
qwen2, qwen3, phi3, gemma, gemma2, gemma3 (text), and the mixtures of experts mixtral and qwen3_moe): tensor
names from the gguf package's tables; a block's experts are stacked into llama.cpp's 3-D tensors.

What is quantized, and how:
- Only the Linear weights that lowbit quantized (the ``layers`` of a result) are written in the
  chosen block type. Everything else keeps the model's own float values: the token embedding, the
  norms (always f32, as llama.cpp wants), and an lm_head that lowbit did not quantize. So the file
  computes what lowbit's fake-quantized model computes, up to the block format. (A llama.cpp mix,
  --scheme Q4_K_M, rounds the embedding and lm_head too: they are quantized layers then.)
- A layer quantized to one of llama.cpp's own types (schemes gguf:q2_k ... gguf:q8_0, tuned on
  that type's grid, lowbit/qdq/kquant.py) is stored in that type from its codes and scales, bit for
  bit, whatever the file's type: a mixed plan gives a file of mixed types.
- EXACT path: a layer quantized symmetric with 4 bits (for q4_0) or 8 bits (for q8_0) and a group
  size that is a multiple of 32 (or per channel, -1) is stored from its integer codes and scales:
  lowbit's symmetric codes (zero point 2^(b-1), signed scale) are exactly Q4_0's d*(q-8) and
  Q8_0's d*int8, so the file holds lowbit's weights up to the fp16 rounding of the scales.
- Otherwise the layer's dequantized weight is requantized with the block format's own
  round-to-nearest (ggml's reference quantizers: quantize_row_q4_0_ref / q8_0 via the gguf
  package, quantize_row_q4_K_ref re-implemented in numpy in qdq/ggml.py).
- A weight whose input size is not a multiple of the block size (32 for q4_0/q8_0, 256 for q4_k;
  llama.cpp cannot store partial blocks) is written in float (the model's dtype: f32, or f16/bf16)
  instead of refusing the whole export; the returned summary says so for every tensor.
- llama.cpp's llama graph (llama, mistral, mixtral) expects q/k projection rows in its own rotary
  order: the rows are permuted as convert_hf_to_gguf.py does (rows only, so quantized rows are
  permuted with their scales). Gemma's norms are stored as 1 + w (HF scales by 1 + w).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lowbit.mixes import MIXES, mix_base
from lowbit.errors import LowbitError
from lowbit.experts import split_experts
from lowbit.export.base import Format, Layout, Writer, ordered_tensors
from lowbit.qdq import ggml
from lowbit.qdq.ggml import encode_q4_0_exact, encode_q4_k, encode_q8_0_exact
from lowbit.qdq.kquant import FORMATS as KFORMATS, quantize as kquantize
from lowbit.quantized import QuantizeResult

FLOAT_TYPES = ("f32", "f16")

def _gguf():
    try:
        import gguf
    except ImportError:
        raise LowbitError("the gguf format needs the gguf package: pip install gguf") from None
    return gguf


@dataclass(frozen=True)
class Arch:
    """How llama.cpp holds one Hugging Face architecture. Tensor names come from the gguf package's
    own tables (gguf.get_tensor_name_map), not from a map written here."""

    gguf_arch: str  # the gguf.MODEL_ARCH member
    rotary_rows: bool = False  # q/k rows into llama.cpp's rotary order (its llama graph; others use NeoX's)
    norm_offset: float = 0.0  # added to RMSNorm weights: Gemma's HF norms scale by (1 + w), llama.cpp's by w
    extra: Callable | None = None  # (writer, config) -> None: keys only this architecture has


def _experts_keys(w, cfg) -> None:
    w.add_expert_count(int(getattr(cfg, "num_local_experts", None) or cfg.num_experts))
    w.add_expert_used_count(int(cfg.num_experts_per_tok))
    if getattr(cfg, "moe_intermediate_size", None):
        w.add_expert_feed_forward_length(int(cfg.moe_intermediate_size))


def _gemma2_keys(w, cfg) -> None:
    w.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
    w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    w.add_sliding_window(int(cfg.sliding_window))


def _gemma3_keys(w, cfg) -> None:
    # llama.cpp's Gemma 3 puts every sixth layer on full attention and the rest on a sliding window
    # with rope base 10000, and scales queries by 1/sqrt(head_dim) (by hidden/heads for the 27B,
    # which it knows by its 62 layers): a config that differs would run a different model.
    n = int(cfg.num_hidden_layers)
    kinds = getattr(cfg, "layer_types", None) or []
    want = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    local = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention", {})
    scalar = int(cfg.query_pre_attn_scalar)
    if (kinds and list(kinds) != want) or float(local.get("rope_theta", 10000.0)) != 10000.0 or \
            scalar != (cfg.hidden_size // cfg.num_attention_heads if n == 62 else cfg.head_dim):
        raise LowbitError("GGUF export of gemma3_text needs llama.cpp's Gemma 3 layout (full attention every "
                          "sixth layer, sliding-window rope base 10000, query_pre_attn_scalar = head_dim)")
    w.add_sliding_window(int(cfg.sliding_window))


# Hugging Face model_type -> how llama.cpp holds it (Mistral is llama.cpp's llama graph)
ARCHS = {
    "llama": Arch("LLAMA", rotary_rows=True),
    "mistral": Arch("LLAMA", rotary_rows=True),
    "mixtral": Arch("LLAMA", rotary_rows=True, extra=_experts_keys),
    "qwen3_moe": Arch("QWEN3MOE", extra=_experts_keys),
    "qwen2": Arch("QWEN2"),
    "qwen3": Arch("QWEN3"),
    "phi3": Arch("PHI3"),
    "gemma": Arch("GEMMA", norm_offset=1.0),
    "gemma2": Arch("GEMMA2", norm_offset=1.0, extra=_gemma2_keys),
    "gemma3_text": Arch("GEMMA3", norm_offset=1.0, extra=_gemma3_keys),
}


def _arch(model_type: str | None) -> Arch:
    if model_type not in ARCHS:
        raise LowbitError(f"GGUF export does not know the {model_type!r} architecture "
                          f"(it writes {', '.join(ARCHS)})")
    return ARCHS[model_type]


@functools.lru_cache(maxsize=16)
def _name_map(gguf_arch: str, n_blocks: int):
    gguf = _gguf()
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch), n_blocks)


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def gguf_name(param_name: str, model_type: str = "llama") -> str | None:
    """llama.cpp's name of a Hugging Face parameter ("model.layers.3.mlp.up_proj.weight" ->
    "blk.3.ffn_up.weight"), from the gguf package's tables; None when it has none. An expert's
    ("mlp.experts.5.up_proj.weight") is the name of the tensor that stacks the block's experts
    ("blk.3.ffn_up_exps.weight")."""
    module, _, kind = _EXPERT.sub(".experts.", param_name).rpartition(".")
    index = re.search(r"\.(\d+)\.", module)
    n_blocks = 64 * (int(index.group(1)) // 64 + 1) if index else 64  # the table covers blocks 0..n_blocks-1
    name = _name_map(_arch(model_type).gguf_arch, n_blocks).get_name(module)
    return None if name is None else f"{name}.{kind}"


def rotary_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp expects for an HF q/k projection (convert_hf_to_gguf's permute):
    new_rows = rows[order]."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


@dataclass(frozen=True)
class GGUFType:
    """One llama.cpp file type lowbit writes."""

    name: str  # as in --format gguf:NAME
    ggml: str | None  # the block type of quantized weights (gguf.GGMLQuantizationType); None: float
    file_type: str  # gguf.LlamaFileType
    bits: int | None = None  # the bit width a layer must have; None: any
    group: int | None = None  # groups must be a multiple of this (or per channel); None: any
    sym: bool | None = None  # the symmetry a layer must have; None: either
    exact: Callable | None = None  # (codes, scale, group) -> blocks: stores lowbit's codes as they are
    requantize: Callable | None = None  # weight -> blocks; None: the gguf package's reference quantizer
    float_type: str | None = None  # float files: the type of every weight

    def check(self, scheme) -> str | None:
        name = f"gguf:{self.name}"
        if scheme.dtype in KFORMATS:
            return None  # written in its own type (k-quant layers are stored as tuned; -q8 is how llama.cpp runs them)
        if scheme.dtype != "int" or scheme.act is not None:
            return f"{name} stores integer weights with 16-bit inputs, not {scheme.name}; use --format fake"
        if self.bits is not None and scheme.bits != self.bits:
            return f"{name} stores {self.bits}-bit weights, the scheme has {scheme.bits} bits"
        if self.group is not None and scheme.group_size != -1 and scheme.group_size % self.group:
            return f"{name} needs groups of a multiple of {self.group} (or per channel), the scheme has {scheme.group_size}"
        if self.sym is not None and scheme.sym != self.sym:
            return f"{name} is symmetric only; the scheme is asymmetric (use gguf:q4_k)"
        return None

    def exact_ok(self, q, cols: int) -> bool:
        """Whether layer q is stored from its codes (symmetric, the type's bits, whole blocks)."""
        group = cols if q.group_size == -1 else q.group_size
        return (self.exact is not None and q.bits == self.bits and q.sym and group % 32 == 0 and cols % 32 == 0
                and bool((q.zero == 2 ** (q.bits - 1)).all()))


def _requantize(name: str) -> Callable:
    def requantize(wt: np.ndarray) -> np.ndarray:
        codes, scale, zero, extras = kquantize(KFORMATS[name], torch.from_numpy(wt))
        return ggml.pack(name, codes, scale, zero, extras)

    return requantize


GGUF_TYPES = {t.name: t for t in (
    GGUFType("q4_0", "Q4_0", "MOSTLY_Q4_0", bits=4, group=32, sym=True, exact=encode_q4_0_exact),
    GGUFType("q8_0", "Q8_0", "MOSTLY_Q8_0", bits=8, group=32, sym=True, exact=encode_q8_0_exact),
    # requantized to llama.cpp's 6-bit sub-block scales: any 4-bit scheme; every weight Q4_K (no Q6_K mix)
    GGUFType("q4_k", "Q4_K", "MOSTLY_Q4_K_S", bits=4, requantize=encode_q4_k),
    # int layers requantized by round-to-nearest on the type's grid (kquant.quantize); layers tuned
    # with the matching gguf: scheme are stored exactly
    *(GGUFType(k, f.ggml, file_type, bits=f.bits, requantize=_requantize(k))
      for k, f, file_type in [("q2_k", KFORMATS["q2_k"], "MOSTLY_Q2_K"), ("q3_k", KFORMATS["q3_k"], "MOSTLY_Q3_K_S"),
                              ("q5_k", KFORMATS["q5_k"], "MOSTLY_Q5_K_S"), ("q6_k", KFORMATS["q6_k"], "MOSTLY_Q6_K"),
                              ("q5_0", KFORMATS["q5_0"], "MOSTLY_Q5_0")]),
    # llama.cpp's mixes (--scheme Q4_K_M ...): layers tuned in their types are stored as they are;
    # int layers are requantized to the mix's base type
    *(GGUFType(m, KFORMATS[base].ggml, file_type, bits=KFORMATS[base].bits, requantize=_requantize(base))
      for m, (base, file_type) in MIXES.items()),
    GGUFType("f16", None, "MOSTLY_F16", float_type="f16"),
    GGUFType("f32", None, "ALL_F32", float_type="f32"),
)}


# ---------------------------------------------------------------------------------------------
# metadata


def _llama_config(model):
    """The config's numbers every architecture here shares (a decoder of llama's shape)."""
    cfg = model.config
    _arch(getattr(cfg, "model_type", None))
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:  # per layer kind (Gemma 3): the global layers'
        rope = rope["full_attention"]
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", "linear"):
        raise LowbitError(f"GGUF export does not support rope scaling {rope_type!r} yet")
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or getattr(cfg, "rope_theta", 10000.0)
    return cfg, n_head, n_kv, head_dim, rope, rope_type, float(theta)


def _write_metadata(w, gguf, model, name: str, file_type: int) -> None:
    cfg, n_head, n_kv, head_dim, rope, rope_type, theta = _llama_config(model)
    extra = _arch(cfg.model_type).extra
    if extra is not None:
        extra(w, cfg)
    w.add_name(name)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(int(head_dim))
    if head_dim * n_head != cfg.hidden_size:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_file_type(int(file_type))
    w.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _sentencepiece_scores(tokenizer, n: int):
    """(scores, types) from a tokenizer.model next to the tokenizer, when sentencepiece is there."""
    folder = getattr(tokenizer, "name_or_path", None) or ""
    path = getattr(tokenizer, "vocab_file", None) or os.path.join(str(folder), "tokenizer.model")
    if not path or not os.path.isfile(path):
        return None
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=path)
    except Exception:
        return None
    if sp.vocab_size() > n:
        return None
    scores = [sp.get_score(i) for i in range(sp.vocab_size())]
    return scores, {i for i in range(sp.vocab_size()) if sp.is_control(i)}


def _write_tokenizer(w, gguf, tokenizer, vocab_size: int) -> str:
    """Write the vocabulary; returns the tokenizer.ggml.model written ("llama" or "gpt2")."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export needs a fast (tokenizers-backed) tokenizer with a tokenizer.json")
    tj = json.loads(backend.to_str())
    tm, pre = tj["model"], tj.get("pre_tokenizer") or {}
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    if tm["type"] == "Unigram":
        pieces = [p for p, _ in tm["vocab"]]
        unigram_scores = [float(s) for _, s in tm["vocab"]]
        vocab = {p: i for i, p in enumerate(pieces)}
    else:
        vocab = dict(tm["vocab"])
        unigram_scores = None
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.NORMAL
    special = {i for i, t in added.items() if t.get("special")}
    unk = tokenizer.unk_token_id
    spm_like = tm["type"] == "Unigram" or (tm["type"] == "BPE" and tm.get("byte_fallback"))

    if spm_like:
        byte_tokens = {i for tok, i in vocab.items() if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")}
        sp = _sentencepiece_scores(tokenizer, n)
        if sp is not None:
            scores = sp[0] + [-1000.0] * (n - len(sp[0]))
            special |= sp[1]
        elif unigram_scores is not None:
            scores = unigram_scores + [-1000.0] * (n - len(unigram_scores))
        else:  # SentencePiece BPE: a piece's score is minus its rank among the ordinary pieces
            first = 1 + max([i for i in special | byte_tokens | ({unk} if unk is not None else set())], default=-1)
            scores = [0.0 if i < first else -float(i - first) for i in range(n)]
        for i in byte_tokens:
            types[i] = gguf.TokenType.BYTE
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
        add_prefix = pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never"
        w.add_add_space_prefix(bool(add_prefix))
    elif tm["type"] == "BPE" and _is_byte_level(pre):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_bpe_pre_name(pre))
        merges = [m if isinstance(m, str) else " ".join(m) for m in tm.get("merges", [])]
        w.add_token_merges(merges)
    else:
        raise LowbitError(
            f"GGUF export cannot write this tokenizer ({tm['type']} model, {pre.get('type')} pre-tokenizer); "
            "supported: SentencePiece (byte-fallback BPE or Unigram) and byte-level BPE"
        )
    for i in special:
        types[i] = gguf.TokenType.CONTROL
    if unk is not None and unk < n:
        types[unk] = gguf.TokenType.UNKNOWN
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("unk", unk),
                     ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(int(tid))
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    w.add_add_bos_token(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(bool(ids) and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
    return "llama" if spm_like else "gpt2"


def _is_byte_level(pre: dict) -> bool:
    if pre.get("type") == "ByteLevel":
        return True
    return pre.get("type") == "Sequence" and any(p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []))


_LLAMA3_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
# llama.cpp's name for each Split regex it knows (Qwen2's splits digits one by one, Llama 3's by threes)
_SPLIT_NAMES = {_LLAMA3_REGEX: "llama-bpe", _LLAMA3_REGEX.replace("\\p{N}{1,3}", "\\p{N}"): "qwen2"}


def _bpe_pre_name(pre: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE pre-tokenizer."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    if pre.get("type") == "Sequence":
        splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        if len(splits) == 1 and splits[0].get("pattern", {}).get("Regex") in _SPLIT_NAMES:
            return _SPLIT_NAMES[splits[0]["pattern"]["Regex"]]
    raise LowbitError("GGUF export cannot name this byte-level BPE pre-tokenizer for llama.cpp "
                      "(known: GPT-2, Llama 3, Qwen2)")


# ---------------------------------------------------------------------------------------------
# tensors


def _float_array(t: torch.Tensor, float_type: str) -> np.ndarray:
    """float_type "f16" or "f32" (the writer keeps a bf16 original in f32: f16 could overflow)."""
    return t.detach().cpu().float().numpy().astype(np.float16 if float_type == "f16" else np.float32)


def _tensor(gname: str, p: torch.Tensor, q, qtype: GGUFType, block_type, order, float_type, gguf):
    """(data, raw type or None for float, how it was stored) of one parameter."""
    if p.dim() == 1 or gname.endswith("ffn_gate_inp.weight"):  # norms, biases, routers: f32, as llama.cpp's converter
        arr = p.detach().float().cpu().numpy()
        return (arr[order] if order is not None else arr), None, "f32"
    if q is not None and tuple(q.codes.shape) != tuple(p.shape):
        raise LowbitError(f"quantized layer {gname} has shape {tuple(q.codes.shape)}, the model's weight {tuple(p.shape)}")
    cols = p.shape[1]
    if q is not None and q.scheme.dtype in KFORMATS:  # stored in its own type, exactly
        fmt = KFORMATS[q.scheme.dtype]
        rows = torch.as_tensor(order) if order is not None else slice(None)
        extras = {k: v[rows] for k, v in q.extras.items()}
        data = ggml.pack(q.scheme.dtype, q.codes[rows], q.scale[rows], None if q.zero is None else q.zero[rows], extras)
        return data, getattr(gguf.GGMLQuantizationType, fmt.ggml), f"{q.scheme.dtype} exact"
    block = gguf.GGML_QUANT_SIZES[block_type][0] if block_type is not None else None
    if q is None or cols % block:  # a quantized layer from its codes: the same bytes from any dtype
        arr = _float_array(p if q is None else q.dequantize(torch.float32), float_type)
        arr = np.ascontiguousarray(arr[order] if order is not None else arr)
        kind = "f16" if arr.dtype == np.float16 else "f32"
        return arr, None, kind if q is None else f"{kind} (rows of {cols} not a multiple of {block})"
    if qtype.exact_ok(q, cols):
        codes, scale = q.codes.cpu().numpy(), q.scale.detach().float().cpu().numpy()
        if order is not None:
            codes, scale = codes[order], scale[order]
        return qtype.exact(codes, scale, cols if q.group_size == -1 else q.group_size), block_type, f"{qtype.name} exact"
    wt = q.dequantize(torch.float32).cpu().numpy()
    wt = np.ascontiguousarray(wt[order] if order is not None else wt)
    data = qtype.requantize(wt) if qtype.requantize is not None else gguf.quants.quantize(wt, block_type)
    return data, block_type, f"{qtype.name} requantized"


def write_gguf(model, tokenizer, layers: dict, path: str, qtype: str = "q4_0", *,
               float_type: str | None = None, name: str | None = None) -> dict[str, str]:
    """Write `model` (a decoder of an architecture in ARCHS whose quantized Linear weights are lowbit's dequantized values) with
    its `tokenizer` to one GGUF file at `path`, the weights in `layers` (module name ->
    QuantizedWeight) stored in block type `qtype` ("q4_0", "q8_0", "q4_k"; "f16"/"f32" write every
    weight in float as a reference). Returns {gguf tensor name: how it was stored}, e.g.
    "q4_0 exact", "q4_0 requantized", "f32", "f32 (rows of 172 not a multiple of 32)".
    float_type ("f32"/"f16") overrides the type of the unquantized 2-D tensors (default: the
    model's dtype). Raises LowbitError for an architecture it does not know (ARCHS), an unknown
    qtype or tokenizer."""
    _llama_config(model)  # refuse another architecture before looking for its blocks
    split_experts(model)  # fused experts as Linear layers, as lowbit quantizes them (no-op when done)
    result = QuantizeResult(model, tokenizer, layers)
    layout = Layout.of(result)
    writer = GGUFWriter(os.fspath(path), layout, qtype, float_type=float_type, name=name)
    for pname, p in ordered_tensors(model, layout.blocks_name):
        writer.add(pname, p, layers.get(pname.rsplit(".", 1)[0]))
    writer.close({})
    return writer.summary


class GGUFWriter(Writer):
    """Tensors are converted as they arrive and their bytes spooled (aligned as in the file); the
    file (header, metadata, tensor table, then the spool) is written at close."""

    def __init__(self, path: str, layout: Layout, qtype: str, *, float_type: str | None = None,
                 name: str | None = None, state: dict | None = None):
        self.gguf = gguf = _gguf()
        self.qt = qt = GGUF_TYPES.get(str(qtype).lower())
        if qt is None:
            raise LowbitError(f"unknown GGUF type {qtype!r} (choose from {', '.join(GGUF_TYPES)})")
        if float_type is not None and float_type not in FLOAT_TYPES:
            raise LowbitError(f"unknown float type {float_type!r} (choose from {', '.join(FLOAT_TYPES)})")
        cfg, self.n_head, self.n_kv, *_ = _llama_config(layout.model)
        self.model_type, self.arch = cfg.model_type, _arch(cfg.model_type)
        if getattr(cfg, "tie_word_embeddings", False) and "lm_head" in layout.schemes:
            raise LowbitError("lm_head is quantized but tied to the embeddings: untie it first")
        unknown = [n for n in layout.schemes if gguf_name(n + ".weight", self.model_type) is None]
        if unknown:
            raise LowbitError(f"GGUF export cannot place quantized layer {unknown[0]!r}")
        self.path, self.layout, self.name = path, layout, name
        self.block_type = getattr(gguf.GGMLQuantizationType, qt.ggml) if qt.ggml else None
        self.float_type = qt.float_type or float_type or ("f16" if layout.dtype == torch.float16 else "f32")
        self.align = gguf.GGUF_DEFAULT_ALIGNMENT
        self.spool = path + ".spool"
        self.infos: list[list] = []  # [gguf name, shape, numpy dtype, nbytes, raw type or None]
        self.summary: dict[str, str] = {}
        if state is not None:
            self.infos, self.summary = state["infos"], state["summary"]
            if not os.path.isfile(self.spool) or os.path.getsize(self.spool) < state["length"]:
                raise LowbitError(f"the partial output lacks {self.spool}; remove it to start over")
            os.truncate(self.spool, state["length"])
        self._f = open(self.spool, "ab")
        self.n_experts = int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0)
        self._experts: dict[str, dict[int, tuple]] = {}  # stacked name -> {expert: (data, raw, how)}

    def add(self, name, tensor, q):
        gname = gguf_name(name, self.model_type)
        if gname is None:
            raise LowbitError(f"GGUF export does not know where to put parameter {name!r}")
        order = None
        if self.arch.rotary_rows and gname.endswith(("attn_q.weight", "attn_q.bias")):
            order = rotary_row_order(tensor.shape[0], self.n_head)
        elif self.arch.rotary_rows and gname.endswith(("attn_k.weight", "attn_k.bias")):
            order = rotary_row_order(tensor.shape[0], self.n_kv)
        if self.arch.norm_offset and tensor.dim() == 1 and gname.endswith("norm.weight"):
            tensor = tensor.float() + self.arch.norm_offset
        q = q if self.block_type is not None else None
        data, raw, how = _tensor(gname, tensor, q, self.qt, self.block_type, order, self.float_type, self.gguf)
        expert = _EXPERT.search(name)
        if expert is not None:  # llama.cpp holds a block's experts as one 3-D tensor [experts, rows, cols]
            parts = self._experts.setdefault(gname, {})
            parts[int(expert.group(1))] = (data, raw, how)
            if len(parts) < self.n_experts:
                return
            del self._experts[gname]
            if len({(p[1], p[0].dtype, p[0].shape) for p in parts.values()}) > 1:
                kinds = sorted({p[2] for p in parts.values()})
                raise LowbitError(f"GGUF stores the experts of {gname} as one tensor: they need one type, "
                                  f"these have {', '.join(kinds)}")
            data, raw, how = np.stack([parts[e][0] for e in range(self.n_experts)]), parts[0][1], parts[0][2]
        self.summary[gname] = how
        data = np.ascontiguousarray(data)
        self._f.write(data.tobytes())
        self._f.write(bytes(-data.nbytes % self.align))
        self.infos.append([gname, list(data.shape), data.dtype.str, int(data.nbytes), None if raw is None else int(raw)])

    def commit(self):
        if self._experts:  # a block's experts all arrive before its commit
            raise LowbitError(f"GGUF export got only some experts of {next(iter(self._experts))}")
        self._f.flush()
        os.fsync(self._f.fileno())
        return {"infos": self.infos, "summary": self.summary, "length": self._f.tell()}

    def close(self, report):
        gguf, layout = self.gguf, self.layout
        self._f.close()
        tmp = self.path + ".tmp"
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, self.arch.gguf_arch)])
        try:
            name = self.name or os.path.splitext(os.path.basename(self.path))[0]
            # the file type a mix's layers follow, whatever the option that re-encodes int layers
            recipe = mix_base(layout.recipe) if layout.recipe else None
            file_type = MIXES[recipe][1] if recipe in MIXES else self.qt.file_type
            _write_metadata(w, gguf, layout.model, name, int(getattr(gguf.LlamaFileType, file_type)))
            _write_tokenizer(w, gguf, layout.tokenizer, int(layout.model.get_input_embeddings().weight.shape[0]))
            for gname, shape, dtype, nbytes, raw in self.infos:
                w.add_tensor_info(gname, shape, np.dtype(dtype), nbytes,
                                  raw_dtype=None if raw is None else gguf.GGMLQuantizationType(raw))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            fout = w.fout[0]
            w.write_padding(fout, fout.tell())
            with open(self.spool, "rb") as src:
                shutil.copyfileobj(src, fout, 64 << 20)
            w.close()
            os.replace(tmp, self.path)
            os.remove(self.spool)
        except BaseException:
            w.close()
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def read_gguf_weights(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized to float32, numpy-shaped ([rows, cols])."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return out


class GGUF(Format):
    """One llama.cpp file, model-{type}.gguf (the architectures in ARCHS); lowbit does not load it."""

    name = "gguf"
    loaded_by = "llama.cpp"
    options = tuple(GGUF_TYPES)
    default_option = "q4_0"

    def check(self, scheme):
        return GGUF_TYPES[self.option].check(scheme)

    def check_model(self, model_type):
        if model_type is not None and model_type not in ARCHS:
            return f"GGUF export does not know the {model_type!r} architecture (it writes {', '.join(ARCHS)})"
        return None

    def open(self, folder, layout, state=None):
        return GGUFWriter(os.path.join(folder, f"model-{self.option}.gguf"), layout, self.option, state=state)
