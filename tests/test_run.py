"""run.py: every script's --help documents every flag with its description and default, bad flags end in
one line, the metrics log is closed, and the accumulated update equals one big batch's."""
import dataclasses
import importlib
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import run

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ["sft", "lora", "grpo", "dpo", "distill"]


def help_text(script: str) -> str:
    r = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split())  # argparse wraps lines: compare with whitespace collapsed


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_flag_with_its_description_and_default(script):
    config = importlib.import_module(script).Config
    helps, groups = run.config_comments(config)
    text = help_text(script)
    for field in dataclasses.fields(config):
        flag = "--" + field.name.replace("_", "-")
        description = " ".join(helps[field.name].split())
        assert description, f"{script}.Config.{field.name} has no comment to show in --help"
        default = '""' if field.default == "" else field.default
        want = f"{description} (default: {default})"
        assert re.search(re.escape(flag) + r"[ ,]", text), (script, flag)
        assert want in text, (script, flag, want)
    for group in set(groups.values()):
        assert f"{group}:" in text, (script, group)
    first_line = importlib.import_module(script).__doc__.strip().splitlines()[0]
    assert first_line in text


def test_a_subclass_config_keeps_its_base_groups_and_adds_its_own():
    import lora
    import sft
    helps, groups = run.config_comments(lora.Config)
    base_helps, base_groups = run.config_comments(sft.Config)
    assert groups["task"] == base_groups["task"] == "model and data"  # redefined default, same group
    assert groups["lora_rank"] == "LoRA / QLoRA" and helps["lora_rank"] == "r"
    assert set(base_helps) < set(helps)


@pytest.mark.parametrize("args,message", [
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_bad_flags_end_in_one_line(args, message):
    for script in SCRIPTS:
        r = subprocess.run([sys.executable, f"{script}.py", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (script, r.stderr)


def test_metrics_log_rounds_appends_and_closes(tmp_path):
    with run.MetricsLog(tmp_path) as log:
        log.write({"step": 1, "loss": 0.1234567891})
    assert log.file.closed
    with run.MetricsLog(tmp_path) as log:
        log.write({"step": 2, "loss": 2.0})
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"step": 1, "loss": 0.123457}',
                                                                     '{"step": 2, "loss": 2.0}']


def test_the_update_normalises_by_the_whole_steps_tokens():
    """Σ over micro-batches of summed losses / Σ tokens: the same step as one big batch, whatever the split."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(8, 3)).astype(np.float32), {"w": jnp.ones(3)}
    mask = (rng.random(8) > 0.3).astype(np.float32)

    def loss_fn(params, frozen, mb, key):
        return jnp.sum(mb["mask"] * (mb["x"] @ params["w"]) ** 2), {"tokens": jnp.sum(mb["mask"])}
    tx = optax.sgd(1.0)
    update = jax.jit(run.make_update(loss_fn, tx))
    results = [update(w, tx.init(w), {}, {"x": x.reshape(A, -1, 3), "mask": mask.reshape(A, -1)}, None)
               for A in (1, 2, 4)]
    want = jax.grad(lambda p: jnp.sum(mask * (x @ p["w"]) ** 2) / mask.sum())(w)["w"]
    for params, _, metrics, _ in results:
        np.testing.assert_allclose(w["w"] - params["w"], want, rtol=1e-5)
        assert float(metrics["tokens"]) == mask.sum()
