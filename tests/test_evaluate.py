"""evaluate.py: pass@k is Chen et al.'s estimator (held against brute force over subsets), results.json equals what
samples.jsonl recomputes, every prompt has its n samples, pass@k rises with k on the demo's warmed-up model;
maj@n's votes; the math-verify checker; bad flags are one line."""
import itertools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of the k-subsets of n completions (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert tasks.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_majority_votes_take_the_most_frequent_answer_ties_to_the_first():
    correct = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0]], bool)
    answers = [["5", "7", "5", "7"],  # tie: "5", the first given, is right
               ["3", "3", None, "9"],  # "3" (twice) is wrong
               [None, "8", None, "8"],  # None does not vote: "8" is right
               [None, None, None, None]]  # no answer: wrong
    got = tasks.sampled_metrics(correct, answers, [1, 2, 4, 8])
    assert got["maj@4"] == pytest.approx(0.5) and got["mean@4"] == pytest.approx(5 / 16)
    assert "pass@8" not in got and got["pass@4"] == pytest.approx(0.75)


def test_math_verify_compares_answers_symbolically():
    pytest.importorskip("math_verify")
    completions = ["<think>half</think> <answer>\\frac{1}{2}</answer>", "<answer>0.4</answer>", "so 72", "x"]
    assert tasks.math_verify_reward(None, completions, ["0.5", "0.5", "#### 72", "1"]) == [1.0, 0.0, 1.0, 0.0]


def test_math_verify_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify raises ImportError
    with pytest.raises(ValueError, match="needs the math-verify package: pip install math-verify"):
        tasks.math_verify_reward(None, ["1"], ["1"])


def run_evaluate(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "XLA_FLAGS": ""})


@pytest.fixture(scope="module")
def warmed_up(tmp_path_factory) -> pathlib.Path:
    """grpo.py's demo warm-up (greedy training accuracy 0.3 on "123*4=" → "0492") and one GRPO step: its hf/."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    r = subprocess.run([sys.executable, "grpo.py", "--steps", "1", "--prompts-per-step", "4", "--num-generations", "2",
                        "--eval-examples", "64", "--eval-every", "1000", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "hf"


def test_results_are_what_the_samples_say_and_pass_at_k_rises_with_k(warmed_up, tmp_path):
    n, prompts = 8, 48
    r = run_evaluate("--ckpt", str(warmed_up), "--samples", str(n), "--k", "1,2,4,8", "--eval-examples", str(prompts),
                     "--batch-size", "20", "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt_index"] for s in samples] == [p for p in range(prompts) for _ in range(n)]
    held_out = tasks.builtin_task("*,3,1").examples("eval", prompts)
    assert [s["prompt"] for s in samples[::n]] == [row["prompt"] for row in held_out]
    task = tasks.builtin_task("*,3,1")
    assert all(s["correct"] == task.is_correct(s["prompt"], s["completion"]) for s in samples)
    correct = [sum(s["correct"] for s in samples[p * n:(p + 1) * n]) for p in range(prompts)]
    for k in (1, 2, 4, 8):
        assert results[f"pass@{k}"] == pytest.approx(np.mean([brute_pass_at_k(n, c, k) for c in correct]), abs=1e-9)
    assert results["mean@8"] == pytest.approx(np.mean([s["correct"] for s in samples]))
    assert results["settings"]["samples"] == n and results["prompts"] == prompts and 0 <= results["greedy"] <= 1
    print(f"\nwarmed-up demo: {({k: round(v, 3) for k, v in results.items() if '@' in k})}, greedy {results['greedy']}")
    assert 0 < results["pass@1"] < results["pass@2"] < results["pass@4"] < results["pass@8"]
    assert r.stdout.count("pass@") == 4  # the table


def test_bad_flags_and_an_existing_result_are_one_line(tmp_path):
    for args, message in [(["--checker", "sympy"], "--checker must be one of exact, math_verify"),
                          (["--k", "0,2"], "--k takes whole numbers >= 1"),
                          (["--samples", "0"], "--samples must be >= 1"),
                          (["--task", "/,1,1"], "bad --task '/,1,1'")]:
        r = run_evaluate(*args, "--out", str(tmp_path / "eval"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text("{}")
    r = run_evaluate("--out", str(tmp_path / "eval"))
    assert r.returncode != 0 and "already holds results.json" in r.stderr.strip().splitlines()[-1]
    assert (tmp_path / "eval" / "results.json").read_text() == "{}"


def test_grpo_logs_sampled_pass_at_k_with_eval_samples(tmp_path):
    """grpo.py --eval-samples 4: eval/pass@{1,2,4}, eval/maj@4 and eval/mean@4 beside the greedy eval/reward, through
    evaluate.py's function (tasks.sampled_eval); pass@1 is mean@n (the estimator at k = 1) and never above pass@4."""
    r = subprocess.run([sys.executable, "grpo.py", "--warmup-sft-steps", "30", "--warmup-sft-batch-size", "32",
                        "--prompts-per-step", "4", "--num-generations", "2", "--train-examples", "200",
                        "--eval-examples", "16", "--eval-samples", "4", "--steps", "2", "--eval-every", "2",
                        "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in records if "eval/reward" in m]
    assert [m["step"] for m in evals] == [0, 2]
    for m in evals:
        assert {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/maj@4", "eval/mean@4"} <= set(m)
        assert m["eval/pass@1"] == pytest.approx(m["eval/mean@4"]) and m["eval/pass@1"] <= m["eval/pass@4"]
