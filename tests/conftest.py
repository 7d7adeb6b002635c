import os

import pytest

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")
STORIES = os.path.join(ASSETS, "models", "stories260K")
TINYSTORIES = os.path.join(ASSETS, "text", "tinystories_valid_prefix.txt")
PYCODE = os.path.join(ASSETS, "models", "pycode-7m")


def need_assets():
    if not os.path.isdir(STORIES):
        pytest.skip(f"shared assets not found at {os.path.abspath(ASSETS)}")


@pytest.fixture(scope="session")
def stories_text():
    """stories260K's protocol: first 60% of the TinyStories text to calibrate, last 20% to evaluate."""
    need_assets()
    with open(TINYSTORIES) as f:
        text = f.read()
    n = len(text)
    return text[: int(0.6 * n)], text[int(0.8 * n) :]


def assert_quantize_refused(model: str, args: list, message: str, tmp_path) -> None:
    """`lowbit quantize MODEL --algorithm rtn --out OUT ARGS` exits 2 with one error line ending in
    `message` (progress lines may come first) and leaves no output, partial or whole."""
    import subprocess
    import sys

    need_assets()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", model, "--algorithm", "rtn", "--out", str(out),
                        *args], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr
    assert sum("error" in line for line in r.stderr.splitlines()) == 1
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial")
