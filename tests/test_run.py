"""run.py and flags.py: every command's --help documents every flag with its description and default (a
comment is help text or an error, never a silent section), bad flags end in one line, a copied script is
its own run and --resume refuses another script's or another algorithm's checkpoint, the first update
moves, the metrics log is closed, the accumulated update is the sum of its micro-batches', and one stop
rule ends every completion."""
import dataclasses
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import data
import flags
import run

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ["sft", "lora", "grpo", "ppo", "dpo", "distill"]
COMMANDS = SCRIPTS + ["sample", "serve", "evaluate"]


def help_text(script: str) -> str:
    r = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split())  # argparse wraps lines: compare with whitespace collapsed


@pytest.mark.parametrize("script", COMMANDS)
def test_help_shows_every_flag_with_its_description_and_default(script):
    config = importlib.import_module(script).Config
    helps, groups = flags.config_comments(config)
    text = help_text(script)
    for field in dataclasses.fields(config):
        flag = "--" + field.name.replace("_", "-")
        description = " ".join(helps[field.name].split())
        assert description, f"{script}.Config.{field.name} has no comment to show in --help"
        want = f"{description} ({flags.shown_default(config, field)})"
        assert re.search(re.escape(flag) + r"[ ,]", text), (script, flag)
        assert want in text, (script, flag, want)
        assert "(default:" not in helps[field.name], (script, field.name)  # --help adds the one default
    for group in set(groups.values()):
        assert f"{group}:" in text, (script, group)
    first_line = importlib.import_module(script).__doc__.strip().splitlines()[0]
    assert first_line in text


def test_auto_fields_show_both_defaults_and_out_names_the_script():
    import grpo
    text = help_text("grpo")
    assert "peak learning rate (tiny: 0.001; pretrained: 1e-06)" in text
    assert "(tiny: 6; pretrained: 256)" in text  # --max-completion-len
    assert "(default: runs/grpo)" in text and "(default: None)" not in text.split("--lr", 1)[1][:80]
    assert flags.shown_default(grpo.Config, next(f for f in dataclasses.fields(grpo.Config) if f.name == "out")) == \
        "default: runs/grpo"


def test_sample_help_describes_every_flag_with_its_default():
    """sample.py's flags come from a Config like the scripts' (it once had its own argparse: 11 of 17 described)."""
    import sample
    text = help_text("sample")
    fields, (helps, _) = dataclasses.fields(sample.Config), flags.config_comments(sample.Config)
    described = [f for f in fields if helps[f.name] and re.search(re.escape("--" + f.name.replace("_", "-")) + r"[ ,]", text)
                 and f"{' '.join(helps[f.name].split())} ({flags.shown_default(sample.Config, f)})" in text]
    assert len(fields) >= 12 and len(described) / len(fields) >= 0.9, [f.name for f in fields if f not in described]


def test_a_subclass_config_keeps_its_base_groups_and_adds_its_own():
    import lora
    import sft
    helps, groups = flags.config_comments(lora.Config)
    base_helps, base_groups = flags.config_comments(sft.Config)
    assert groups["task"] == base_groups["task"] == "model and data"  # redefined default, same group
    assert groups["lora_rank"] == "LoRA / QLoRA" and helps["lora_rank"] == "r"
    assert set(base_helps) < set(helps)


def config_module(tmp_path, body: str):
    """A module defining `Config` (a RunConfig) from the given class body, importable (its source is read)."""
    name = f"cfg_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import dataclasses\nimport flags\n\n\n@dataclasses.dataclass\n"
                                         "class Config(flags.RunConfig):\n" + textwrap.indent(body, "    "))
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name).Config
    finally:
        sys.path.remove(str(tmp_path))


def test_a_comment_above_a_field_is_its_help_never_a_section(tmp_path):
    """The usual Python habit (a comment on the line above a field) is that field's help; only `# -- name --`
    starts a group: the field after it stays in the group it was in."""
    config = config_module(tmp_path, textwrap.dedent("""\
        # -- the loss --
        beta: float = 0.1  # scale of the implicit reward
        # HACK: DPOP's lambda, the penalty on a falling
        # chosen answer
        dpop_lambda: float = 50.0
        cpo_alpha: float = 1.0  # weight of the NLL
        lr: float = 1e-3  # peak learning rate
        warmup: float = 0.1  # warm-up fraction
        weight_decay: float = 0.0  # decay
        """))
    helps, groups = flags.config_comments(config)
    assert helps["dpop_lambda"] == "HACK: DPOP's lambda, the penalty on a falling chosen answer"
    assert groups["dpop_lambda"] == groups["cpo_alpha"] == groups["beta"] == "the loss"
    assert helps["cpo_alpha"] == "weight of the NLL"


