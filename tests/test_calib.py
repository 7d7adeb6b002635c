import json

import pytest
import torch

from lowbit.calib import calibration_windows, make_windows, read_text, tokenize, windows_hash
from lowbit.errors import LowbitError
from lowbit.model import load_model

from conftest import STORIES, TINYSTORIES, need_assets


@pytest.fixture(scope="module")
def tok():
    need_assets()
    return load_model(STORIES)[1]


def test_windows_shape_and_determinism():
    tokens = torch.arange(10_000)
    a = make_windows(tokens, 16, 100, seed=1)
    b = make_windows(tokens, 16, 100, seed=1)
    c = make_windows(tokens, 16, 100, seed=2)
    assert a.shape == (16, 100)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert windows_hash(a) == windows_hash(b) != windows_hash(c)
    # Non-overlapping: every window starts on the grid, none twice.
    starts = a[:, 0].tolist()
    assert all(s % 100 == 0 for s in starts) and len(set(starts)) == 16


def test_too_short_is_a_clear_error():
    with pytest.raises(LowbitError, match="too short.*10 windows of 100, 16 requested"):
        make_windows(torch.arange(1000), 16, 100)


def test_empty_text(tok):
    with pytest.raises(LowbitError, match="empty"):
        tokenize(tok, "  \n ")


def test_file_formats_agree(tmp_path, tok):
    docs = ["Once upon a time there was a cat.", "The dog ran to the park and played."] * 200
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    texts = [read_text(str(tmp_path / f"a.{ext}")) for ext in ("txt", "jsonl", "parquet")]
    assert texts[0] == texts[1] == texts[2]
    w = [calibration_windows(tok, str(tmp_path / f"a.{ext}"), 8, 32, seed=0) for ext in ("txt", "jsonl", "parquet")]
    assert torch.equal(w[0], w[1]) and torch.equal(w[1], w[2])


def test_bad_files(tmp_path, tok):
    with pytest.raises(LowbitError, match="not found"):
        read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(LowbitError, match="bad.jsonl:2: no 'text' field"):
        read_text(str(tmp_path / "bad.jsonl"))


def test_real_text(tok):
    w = calibration_windows(tok, TINYSTORIES, 32, 256, seed=0)
    assert w.shape == (32, 256) and int(w.max()) < 512
