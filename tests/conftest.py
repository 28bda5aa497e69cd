import os
import pathlib
import sys

# Eight simulated CPU devices for the sharding tests; must be set before jax is imported.
# Single-device code runs on the first of them as before.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gemma3_dir() -> pathlib.Path:
    """The real Gemma 3 270M as an HF directory, built once per machine from the PyPI GGUF."""
    import gemma3_reference
    return gemma3_reference.build()


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """After each test file, JAX's compiled programs go: the suite is one process compiling for an hour, and
    every program keeps memory mappings of its code (the decode engine's shapes alone, ~900 each). Past the
    kernel's 65530 mappings XLA's compiler aborts the whole process, as it once did here in test_sample."""
    yield
    import jax
    jax.clear_caches()


@pytest.fixture(scope="session")
def calculator_demo(tmp_path_factory) -> pathlib.Path:
    """`python grpo.py --tools calculator` run once (about 4 minutes): its --out directory (metrics.jsonl, hf/,
    warmup_sft/), shared by the learning test and the tests that serve the exported model."""
    import subprocess
    out = tmp_path_factory.mktemp("calculator_demo") / "run"
    r = subprocess.run([sys.executable, "grpo.py", "--tools", "calculator", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800, env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def ppo_demo(tmp_path_factory) -> pathlib.Path:
    """`python ppo.py` run once (a few minutes): its --out directory (metrics.jsonl, hf/), for tests/test_ppo.py."""
    import subprocess
    out = tmp_path_factory.mktemp("ppo_demo") / "run"
    r = subprocess.run([sys.executable, "ppo.py", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800, env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    return out
