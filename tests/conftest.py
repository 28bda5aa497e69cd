import os
import pathlib
import sys

# Eight simulated CPU devices for the sharding tests; must be set before jax is imported.
# Single-device code runs on the first of them as before.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# One persistent compilation cache for the session, inherited by every script the tests run: most tests start a
# short run of a script, and most of such a run is compiling the programs the run before it compiled (measured:
# `python sft.py --steps 4`, 13.8 s cold, 5.1 s from the cache). Fresh for each session; the tests that kill or
# starve a run give it a copy (private_jax_cache below).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanotune-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the small programs too: they add up
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gemma3_dir() -> pathlib.Path:
    """The real Gemma 3 270M as an HF directory, built once per machine from the PyPI GGUF."""
    import gemma3_reference
    return gemma3_reference.build()


@pytest.fixture(scope="module")
def private_jax_cache(tmp_path_factory) -> pathlib.Path:
    """A copy of the session's compilation cache for the runs a test module kills or starves of disk or memory:
    JAX writes an entry in place, and an entry cut off mid-write would cost every later test a warning and a
    compile. Use with `pytestmark = pytest.mark.usefixtures("private_jax_cache")`."""
    import shutil
    copy = tmp_path_factory.mktemp("jax-cache") / "cache"
    shutil.copytree(os.environ["JAX_COMPILATION_CACHE_DIR"], copy)
    patch = pytest.MonkeyPatch()
    patch.setenv("JAX_COMPILATION_CACHE_DIR", str(copy))
    yield copy
    patch.undo()


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """After each test file, JAX's compiled programs go: the suite is one process compiling for an hour, and
    every program keeps memory mappings of its code (the decode engine's shapes alone, ~900 each). Past the
    kernel's 65530 mappings XLA's compiler aborts the whole process, as it once did here in test_sample."""
    yield
    import jax
    jax.clear_caches()


def demo_run(tmp_path_factory, script: str, *args: str) -> pathlib.Path:
    """`python script *args` in a subprocess on one CPU device, as a user runs it: its --out directory."""
    import subprocess
    out = tmp_path_factory.mktemp(script.removesuffix(".py") + "_demo") / "run"
    r = subprocess.run([sys.executable, script, *args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800, env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def sft_demo(tmp_path_factory) -> pathlib.Path:
    """`python sft.py --steps 600` (half the default's 1200 steps, under a minute) run once: its --out directory,
    for sft's learning test and as the teacher of distill's (the default distill.py takes runs/sft/hf too)."""
    return demo_run(tmp_path_factory, "sft.py", "--steps", "600")


@pytest.fixture(scope="session")
def calculator_demo(tmp_path_factory) -> pathlib.Path:
    """`python grpo.py --tools calculator` (the whole demo, 60 steps, about 3 minutes; an evaluation at step 30 too)
    run once: its --out directory (metrics.jsonl, hf/, warmup_sft/), shared by the learning test and the tests that
    serve the model. The whole demo, not half: at step 30 the demo is still climbing and float order alone moves
    its eval/reward over 0.49-0.65; at step 60 it is 0.65-0.66 (tests/test_grpo_tools.py)."""
    return demo_run(tmp_path_factory, "grpo.py", "--tools", "calculator", "--eval-every", "30")


@pytest.fixture(scope="session")
def ppo_demo(tmp_path_factory) -> pathlib.Path:
    """`python ppo.py --steps 150` (half the demo's 300 steps, about 2 minutes) run once: its --out directory
    (metrics.jsonl, hf/), for tests/test_ppo.py."""
    return demo_run(tmp_path_factory, "ppo.py", "--steps", "150", "--eval-every", "150")
