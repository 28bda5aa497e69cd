"""The benchmarks cannot rot unseen: each benchmark's nanotune side runs here for one tiny step (its own worker
mode, never Tunix or transformers: benchmarks/.tunix-venv is not in CI), and a driver that sees a measurement
fail exits non-zero after printing what it has."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

ONE_DEVICE = {"XLA_FLAGS": ""}  # one CPU device, as a user runs a benchmark (not the suite's eight)


def bench(script, *args, stdin=None, timeout=600):
    """benchmarks/<script> in a subprocess from the repository root, as its docstring runs it."""
    return subprocess.run([sys.executable, f"benchmarks/{script}", *map(str, args)], input=stdin, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **ONE_DEVICE})


def answer(r) -> dict:
    """A worker's JSON answer: its last stdout line, after a clean exit."""
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_steps(out: dict, steps: int):
    """One compiling step and the timed ones, each a real (positive) time, and a peak memory."""
    assert len(out["step_s"]) == steps + 1 and all(t > 0 for t in out["step_s"]), out
    assert out["peak_rss_bytes"] > 0, out


@pytest.mark.parametrize("script,keys", [("bench_distill.py", ("params", "teacher_params")),
                                         ("bench_dpo.py", ("params",))])
def test_side_by_side_worker(script, keys):
    out = answer(bench(script, "--worker=tiny", "--steps", 1))
    assert_steps(out, 1)
    assert all(out[k] > 0 for k in keys), out


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_train_worker(mode):
    out = answer(bench("bench_train.py", "--worker", f"tiny,{mode},float32", "--steps", 1))
    assert_steps(out, 1)
    assert out["trainable"] == (427136 if mode == "full" else 38912), out  # tiny-qwen3's params; rank-8 LoRA's


def test_grpo_worker():
    setting = {"prompts_per_step": 2, "num_generations": 2, "max_completion_len": 4, "num_iterations": 1,
               "beta": 0.02}
    r = bench("bench_grpo.py", "--worker", json.dumps(setting), stdin=json.dumps({"prompts": ["1+1=", "2*3="]}) + "\n")
    out = answer(r)
    assert out["seconds"] > 0 and out["lengths"] == [4], out  # EOS off: every completion has C tokens
    assert set(out["phases"]) == {"rollout", "rewards_batch", "ref_logps", "updates"}, out
    assert all(t > 0 for t in out["phases"].values()), out
    assert out["compiles"]["train_step"] >= 1, out


def test_ppo_worker():
    setting = {"prompts_per_step": 2, "max_completion_len": 4, "num_ppo_epochs": 2, "kl_coef": 0.05}
    r = bench("bench_ppo.py", "--worker", json.dumps(setting), stdin=json.dumps({"prompts": ["1+1=", "2*3="]}) + "\n")
    out = answer(r)
    assert out["seconds"] > 0 and out["lengths"] == [4], out  # EOS off: every completion has C tokens
    assert set(out["phases"]) == {"rollout", "rewards_batch", "logps_values_gae", "updates"}, out
    assert all(t > 0 for t in out["phases"].values()), out
    assert out["compiles"]["train_step"] == 1 and out["compiles"]["score"] == 1, out


@pytest.mark.parametrize("mode", ["sft", "lora", "qlora-nf4", "qlora-int8"])  # bench_lora.MODES
def test_lora_worker(mode):
    out = answer(bench("bench_lora.py", "--mode", mode, "--model", "tiny-qwen3", "--batch", 1, "--len", 16,
                       "--steps", 1))
    assert out["mode"] == mode and out["step_s"] > 0 and out["peak_rss_bytes"] > 0, out
    assert 0 < out["trainable"] and out["param_bytes"] > 0, out
    assert (out["trainable"] == 427136) == (mode == "sft"), out  # the adapters alone train, else everything


def test_engine():
    """bench_engine.py runs in-process (no worker): its whole driver, on tiny-qwen3; it checks the engine's ids
    equal generate's itself."""
    r = bench("bench_engine.py", "--models", "tiny-qwen3", "--slots", 2, "--requests", 4, "--short", 2, "--long", 4,
              "--chunk", 4, "--repeats", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("| tiny-qwen3 | 2 |"))
    static_s, engine_s = (float(x) for x in row.split("|")[3:5])
    assert static_s >= 0 and engine_s >= 0 and row.rstrip().endswith("x |"), row


