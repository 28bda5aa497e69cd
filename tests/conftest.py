import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gemma3_dir() -> pathlib.Path:
    """The real Gemma 3 270M as an HF directory, built once per machine from the PyPI GGUF."""
    import gemma3_reference
    return gemma3_reference.build()
