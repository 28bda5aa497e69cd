"""Faults, for every script: SIGTERM/SIGINT save and exit 0 (a second signal stops at once), kill -9 at
random moments then --resume continues the same run, a NaN stops before it is saved, a broken newest
checkpoint falls back to the one before, a state of another model is one line, a full disk or an
unwritable --out is one line with the earlier checkpoints intact."""
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("private_jax_cache")  # runs killed or starved write no shared cache

# Small runs of each script on the built-in task; every one saves at steps 2, 4, ...
RUNS = {
    "sft.py": ["--train-examples", "400", "--eval-examples", "8", "--batch-size", "16"],
    "lora.py": ["--train-examples", "400", "--eval-examples", "8", "--batch-size", "16", "--quant", "nf4",
                "--lora-dropout", "0.1"],  # the dropout masks and the quantized base must come back too
    "dpo.py": ["--warmup-sft-steps", "0", "--train-examples", "64", "--eval-examples", "6", "--batch-size", "8"],
    "grpo.py": ["--warmup-sft-steps", "5", "--warmup-sft-batch-size", "16", "--prompts-per-step", "4",
                "--num-generations", "4", "--num-iterations", "2", "--train-examples", "200", "--eval-examples", "8"],
    "ppo.py": ["--warmup-sft-steps", "5", "--warmup-sft-batch-size", "16", "--prompts-per-step", "8",
               "--num-mini-batches", "2", "--train-examples", "200", "--eval-examples", "8"],  # critic and policy states
    "distill.py": ["--teacher", "tiny-qwen3", "--train-examples", "200", "--eval-examples", "8", "--batch-size", "8",
                   "--lmbda", "0.5", "--max-new-tokens", "6"],  # half the steps sample their completions
}
COMMON = ["--log-every", "1", "--save-every", "2", "--keep", "3"]
STEPS = 16  # every run's length (the learning-rate schedule depends on it): checkpoints at 12, 14, 16 stay


