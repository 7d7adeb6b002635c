"""Every registered format (lowbit.export.FORMATS), with every option, on the tiny random model of
every test architecture: it is written; a format lowbit loads is detected, loads back with the
logits of the in-memory quantized model, and reads back the same codes and schemes; a format that
cannot hold an architecture refuses it with one clear error, before writing anything. A new format
is enrolled by registering it."""
import os

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import FORMATS, detect_format, export
from lowbit.schemes import Scheme

from conftest import STORIES, need_assets
from tiny_models import ARCHS, build, data

# The first of these a format takes is the one it is tested with (2, 3, 5, 6 bits: the GGUF types
# that re-encode integer weights of their own width).
SCHEMES = [Scheme(4, 32, True), Scheme(8, 32, True), Scheme(4, 32, False)] + [Scheme(b, 32, True) for b in (2, 3, 5, 6)]
CHOICES = [(name, option) for name, cls in FORMATS.items() for option in (cls.options or (None,))]


@pytest.fixture(scope="module")
def tokenizer():
    need_assets()
    return lowbit.load(STORIES)[1]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
@pytest.mark.parametrize("name,option", CHOICES, ids=[f"{n}-{o}" if o else n for n, o in CHOICES])
def test_format_round_trip(name, option, arch, tokenizer, tmp_path):
    cls = FORMATS[name]
    fmt = cls(option)
    scheme = next((s for s in SCHEMES if fmt.check(s) is None), None)
    assert scheme is not None, f"{fmt.tag} takes none of {SCHEMES}"
    model = build(arch)
    _, ids = data()
    r = lowbit.quantize(model, scheme, "rtn", progress=False)
    r.tokenizer = tokenizer  # a real vocabulary for the formats that embed one
    out = str(tmp_path / "out")
    reason = fmt.check_model(model.config.model_type)
    if reason:
        with pytest.raises(LowbitError, match="architecture"):
            export(r, out, [fmt])
        assert not os.path.exists(out) and os.listdir(tmp_path) == []
        return
    export(r, out, [fmt])
    assert sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) > 0
    if not cls.loads:
        assert detect_format(out) is None
        return
    assert detect_format(out) is cls
    loaded, _ = cls.load(out)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = loaded(input_ids=ids, use_cache=False).logits.float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-3, f"{fmt.tag} on {arch.name}: relative logit difference {rel:.2e}"  # float16 storage
    back = cls.read(out)
    assert set(back.layers) <= set(r.layers)  # layers the format keeps dense come back as plain weights
    for n, q in back.layers.items():
        assert q.scheme == r.layers[n].scheme, n
        assert torch.equal(q.codes, r.layers[n].codes), n