def test_sample_worker(gemma3_dir):
    request = {"prompt": "The capital of France is", "batch": 1, "max_new_tokens": 2}
    r = bench("bench_sample.py", "--ckpt", gemma3_dir, "--worker", "nanotune", stdin=json.dumps(request) + "\n")
    out = answer(r)
    assert out["seconds"] > 0 and len(out["texts"]) == 1 and out["texts"][0].strip(), out


def test_serve(gemma3_dir):
    """bench_serve.py's whole driver (serve.py and sample.generate, no other system): 1 client, 2 tokens."""
    r = bench("bench_serve.py", "--ckpt", gemma3_dir, "--clients", 1, "--max-tokens", 2, "--repeats", 1,
              "--slots", 1, "--max-prompt-len", 64, "--max-completion-len", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))
    assert row["clients"] == 1 and row["served_tok_s"] > 0 and row["generate_tok_s"] > 0, row
    assert row["ttft_s_median"] > 0 and row["latency_s_median"] > 0, row
    assert any(line.startswith("| 1 |") for line in r.stdout.splitlines()), r.stdout


def test_driver_exits_nonzero_after_a_failed_measurement():
    """An unknown setting makes the nanotune worker fail: the driver still measures and prints the setting that
    works, then names the failure and exits 1."""
    r = bench("bench_distill.py", "--systems", "nanotune", "--settings", "tiny,nosuchsetting", "--repeats", 1,
              "--steps", 1)
    assert r.returncode == 1, (r.stdout, r.stderr[-3000:])
    assert any(line.startswith("| ") and "| nanotune |" in line for line in r.stdout.splitlines()), r.stdout
    assert "nanotune nosuchsetting: " in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == "1 measurement(s) failed: nanotune nosuchsetting", r.stderr[-3000:]


def test_memory_timeline_names_each_phase_and_the_whole_run(tmp_path):
    """memory_timeline.py around a tiny sft.py run: every phase the run went through has a row (loading,
    evaluation, the train-state save, the export, the steps), the whole run's peak is the largest, and the
    samples it writes are (seconds, bytes, phase) in time order; a script it does not know is one line."""
    r = bench("memory_timeline.py", "--json", tmp_path / "t.json", "sft.py", "--steps", 2, "--batch-size", 8,
              "--train-examples", 64, "--eval-examples", 8, "--eval-every", 2, "--save-every", 2,
              "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| phase") and not line.startswith("| ---")}
    assert {"load", "eval", "save", "export", "train", "whole run"} <= rows.keys(), r.stdout
    assert rows["whole run"] == max(rows.values()) and rows["train"] > 0.1, rows  # GiB: the model is in memory
    samples = json.loads((tmp_path / "t.json").read_text())
    assert len(samples) > 10 and all(a[0] <= b[0] for a, b in zip(samples, samples[1:]))
    assert {phase for _, _, phase in samples} >= {"load", "eval", "save", "export", "train"}
    bad = bench("memory_timeline.py", "nosuch.py")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: nosuch.py: not one of the training scripts (sft.py, lora.py, dpo.py, grpo.py, distill.py)"]


def test_moe_driver():
    """bench_moe.py's driver without Tunix, at toy sizes: the layer's grouped and dense paths (their y and
    gradients compared by the driver, which exits 1 past 1e-4) and tiny-qwen3-moe's SFT step beside its dense
    twin, one process each; both tables come out."""
    r = bench("bench_moe.py", "--layer-settings", "E4k2", "--layer-shape", "64x32x16", "--layer-systems",
              "grouped,dense", "--step-settings", "2x16", "--step-systems", "moe,dense", "--repeats", 1, "--steps", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    layer = {row[2].strip(): row for row in rows if row[1].strip() == "E 4, k 2"}
    assert set(layer) == {"grouped", "dense"} and layer["grouped"][8].strip() == "reference", r.stdout
    assert float(layer["dense"][8]) <= 1e-5 and float(layer["dense"][4]) > 0, r.stdout  # same function; tokens/s
    step = {row[2].strip(): row for row in rows if row[1].strip() == "2x16"}
    assert set(step) == {"moe", "dense"} and step["moe"][7].strip().endswith("x**"), r.stdout
