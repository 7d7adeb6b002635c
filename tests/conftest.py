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
