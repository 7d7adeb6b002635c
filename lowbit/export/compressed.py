"""The `compressed_tensors` format: vLLM's native checkpoint (quant_method "compressed-tensors"),
which llm-compressor writes and transformers loads with the `compressed-tensors` package.

Each scheme is written in the layout compressed-tensors itself picks for it (its compressor), so
the package's own decompressor and vLLM's loaders read it:

    integer weights (2-8 bits, group or channel)  pack-quantized: X.weight_packed int32
        [out, ceil(in*bits/32)], 32 codes per `bits` words as one little-endian bit stream
        (lowbit.qdq.pack's rule); X.weight_scale [out, groups]; X.weight_shape [out, in];
        asymmetric: X.weight_zero_point packed the same way along the output dimension.
        Codes are stored signed: code - 2^(bits-1), zero points likewise.
    8-bit integers with int8 inputs (W8A8)       int-quantized: X.weight int8.
    NVFP4                                        nvfp4-pack-quantized: two E2M1 codes per uint8
        (the first in the low nibble), X.weight_scale float8_e4m3fn per 16, X.weight_global_scale.
    MXFP4                                        mxfp4-pack-quantized: the same, with E8M0 scales
        stored as uint8 exponents (2^(e-127)).
    MXFP8                                        mxfp8-quantized: X.weight float8_e4m3fn, uint8 E8M0.
    FP8                                          float-quantized: X.weight float8_e4m3fn, float32 scales.
    FP8_BLOCK                                    float-quantized, strategy "block": a float32 scale per
        tile, X.weight_scale [ceil(out/128), in/128]; inputs dynamic per token and group of 128.

config.json's quantization_config holds one config group per distinct scheme. A single scheme
targets "Linear", and `ignore` names every Linear left in float; a mixed plan names its layers in
each group ("mixed-precision" at the top). Layers whose input size is not a whole number of groups
are written dense in float (compressed-tensors needs whole groups) and ignored. Scales are stored
in the checkpoint's float dtype (float32 originals keep float32, so unpacking is exact), except
that a float32 model with MX or NV layers is written in bfloat16, the dtype compressed-tensors
unpacks those to.

Inputs quantized by a scheme (W4A4, W8A8) are declared as dynamic input quantization, except
NVFP4's: its block scales are dynamic, its global scale static, X.input_global_scale (float32 [1]),
the one the pipeline calibrated (lowbit.activations).
"""
from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict

import torch
from torch import nn

from lowbit.activations import INPUT_SCALE, input_scales, quantize_model_inputs
from lowbit.checkpoint import ShardWriter
from lowbit.errors import LowbitError
from lowbit.experts import checkpoint_name, model_name, split_experts
from lowbit.export.base import Format, Layout
from lowbit.export.packed import ConfiguredWriter, checkpoint_config, finish_loading, read_tensors
from lowbit.model import ckpt_name
from lowbit.qdq.act import get_activation
from lowbit.qdq.pack import pack_rows, pad_to, unpack_rows
from lowbit.quantized import QuantizedWeight, QuantizeResult
from lowbit.schemes import RCEIL, Scheme
from lowbit.version import __version__

QUANT_METHOD = "compressed-tensors"
# What vLLM's compressed-tensors kernels run (mainline, 2026): other schemes are written if the
# format can hold them, with a warning that only transformers (dequantizing) loads them.
_VLLM_INT_BITS = (4, 8)


def ct_format(s: Scheme) -> str:
    """The compressed-tensors compression format of a scheme."""
    if s.dtype == "int":
        return "int-quantized" if s.act == "int8" and s.bits == 8 else "pack-quantized"
    if s.dtype == "nvfp":
        return "nvfp4-pack-quantized"
    if s.dtype == "mxfp":
        return "mxfp4-pack-quantized" if s.bits == 4 else "mxfp8-quantized"
    if s.dtype in ("fp8", "fp8_block"):
        return "float-quantized"
    raise LowbitError(f"format compressed_tensors has no layout for data type {s.dtype}")