@pytest.mark.parametrize("body,message", [
    ("x: int = 1  # after\n", None),
    ("# above\nx: int = 1  # and after\n", "has help text both above and after it"),
    ("x: int = 1\n", "field x has no help text"),
    ("# a comment, then a blank line\n\nx: int = 1\n", "field x has no help text"),
])
def test_help_text_in_two_places_or_none_stops_at_start_up(tmp_path, body, message):
    config = config_module(tmp_path, body)
    if message is None:
        assert flags.config_comments(config)[0]["x"] == "after"
        return
    with pytest.raises(flags.ConfigError, match=message) as e:
        flags.config_comments(config)
    assert re.search(r"cfg_\w+\.py:\d+", str(e.value))  # says where


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


def test_the_update_sums_its_micro_batches():
    """make_update only accumulates: the micro-batches' losses and gradients add up to one big batch's, whatever
    the split (each script divides by its own count: tests/test_sft.py, test_distill.py, test_grpo.py)."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(8, 3)).astype(np.float32), {"w": jnp.ones(3)}
    mask = (rng.random(8) > 0.3).astype(np.float32)

    def loss_fn(params, frozen, mb, key):
        return jnp.sum(mb["mask"] * (mb["x"] @ params["w"]) ** 2), {"tokens": jnp.sum(mb["mask"])}
    tx = optax.sgd(1.0)
    update = jax.jit(run.make_update(loss_fn, tx))
    want_loss, want = jax.value_and_grad(lambda p: jnp.sum(mask * (x @ p["w"]) ** 2))(w)
    for M in (1, 2, 4):
        params, _, metrics, aux = update(w, tx.init(w), {}, {"x": x.reshape(M, -1, 3), "mask": mask.reshape(M, -1)},
                                         None)
        np.testing.assert_allclose(w["w"] - params["w"], want["w"], rtol=1e-5)
        np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
        assert aux["tokens"].shape == (M,) and float(jnp.sum(aux["tokens"])) == mask.sum()


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_first_update_has_a_learning_rate_above_zero(script):
    """nanoGPT's warm-up, lr·(n + 1)/(ramp + 1): update 0 moves (it used to run at lr 0, a wasted step)."""
    cfg = importlib.import_module(script).Config(warmup_sft_steps=0) if script in ("grpo", "ppo", "dpo") else \
        importlib.import_module(script).Config()
    _, schedule = run.adamw(cfg, 1000)
    ramp = int(cfg.warmup * 1000)
    assert float(schedule(0)) == pytest.approx(cfg.lr / (ramp + 1))
    assert float(schedule(ramp - 1)) == pytest.approx(cfg.lr * ramp / (ramp + 1))
    assert float(schedule(ramp)) == pytest.approx(cfg.lr) and float(schedule(999)) < 1e-3 * cfg.lr
    _, flat = run.adamw(dataclasses.replace(cfg, warmup=0.0), 10)
    assert float(flat(0)) == pytest.approx(cfg.lr)  # no warm-up: the full rate at once


# ----------------------------------------------------------------------------- a copy is its own run

SHORT = {  # the fewest flags that make each script's run a few seconds
    "sft": ["--train-examples", "64", "--eval-examples", "4", "--batch-size", "8"],
    "lora": ["--train-examples", "64", "--eval-examples", "4", "--batch-size", "8"],
    "dpo": ["--warmup-sft-steps", "0", "--train-examples", "32", "--eval-examples", "4", "--batch-size", "8"],
    "grpo": ["--warmup-sft-steps", "0", "--prompts-per-step", "2", "--num-generations", "2", "--train-examples", "32",
             "--eval-examples", "4"],
    "ppo": ["--warmup-sft-steps", "0", "--prompts-per-step", "2", "--train-examples", "32", "--eval-examples", "4"],
    "distill": ["--teacher", "tiny-qwen3", "--train-examples", "32", "--eval-examples", "4", "--batch-size", "8"],
}
COMMON = ["--steps", "3", "--log-every", "1", "--eval-every", "3", "--save-every", "3"]