def start(script, out, *extra, steps=STEPS, eval_every=3, **popen):
    return subprocess.Popen([sys.executable, script, *RUNS[script], *COMMON, "--steps", str(steps), "--eval-every",
                             str(eval_every), *extra, "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "XLA_FLAGS": ""}, **popen)


def finish(script, out, *extra, steps=STEPS, eval_every=3, timeout=900, **popen):
    proc = start(script, out, *extra, steps=steps, eval_every=eval_every, **popen)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def records(out) -> list[dict]:
    path = pathlib.Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def by_step(out, key="loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records(out) if key in r}


def logged(out) -> dict[tuple[int, str], float]:
    """Every number a run logged, by (step, name): the last value where a resumed run logged a step again.
    Timings are left out; everything else (losses, rewards, KLs, grad norms, evals) must match exactly."""
    return {(r["step"], name): value for r in records(out) for name, value in r.items()
            if name != "step" and not any(word in name for word in ("seconds", "_sec", "time"))}


def last_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip() and "\r" not in line and "|" not in line]
    return lines[-1] if lines else ""


def wait_for(predicate, proc, seconds=600):
    deadline = time.time() + seconds
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """The uninterrupted run of each script every fault is compared with."""
    cache = {}

    def get(script):
        if script not in cache:
            out = tmp_path_factory.mktemp(script.replace(".py", "") + "-full")
            rc, err = finish(script, out)
            assert rc == 0, err[-2000:]
            cache[script] = out
        return cache[script]
    return get


# ----------------------------------------------------------------------------- preemption

# sft and grpo (a supervised and an RL loop): the stop is run.Progress's, the same in every script, and what a
# stop saves is what every save holds, which the kill -9 test below resumes exactly for all five scripts
@pytest.mark.parametrize("script", ["sft.py", "grpo.py"])
def test_sigterm_saves_the_step_and_exits_zero_then_resume_is_exact(script, tmp_path, full_runs):
    out = tmp_path / "run"
    proc = start(script, out)
    wait_for(lambda: len(by_step(out)) >= 1, proc)  # a step is done: the loop is running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    line = last_line(err)
    assert line.startswith("stopped at step ") and "SIGTERM" in line and "--resume" in line, err[-2000:]
    step = int(line.split()[3])
    assert (out / "checkpoints" / str(step)).is_dir() and step < STEPS
    rc, err = finish(script, out, "--resume")
    assert rc == 0, err[-2000:]
    assert "warm-up:" not in err  # grpo.py's supervised warm-up is done once and reused
    assert sorted(by_step(out)) == list(range(1, STEPS + 1))
    want, got = logged(full_runs(script)), logged(out)
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}


def test_a_second_signal_stops_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start("sft.py", out, "--batch-size", "4096", "--train-examples", "8192", steps=100000, eval_every=100000)
    wait_for(lambda: len(by_step(out)) >= 1, proc)
    time.sleep(0.5)  # into the next step (seconds long): a signal just after a step's record stops at that step at once
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # the first is being handled: the step is finishing
        if "finishing this step" in line:
            break
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert last_line(err).startswith("SIGINT again: stopped at once"), err[-2000:]
    assert not (out / "checkpoints").is_dir() or all(p.name.isdigit() or p.name.startswith(".")
                                                     for p in (out / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- kill -9 anywhere

@pytest.mark.slow
@pytest.mark.parametrize("script", list(RUNS))
def test_kill_9_at_random_moments_then_resume_is_exact(script, tmp_path, full_runs):
    """Three kill -9s that land in a live run of 16 steps, at seeded random times after a new step is logged
    (mid-step, mid-save, mid-eval: wherever they fall), each followed by --resume; every number logged
    (losses, metrics, evals) is the uninterrupted run's."""
    out, rng, steps = tmp_path / "run", np.random.default_rng(sum(map(ord, script))), STEPS
    want = logged(full_runs(script))
    landed = []
    for attempt in range(12):
        done = len(by_step(out))
        proc = start(script, out, *(["--resume"] if attempt else []), steps=steps)
        wait_for(lambda: len(by_step(out)) > done, proc)
        time.sleep(float(rng.uniform(0.0, 0.4)))
        if proc.poll() is None:
            proc.kill()
            landed.append(max(by_step(out), default=0))
        _, err = proc.communicate(timeout=60)
        assert not attempt or "warm-up:" not in err, err[-2000:]  # grpo.py's warm-up is done once and reused
        if len(landed) == 3 or proc.returncode == 0:
            break
    assert len(landed) == 3, landed
    rc, err = finish(script, out, "--resume", steps=steps)
    assert rc == 0, err[-2000:]
    got = logged(out)
    print(f"\n{script}: killed after logged steps {landed}; resumed to step {max(by_step(out))}, every number equal")
    assert sorted(by_step(out)) == list(range(1, steps + 1))
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}


# ----------------------------------------------------------------------------- NaN

def test_a_nan_stops_the_run_before_it_is_saved(tmp_path):
    out = tmp_path / "run"
    rc, err = finish("sft.py", out, "--lr", "1e30", "--warmup", "0", "--save-every", "1", steps=20, eval_every=100)
    assert rc == 1, err[-2000:]
    line = last_line(err)
    assert line.startswith("error: step ") and (" loss is nan" in line or " loss is inf" in line or
                                                "grad_norm is" in line), err[-2000:]
    bad = int(line.split()[2].rstrip(":"))
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad and f"step {max(saved)}" in line, (saved, line)


# ----------------------------------------------------------------------------- broken checkpoints

def corrupt(step_dir: pathlib.Path) -> None:
    """Every array file of a saved train state overwritten with garbage of the same size."""
    for f in step_dir.rglob("*"):
        if f.is_file() and "state" in f.parts and f.stat().st_size > 0:
            f.write_bytes(b"\x07" * f.stat().st_size)


def copy_of_full_run(script, tmp_path, full_runs) -> pathlib.Path:
    """The uninterrupted 16-step run copied: a run to break (checkpoints at steps 12, 14, 16)."""
    out = tmp_path / "run"
    shutil.copytree(full_runs(script), out)
    return out


def relogged_as_before(script, out, already: int, full_runs) -> list[int]:
    """The steps a resumed run logged again (the records after the first `already`), each of whose numbers
    is the uninterrupted run's."""
    want, again = logged(full_runs(script)), records(out)[already:]
    for r in again:
        for name, value in r.items():
            if (r["step"], name) in want:
                assert value == want[r["step"], name], (r["step"], name, value, want[r["step"], name])
    return sorted({r["step"] for r in again if "loss" in r})


@pytest.mark.parametrize("script", ["sft.py", "grpo.py"])
def test_a_broken_newest_checkpoint_falls_back_to_the_one_before(script, tmp_path, full_runs):
    out = copy_of_full_run(script, tmp_path, full_runs)
    already = len(records(out))
    corrupt(out / "checkpoints" / "16")
    rc, err = finish(script, out, "--resume")
    assert rc == 0, err[-2000:]
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warning and "step 16" in warning[0] and "step 14" in warning[0], err[-2000:]
    assert relogged_as_before(script, out, already, full_runs) == [15, 16]


def test_a_state_of_another_model_is_one_clear_line(tmp_path, full_runs):
    out = copy_of_full_run("sft.py", tmp_path, full_runs)
    rc, err = finish("sft.py", out, "--resume", "--model", "tiny-llama3")  # refused by its saved settings
    assert rc == 1
    line = last_line(err)
    assert line.startswith("error: ") and "written with --model 'tiny-qwen3'" in line and "Traceback" not in err, \
        err[-2000:]
    for step in (12, 14, 16):  # settings that claim the other model: the state itself cannot be restored
        meta = out / "checkpoints" / str(step) / "meta" / "metadata"
        saved = json.loads(meta.read_text())
        meta.write_text(json.dumps({**saved, "config": {**saved["config"], "model": "tiny-llama3"}}))
    rc, err = finish("sft.py", out, "--resume", "--model", "tiny-llama3")
    line = last_line(err)
    assert rc == 1 and line.startswith("error: ") and "cannot restore" in line and "Traceback" not in err, err[-2000:]


# ----------------------------------------------------------------------------- disk

def test_a_full_disk_during_a_save_is_one_line_and_the_earlier_checkpoints_stay(tmp_path, full_runs):
    out = copy_of_full_run("sft.py", tmp_path, full_runs)
    for step in (14, 16):  # as if stopped after step 12's save
        shutil.rmtree(out / "checkpoints" / str(step))
    kept = {p: p.read_bytes() for p in (out / "checkpoints" / "12").rglob("*") if p.is_file()}

    def small_files():  # files past 64 KiB cannot grow: writes fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
    rc, err = finish("sft.py", out, "--resume", preexec_fn=small_files)
    assert rc == 1, err[-2000:]
    line = last_line(err)
    assert line.startswith("error: could not save the train state of step 14 ") and "intact" in line, err[-2000:]
    assert {p: p.read_bytes() for p in (out / "checkpoints" / "12").rglob("*") if p.is_file()} == kept
    already = len(records(out))
    rc, err = finish("sft.py", out, "--resume")  # the disk has room again: step 12's state is whole
    assert rc == 0, err[-2000:]
    assert "resumed from step 12" in err
    assert relogged_as_before("sft.py", out, already, full_runs) == [13, 14, 15, 16]


def test_an_unwritable_out_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    rc, err = finish("sft.py", tmp_path / "a-file" / "run", steps=2)
    assert rc == 1 and last_line(err).startswith("error: ") and "a-file" in last_line(err), err[-2000:]