def weight_args(s: Scheme) -> dict:
    """compressed-tensors' QuantizationArgs of a scheme's weights, as JSON."""
    grouped = s.group_size > 0
    a = {"num_bits": s.bits, "type": "int" if s.dtype == "int" else "float", "symmetric": s.sym,
         "group_size": s.group_size if grouped else None, "strategy": "group" if grouped else "channel",
         "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    if s.dtype == "nvfp":
        a |= {"strategy": "tensor_group", "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}
    if s.dtype == "mxfp":
        a |= {"scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}
    if s.dtype == "fp8_block":
        a |= {"strategy": "block", "group_size": None, "block_structure": [s.group_size, s.group_size]}
    return a


def input_args(act: str | None) -> dict | None:
    """compressed-tensors' QuantizationArgs of a layer's inputs (dynamic, as lowbit computes them)."""
    if act is None:
        return None
    base = {"symmetric": True, "block_structure": None, "actorder": None, "observer": None, "observer_kwargs": {},
            "dynamic": True}
    if act in ("int8", "fp8"):
        return base | {"num_bits": 8, "type": "int" if act == "int8" else "float", "group_size": None,
                       "strategy": "token"}
    if act == "fp8_g128":
        return base | {"num_bits": 8, "type": "float", "group_size": 128, "strategy": "group"}
    mx = act.removesuffix(RCEIL)  # the scale's rounding has no field here (quantization_config)
    if mx in ("mxfp4", "mxfp8"):
        return base | {"num_bits": int(mx[-1]), "type": "float", "group_size": 32, "strategy": "group",
                       "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}
    if act == "nvfp4":
        return base | {"num_bits": 4, "type": "float", "group_size": 16, "strategy": "tensor_group",
                       "dynamic": "local", "observer": "static_minmax", "scale_dtype": "torch.float8_e4m3fn",
                       "zp_dtype": "torch.float8_e4m3fn"}
    raise LowbitError(f"format compressed_tensors cannot declare {act} inputs")


def dense_reason(s: Scheme, shape) -> str | None:
    """Why a layer of this shape is written in float (compressed-tensors quantizes whole groups)."""
    out_f, in_f = shape
    if s.group_size > 0 and in_f % s.group_size:
        return f"group size {s.group_size} does not divide {in_f} inputs"
    return None


def _pack_along(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Dense int32 packing of unsigned codes along `dim`, cut to ceil(n*bits/32) words."""
    n = codes.shape[dim]
    words = pack_rows(pad_to(codes, 32, dim), bits, dim)
    return words.narrow(dim, 0, math.ceil(n * bits / 32)).contiguous()


def _unpack_along(words: torch.Tensor, bits: int, dim: int, n: int) -> torch.Tensor:
    return unpack_rows(pad_to(words, bits, dim), bits, dim, n)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _from_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def layer_tensors(name: str, q: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for quantized layer `name` (without '.weight')."""
    s, (out_f, in_f) = q.scheme, q.shape
    fmt = ct_format(s)
    t = {}
    if fmt == "pack-quantized":
        t["weight_packed"] = _pack_along(q.codes, s.bits, 1)
        t["weight_scale"] = q.scale.to(scale_dtype)
        t["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
        if not s.sym:
            t["weight_zero_point"] = _pack_along(q.zero.round().to(torch.uint8), s.bits, 0)
    elif fmt == "int-quantized":
        t["weight"] = (q.codes.to(torch.int16) - 128).to(torch.int8)
        t["weight_scale"] = q.scale.to(scale_dtype)
        if not s.sym:
            t["weight_zero_point"] = (q.zero.round().to(torch.int16) - 128).to(torch.int8)
    elif fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        if in_f % 2:
            raise LowbitError(f"{name}: an odd input size ({in_f}) cannot be packed two codes a byte")
        t["weight_packed"] = _nibbles(q.codes)
        if s.dtype == "nvfp":
            g = q.extras["global_scale"].float().reshape(1)
            t["weight_scale"] = (q.scale.float() * g).to(torch.float8_e4m3fn)
            t["weight_global_scale"] = g
        else:
            t["weight_scale"] = _e8m0(q.scale)
    else:  # mxfp8-quantized, float-quantized
        t["weight"] = q.codes.view(torch.float8_e4m3fn)
        scale = q.scale[:: s.group_size] if s.dtype == "fp8_block" else q.scale  # a row per tile
        t["weight_scale"] = _e8m0(scale) if s.dtype == "mxfp" else scale.float()
    if s.act is not None and get_activation(s.act).calibrated:
        if INPUT_SCALE not in q.extras:
            raise LowbitError(f"{name}: its {s.act} inputs have no calibrated scale (quantized without calibration "
                              "data)")
        t[INPUT_SCALE] = q.extras[INPUT_SCALE].float().reshape(1)
    return {f"{name}.{k}": v for k, v in t.items()}


def _e8m0(scale: torch.Tensor) -> torch.Tensor:
    e = torch.frexp(scale.float())[1] - 1  # scale is an exact power of two
    return (e + 127).to(torch.uint8)


def quantization_config(schemes: dict[str, Scheme], ignore: list[str]) -> dict:
    """config.json's quantization_config: a config group per scheme, targets "Linear" when there is
    one, the layers' names otherwise."""
    by_scheme = defaultdict(list)
    for n, s in schemes.items():
        by_scheme[s].append(n)
    groups = {}
    for i, (s, names) in enumerate(sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(by_scheme) == 1 else sorted(names),
            "weights": weight_args(s), "input_activations": input_args(s.act), "output_activations": None,
            "format": ct_format(s),
        }
    formats = {g["format"] for g in groups.values()}
    # compressed-tensors has no field for how MX inputs round their scale; its config ignores keys
    # it does not know, so the RCEIL rule (one per model: activations' families) is a key of its own
    rceil = {"mx_input_scale": "rceil"} if any(s.act and s.act.endswith(RCEIL) for s in schemes.values()) else {}
    return rceil | {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": "0.20.1",  # the compressed-tensors release whose layouts these are
        "quant_tool": f"lowbit {__version__}",
    }


def _float_matrices(layout: Layout, quantized) -> list[str]:
    """Checkpoint names of the layers vLLM could take for a quantized Linear but that stay in float:
    every nn.Linear (lm_head, tied or not) and every 2-D weight (MoE routers) outside `quantized`,
    the input embeddings excepted."""
    m = layout.model
    emb = m.get_input_embeddings()
    names = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    names |= {n.removesuffix(".weight") for n, p in m.named_parameters()
              if n.endswith(".weight") and p.dim() == 2 and p is not getattr(emb, "weight", None)}
    return sorted(c for c in (ckpt_name(m, n) for n in names) if c not in quantized)


class CompressedWriter(ConfiguredWriter):
    def __init__(self, folder: str, layout: Layout, state: dict | None = None):
        self.folder, self.layout, self.fmt = folder, layout, "compressed_tensors"
        self.dtype = layout.dtype if layout.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float16
        if self.dtype == torch.float32 and any(s.dtype in ("mxfp", "nvfp") for s in layout.schemes.values()):
            self.dtype = torch.bfloat16  # compressed-tensors unpacks MX and NV weights to bfloat16
        self.packed = {n: s for n, s in layout.schemes.items() if dense_reason(s, layout.shapes[n]) is None}
        self.config = quantization_config(self.packed, _float_matrices(layout, self.packed))
        dense = sorted(set(layout.schemes) - set(self.packed))
        if state is None and dense:
            warnings.warn(f"compressed_tensors: {len(dense)} layers written in float, their input sizes not a whole "
                          f"number of groups (compressed-tensors needs whole groups): {', '.join(dense[:4])}"
                          + (" ..." if len(dense) > 4 else ""), stacklevel=2)
        self.model = (ShardWriter(folder, "model", layout.max_shard_size) if state is None
                      else ShardWriter.resume(folder, state))

    def add(self, name, tensor, q):
        layer = name.removesuffix(".weight")
        if q is not None and layer in self.packed:
            for k, v in layer_tensors(layer, q, self.dtype).items():
                self.model.add(k, v)
            return
        self.model.add(name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)

# ---------------------------------------------------------------------------------------------
# reading back


def _scheme_of(group: dict) -> Scheme:
    """The lowbit Scheme of a config group (raises LowbitError for one lowbit cannot represent)."""
    w, a = group.get("weights") or {}, group.get("input_activations")
    bits, kind, gs = int(w.get("num_bits", 8)), w.get("type", "int"), w.get("group_size")
    strategy = w.get("strategy") or ("group" if gs else "channel")
    if strategy not in ("group", "channel", "tensor_group", "block"):
        raise LowbitError(f"compressed-tensors weight strategy {strategy!r} is not supported")
    group = int(gs) if strategy != "channel" and gs else -1
    if strategy == "block":
        rows, cols = w.get("block_structure") or (0, 1)
        if rows != cols or kind != "float" or bits != 8:
            raise LowbitError(f"compressed-tensors weight blocks {rows}x{cols} of {kind}{bits}: lowbit reads square "
                              "FP8 blocks only")
        group = int(cols)
    act = None
    if a:
        akind, abits = a.get("type", "int"), int(a.get("num_bits", 8))
        act = {("int", 8): "int8", ("float", 8): {32: "mxfp8", 128: "fp8_g128"}.get(a.get("group_size"), "fp8"),
               ("float", 4): "mxfp4" if a.get("group_size") == 32 else "nvfp4"}.get((akind, abits))
        if act is None:
            raise LowbitError(f"compressed-tensors input quantization {akind}{abits} is not supported")
    if kind == "int":
        return Scheme(bits, group, bool(w.get("symmetric", True)), act=act)
    if bits == 4:
        return Scheme(4, group, dtype="nvfp" if group == 16 else "mxfp", act=act)
    dtype = ("fp8_block" if strategy == "block" else
             "mxfp" if group == 32 and "uint8" in str(w.get("scale_dtype")) else "fp8")
    return Scheme(8, group, dtype=dtype, act=act)


def _read_layer(name: str, s: Scheme, t: dict, in_f: int, out_f: int) -> QuantizedWeight:
    """Inverse of layer_tensors; pops the layer's tensors from t."""
    fmt = ct_format(s)
    get = lambda k: t.pop(f"{name}.{k}")  # noqa: E731
    zero, extras = None, {}
    if fmt == "pack-quantized":
        codes = _unpack_along(get("weight_packed"), s.bits, 1, in_f)
        t.pop(f"{name}.weight_shape", None)
        scale = get("weight_scale").float()
        if s.sym:
            zero = torch.full_like(scale, 2 ** (s.bits - 1))
        else:
            zero = _unpack_along(get("weight_zero_point"), s.bits, 0, out_f).float()
    elif fmt == "int-quantized":
        codes = (get("weight").to(torch.int16) + 128).to(torch.uint8)
        scale = get("weight_scale").float()
        zp = t.pop(f"{name}.weight_zero_point", None)
        zero = torch.full_like(scale, 128) if zp is None else zp.float() + 128
    elif fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        codes = _from_nibbles(get("weight_packed"))
        if s.dtype == "nvfp":
            g = get("weight_global_scale").float().reshape(())
            scale, extras = get("weight_scale").float() / g, {"global_scale": g}
        else:
            scale = torch.exp2(get("weight_scale").float() - 127)
    else:
        codes = get("weight").view(torch.uint8)
        sc = get("weight_scale")
        scale = torch.exp2(sc.float() - 127) if s.dtype == "mxfp" else sc.float()
        if s.dtype == "fp8_block":
            scale = scale.repeat_interleave(s.group_size, dim=0)[:out_f]
    if f"{name}.{INPUT_SCALE}" in t:
        extras[INPUT_SCALE] = get(INPUT_SCALE).float().reshape(())
    return QuantizedWeight(s, codes, scale.reshape(out_f, -1), zero, extras)


def _matches(name: str, targets: list[str], module: nn.Module) -> bool:
    """compressed-tensors' target rule: an exact module name, a class name, or "re:" and a regex."""
    for t in targets:
        if t == name or t == type(module).__name__ or (t.startswith("re:") and re.match(t[3:], name)):
            return True
    return False


def load_compressed(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, {layer: QuantizedWeight}) of a compressed-tensors folder: the model holds
    the dequantized weights, with quantized inputs hooked back on."""
    import transformers

    qcfg = checkpoint_config(path)
    if not qcfg or qcfg.get("quant_method") != QUANT_METHOD:
        raise LowbitError(f"{path} is not a compressed-tensors checkpoint")
    if qcfg.get("quantization_status") not in (None, "compressed"):
        raise LowbitError(f"{path}: quantization status {qcfg.get('quantization_status')!r}, expected compressed")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    stored = getattr(config, "dtype", None) or torch.float32  # before from_config sets it to dtype
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    split_experts(model)
    mt = config.model_type
    tensors = {model_name(mt, k): v for k, v in read_tensors(path).items()}
    ignore = set(qcfg.get("ignore") or [])
    groups = [(g.get("targets", []), _scheme_of(g)) for g in qcfg.get("config_groups", {}).values()]
    if qcfg.get("mx_input_scale") == "rceil":
        groups = [(t, s.replace(act=s.act + RCEIL) if s.act in ("mxfp4", "mxfp8") else s) for t, s in groups]
    layers, acts = {}, {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        cname = checkpoint_name(mt, name)
        if cname in ignore or f"{name}.weight_scale" not in tensors:
            continue
        scheme = next((s for targets, s in groups if _matches(cname, targets, mod)), None)
        if scheme is None:
            continue
        q = _read_layer(name, scheme, tensors, mod.in_features, mod.out_features)
        # in the folder's float dtype, as the package unpacks them (MX and NV: bfloat16)
        tensors[f"{name}.weight"] = q.dequantize(torch.float32).to(stored)
        layers[name], acts[name] = q, scheme.act
    left = [k for k in tensors if k.rsplit(".", 1)[-1].startswith(("weight_", "input_"))]
    if left:
        raise LowbitError(f"{path}: tensors of no configured layer: {', '.join(left[:3])}")
    tokenizer = finish_loading(model, config, tensors, path, dtype)
    quantize_model_inputs(model, {n: a for n, a in acts.items() if a}, input_scales(layers))
    return model, tokenizer, layers


class CompressedTensors(Format):
    name, loads = "compressed_tensors", True
    loaded_by = "vLLM, transformers with compressed-tensors, lowbit eval"

    def check(self, scheme):
        if scheme.dtype not in ("int", "mxfp", "nvfp", "fp8", "fp8_block"):
            return f"format compressed_tensors has no layout for {scheme.name}; use --format gguf:{scheme.dtype} or fake"
        if scheme.dtype == "int" and scheme.act not in (None, "int8"):
            return f"format compressed_tensors cannot declare {scheme.act} inputs for integer weights ({scheme.name})"
        if scheme.dtype == "mxfp" and scheme.act not in (None, "mxfp4", "mxfp8", "mxfp4" + RCEIL, "mxfp8" + RCEIL):
            return f"format compressed_tensors cannot declare {scheme.act} inputs for MX weights ({scheme.name})"
        return None

    def engine_notes(self, schemes) -> list[str]:
        """Which engines load what: vLLM's kernels run 4- and 8-bit integers."""
        notes = []
        odd = sorted({s.name for s in schemes if s.dtype == "int" and s.bits not in _VLLM_INT_BITS})
        if odd:
            notes.append(f"compressed_tensors: {', '.join(odd)} written, but vLLM's kernels run only 4- and 8-bit "
                         "integer weights; transformers (with compressed-tensors) loads them")
        rceil = sorted({s.name for s in schemes if s.act and s.act.endswith(RCEIL)})
        if rceil:
            notes.append(f"compressed_tensors: {', '.join(rceil)}: the file declares MX inputs and records their "
                         "rounded-up scale in quantization_config.mx_input_scale, which lowbit reads back; an "
                         "engine's kernels round the inputs' scale by their own rule")
        return notes

    def open(self, folder, layout, state=None):
        for w in self.engine_notes(set(layout.schemes.values())) if state is None else ():
            warnings.warn(w, stacklevel=2)
        return CompressedWriter(folder, layout, state)

    @classmethod
    def detect(cls, folder):
        cfg = checkpoint_config(folder)
        return bool(cfg) and cfg.get("quant_method") == QUANT_METHOD

    @classmethod
    def load(cls, folder):
        model, tokenizer, _ = load_compressed(folder)
        return model, tokenizer

    @classmethod
    def read(cls, folder):
        model, tokenizer, layers = load_compressed(folder)
        report = {"layers": {n: q.scheme.to_dict() for n, q in layers.items()}, "source": folder}
        return QuantizeResult(model, tokenizer, layers, report)