def run_in(cwd, script_path, *args):
    return subprocess.Popen([sys.executable, str(script_path), *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "XLA_FLAGS": ""})


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """`cp X.py my_X.py && python my_X.py` for every script, from a fresh working directory that already
    holds runs/X (a finished run of X's, to be left alone): → the directory."""
    cwd = tmp_path_factory.mktemp("copies")
    tag = uuid.uuid4().hex[:6]
    paths = {s: ROOT / f"my_{s}_{tag}.py" for s in SCRIPTS}  # beside the originals: the imports find run.py etc.
    try:
        for s, path in paths.items():
            shutil.copy(ROOT / f"{s}.py", path)
            original = cwd / "runs" / s
            (original / "checkpoints" / "1").mkdir(parents=True)
            (original / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        procs = {s: run_in(cwd, path, *SHORT[s], *COMMON) for s, path in paths.items()}
        errors = {s: p.communicate(timeout=900)[1] for s, p in procs.items()}
        failed = {s: e[-1500:] for s, e in errors.items() if procs[s].returncode != 0}
        assert not failed, failed
        yield cwd, tag
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_copied_script_writes_its_own_run(copies, script):
    cwd, tag = copies
    out = cwd / "runs" / f"my_{script}_{tag}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert records[1]["lr"] > 0  # the first update moves
    assert (out / "checkpoints" / "3").is_dir()
    assert (out / ("adapter" if script == "lora" else "hf") / ("adapter_config.json" if script == "lora" else
                                                              "config.json")).is_file()
    original = cwd / "runs" / script  # untouched
    assert sorted(p.name for p in original.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert (original / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert [p.name for p in (original / "checkpoints").iterdir()] == ["1"]


def test_resume_refuses_another_scripts_run_and_changed_algorithm_settings(copies):
    """--resume continues the run that wrote the checkpoint: not a copy of the script (another advantage,
    another reward), not another algorithm setting; how long, how often and where may change."""
    cwd, tag = copies
    out = cwd / "runs" / f"my_sft_{tag}"
    other = ROOT / f"other_sft_{tag}.py"
    shutil.copy(ROOT / "sft.py", other)
    try:
        proc = run_in(cwd, other, *SHORT["sft"], *COMMON, "--out", str(out), "--resume")
        err = proc.communicate(timeout=300)[1]
    finally:
        other.unlink()
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err[-2000:]
    assert f"holds a run of my_sft_{tag}.py, not of other_sft_{tag}.py" in lines[0]
    r = subprocess.run([sys.executable, "sft.py", *SHORT["sft"], *COMMON, "--out", str(out), "--resume"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})  # the original
    assert r.returncode == 1 and f"holds a run of my_sft_{tag}.py, not of sft.py" in r.stderr, r.stderr[-2000:]
    script = ROOT / f"my_sft_{tag}.py"
    shutil.copy(ROOT / "sft.py", script)
    try:
        for changed, name in ((["--lr", "0.01"], "--lr"), (["--task", "+,3,3"], "--task"), (["--pack"], "--pack")):
            proc = run_in(cwd, script, *SHORT["sft"], *COMMON, *changed, "--resume")
            err = proc.communicate(timeout=300)[1]
            line = err.strip().splitlines()[-1]
            assert proc.returncode == 1 and line.startswith("error: ") and f"written with {name} " in line, err[-2000:]
            assert "--resume may change only" in line and "--steps" in line and "--eval-every" in line
        before = (out / "metrics.jsonl").read_text()
        proc = run_in(cwd, script, *SHORT["sft"], "--steps", "4", "--eval-every", "2", "--log-every", "2",
                      "--save-every", "2", "--resume")  # longer, other cadences: the same run, continued
        err = proc.communicate(timeout=300)[1]
        assert proc.returncode == 0 and "resumed from step 3" in err, err[-2000:]
        assert (out / "metrics.jsonl").read_text().startswith(before)
    finally:
        script.unlink()


# ----------------------------------------------------------------------------- one stop rule

def test_one_stop_rule_ends_every_completion(monkeypatch, tmp_path):
    """data.stop_ids is where sampling (sample.py, serve.py), evaluation, grpo's rollouts and distill's
    on-policy samples end: a spy rule's ids reach every generate call."""
    import distill
    import grpo
    import sample
    from model import CONFIGS, Transformer
    from flax import nnx
    spy_ids, seen = (258, 48), []
    monkeypatch.setattr(data, "stop_ids", lambda tok, model_cfg: spy_ids)
    real = sample.generate

    def generate(*args, eos_ids=None, **kw):
        seen.append(tuple(eos_ids))
        return real(*args, eos_ids=eos_ids, **kw)
    monkeypatch.setattr(sample, "generate", generate)
    assert sample.load(sample.Config(model="tiny-qwen3", prompt=["1"])).eos_ids == spy_ids  # sample.py, serve.py
    import tokenizer
    model, tok = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(0)), tokenizer.ByteTokenizer()
    run.evaluate_completions(model, [{"prompt": "12*3=", "completion": "036"}], tok, None)
    examples = [data.tokenize({"prompt": "12*3=", "completion": "036"}, tok)] * 2
    distill.step_examples(examples, [0, 1], model, model, tok, distill.Config(lmbda=1.0, max_new_tokens=3), 0)
    grpo.main(["--warmup-sft-steps", "0", "--prompts-per-step", "2", "--num-generations", "2", "--train-examples",
               "16", "--eval-examples", "2", "--steps", "1", "--mesh", "fsdp=1", "--out", str(tmp_path / "grpo")])
    assert len(seen) >= 5 and set(seen) == {spy_ids}, seen


def test_the_stop_rule_is_eos_and_the_templates_end_of_turn(gemma3_dir):
    import ckpt
    import tokenizer
    tok = tokenizer.load_tokenizer(gemma3_dir)
    cfg = ckpt.load_hf(gemma3_dir).cfg
    assert data.stop_ids(tok, cfg) == tuple(dict.fromkeys((*tok.eos_ids, *cfg.eos_ids, tok.token_id("<end_of_turn>"))))
    assert tok.token_id("<end_of_turn>") in data.stop_ids(tok, cfg)
    byte = tokenizer.ByteTokenizer()
    from model import CONFIGS
    assert data.stop_ids(byte, CONFIGS["tiny-qwen3"]) == (258,)  # no <|im_end|> in a byte vocabulary
