"""compressed_tensors folders (vLLM's format) against the real `compressed-tensors` package, per scheme.

    python bench/compressed.py [--schemes W4A16,W8A16,...] [--windows 40]

pycode-7m, weights from RTN (calibration windows only where NVFP4 inputs need their scales). For
each scheme: the folder's size against the same model saved in the folder's float dtype, the
block tensors' bytes against their float16 bytes, whether the package's decompressor unpacks
every layer to exactly lowbit's dequantized weights, and perplexity (heldout.txt, 256-token
windows) of three readings of the same weights: lowbit's fake folder (lowbit.load, inputs quantized
as the scheme says), the compressed_tensors folder through lowbit.load, and through transformers
with the package (its own input quantizers; its reference rounds int8 inputs with amax/127.5 and
quantizes bfloat16 inputs in bfloat16). Rows go to bench/results/compressed.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import transformers  # noqa: E402
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

import lowbit  # noqa: E402
from lowbit.eval.perplexity import perplexity  # noqa: E402
from lowbit.export import export  # noqa: E402
from lowbit.export.packed import read_tensors  # noqa: E402
from lowbit.model import ckpt_name  # noqa: E402

ASSETS = os.path.join(HERE, "..", "..", "shared", "assets")
PYCODE = os.path.join(ASSETS, "models", "pycode-7m")
SCHEMES = "W4A16,W4A16G32,W3A16G64,W2A16G64,W8A16PC,W8A8,MXFP4A16,NVFP4A16,MXFP8A16,FP8A16,MXFP4,NVFP4,MXFP8,FP8"


def exact(result, folder) -> bool:
    """The package's compressor for each config group unpacks every layer to lowbit's weights."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    tensors = read_tensors(folder)
    for name, q in result.layers.items():
        c = ckpt_name(result.model, name)
        if f"{c}.weight_scale" not in tensors:
            return False
        group = next(g for g in cfg.config_groups.values() if "Linear" in g.targets or c in g.targets)
        state = {k[len(c) + 1:]: v for k, v in tensors.items() if k.startswith(c + ".")}
        got = BaseCompressor.get_value_from_registry(group.format).decompress(state, group)["weight"]
        if not torch.equal(got, q.dequantize(torch.float32).to(got.dtype)):
            return False
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default=SCHEMES)
    p.add_argument("--windows", type=int, default=40)
    args = p.parse_args()
    with open(os.path.join(PYCODE, "heldout.txt")) as f:
        text = f.read()
    model, tok = lowbit.load(PYCODE)
    ppl = lambda m: perplexity(m, tok, text, seqlen=256, max_windows=args.windows)["ppl"]  # noqa: E731
    rows = [{"scheme": "fp32 original", "ppl_fake": ppl(model)}]
    print(json.dumps(rows[0]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.schemes.split(","):
            m, _ = lowbit.load(PYCODE)
            scheme = lowbit.get_scheme(name)
            data = dict(dataset=os.path.join(PYCODE, "calib.txt"), nsamples=32, seqlen=256) if scheme.act == "nvfp4" else {}
            r = lowbit.quantize(m, scheme, "rtn", tokenizer=tok, progress=False, **data)
            out = os.path.join(tmp, name)
            export(r, out, "fake,compressed_tensors")
            ct = os.path.join(out, "compressed_tensors")
            tensors = read_tensors(ct)
            block = sum(v.numel() * v.element_size() for k, v in tensors.items()
                        if ".layers." in k and k.rsplit(".", 1)[1].startswith(("weight_", "input_")) or
                        (".layers." in k and k.endswith(".weight") and k[:-7] in {ckpt_name(m, n) for n in r.layers}))
            fp16 = sum(2 * q.codes.numel() for q in r.layers.values())
            with open(os.path.join(ct, "config.json")) as f:
                cfg = json.load(f)
            row = {"scheme": name, "format": cfg["quantization_config"]["format"], "dtype": cfg.get("dtype"),
                   "block_bytes_per_fp16": round(block / fp16, 4), "exact": exact(r, ct),
                   "ppl_fake": ppl(lowbit.load(os.path.join(out, "fake"))[0]),
                   "ppl_lowbit_ct": ppl(lowbit.load(ct)[0])}
            try:
                hf = transformers.AutoModelForCausalLM.from_pretrained(ct, local_files_only=True)
                row["ppl_transformers"] = ppl(hf)
            except Exception as e:  # the package's loader may not build a scheme (asymmetric zero points)
                row["transformers_error"] = str(e).splitlines()[0][:120]
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "compressed.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("\n| scheme | format | dtype | block bytes / fp16 | unpacks exactly | ppl fake | ppl lowbit.load | ppl transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        t = f"{r['ppl_transformers']:.4f}" if "ppl_transformers" in r else "does not load"
        print(f"| {r['scheme']} | {r['format']} | {r['dtype']} | {r['block_bytes_per_fp16']:.3f} | {r['exact']} | "
              f"{r['ppl_fake']:.4f} | {r['ppl_lowbit_ct']:.4f} | {t} |")
    assert all(math.isfinite(r["ppl_fake"]) for r in rows)


if __name__ == "__main__":
    main()
