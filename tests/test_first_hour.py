"""What a new user sees, driven as subprocesses: progress lines while long steps run (by the
timestamps of the captured lines), the resolved settings in the header (no None), errors that
name their file before any model is loaded, file modes that follow the umask, a multi-format
output that says what loads each folder and that `lowbit eval` takes whole, and --help's scheme
grammar."""
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import STORIES, TINYSTORIES, need_assets

LOWBIT = [sys.executable, "-m", "lowbit.cli"]


def run(args, **kw):
    return subprocess.run(LOWBIT + args, capture_output=True, text=True, **kw)


def timed_lines(args) -> tuple[int, list[tuple[float, str]]]:
    """Run the CLI; (exit code, [(seconds since start, stderr line)])."""
    t0 = time.monotonic()
    p = subprocess.Popen(LOWBIT + args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = [(time.monotonic() - t0, line.rstrip("\n")) for line in p.stderr]
    return p.wait(), lines


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A SignRound run into three formats with the umask at 0022."""
    need_assets()
    out = str(tmp_path_factory.mktemp("first") / "q")
    old = os.umask(0o022)
    try:
        r = run([
            "quantize", STORIES, "--scheme", "W4A16G32", "--dataset", TINYSTORIES, "--iters", "5", "--nsamples", "8",
            "--seqlen", "64", "--format", "fake,auto_round,gguf:q4_0", "--out", out])
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    return out, r


def test_header_shows_resolved_settings(multi):
    out, r = multi
    header = r.stderr.splitlines()[0]
    assert header.startswith("quantizing") and "None" not in header
    for key in ("lr=", "prescale=", "bf16=", "compile=", "device=", "threads="):
        assert key in header
    with open(os.path.join(out, "fake", "quantization.json")) as f:
        settings = json.load(f)["settings"]
    assert None not in settings.values() and settings["iters"] == 5 and settings["bf16"] in (True, False)


def test_multi_format_output_says_what_loads_each_and_eval_takes_the_parent(multi):
    out, r = multi
    assert f"wrote {out}:" in r.stdout
    for sub, tool in (("fake/", "transformers"), ("auto_round/", "auto-round"), ("gguf-q4_0/", "llama.cpp")):
        assert any(line.strip().startswith(sub) and tool in line for line in r.stdout.splitlines()), r.stdout
    e = run(["eval", out, "--text", TINYSTORIES, "--eval-windows", "8"])
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["windows"] == 8
    assert os.path.join(out, "fake") in e.stderr


def test_files_follow_the_umask(multi):
    out, _ = multi
    for root, dirs, files in os.walk(out):
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
            assert mode == 0o644, f"{name}: {oct(mode)}"


def test_eval_shows_progress_while_it_runs():
    need_assets()
    code, lines = timed_lines(["eval", STORIES, "--text", TINYSTORIES, "--eval-windows", "300"])
    assert code == 0
    progress = [(t, line) for t, line in lines if line.startswith("perplexity on")]
    assert progress and progress[0][1].endswith("started (300 windows)")
    assert progress[-1][1].split(": ")[1].startswith("done in")
    # a line within 10 s of the step's start and then at least every 10 s (the beat is 5 s)
    times = [t for t, _ in progress]
    assert all(b - a < 10 for a, b in zip(times, times[1:])), lines


def test_bad_text_is_named_before_any_model_loads(tmp_path):
    need_assets()
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    empty = tmp_path / "calib.txt"
    empty.write_text("  \n")
    for args, expect in (
        (["quantize", str(broken), "--dataset", str(empty), "--out", str(tmp_path / "o")], f"{empty} is empty"),
        (["quantize", str(broken), "--dataset", str(tmp_path / "no.txt"), "--out", str(tmp_path / "o")],
         f"not found: {tmp_path / 'no.txt'}"),
        (["quantize", str(broken), "--algorithm", "rtn", "--eval-text", str(empty), "--out", str(tmp_path / "o")],
         f"evaluation text {empty} is empty"),
        (["plan", str(broken), "--dataset", str(empty), "--target-bits", "3", "--out", str(tmp_path / "p.json")],
         f"{empty} is empty"),
        (["eval", str(broken), "--text", str(empty)], f"{empty} is empty"),
    ):
        r = run(args)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"lowbit: error: {r.stderr.split('error: ')[1].strip()}"]
        assert expect in r.stderr, (args, r.stderr)
    assert not os.path.exists(tmp_path / "o")


def test_help_lists_the_scheme_grammar():
    r = run(["quantize", "--help"])
    text = " ".join(r.stdout.split())
    for piece in ("W<bits>A16[G<group>|PC][-asym]", "W4A8", "MXFP4", "NVFP4A16", "-<input type>"):
        assert piece in text


def test_long_blocks_and_capture_show_progress(tmp_path):
    """A block that tunes for long shows a line within 10 s of its start (a beat 5 s in); capturing
    the calibration windows says when it starts and ends."""
    need_assets()
    from conftest import PYCODE

    # float32 tuning, so blocks take over 10 s on CPUs where bf16 would make them short too
    code, lines = timed_lines(["quantize", PYCODE, "--scheme", "W2A16G64", "--dataset", os.path.join(PYCODE, "calib.txt"),
                               "--iters", "200", "--nsamples", "32", "--seqlen", "256", "--no-bf16",
                               "--out", str(tmp_path / "q")])
    assert code == 0
    text = [line for _, line in lines]
    assert any(line.startswith("capturing block 1's inputs") and "done in" in line for line in text)
    captured = next(t for t, line in lines if line.startswith("capturing block 1's inputs") and "done in" in line)
    starts = [captured] + [t for t, line in lines if line.startswith("block ") and " loss " in line]
    beats = [t for t, line in lines if ": tuning: " in line]
    assert any(b - a > 10 for a, b in zip(starts, starts[1:])), "no block took long enough to check"
    for a, b in zip(starts, starts[1:]):
        if b - a > 10:  # a block that took long had a line inside it within 10 s
            assert any(a < t <= a + 10 for t in beats), lines
