"""grpo.py: advantages and losses are TRL's, the learner scores exactly what the sampler drew,
rewards never raise, the default run learns, it resumes exactly, it shards, and bad input ends
in one clear line."""
import builtins
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import grpo
import model as model_lib
import rl
import sample
import tasks
import tokenizer
from model import CONFIGS, Transformer

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A few seconds per run: a short warm-up so that rewards differ within groups, small batches.
SMALL = ["--warmup-sft-steps", "30", "--warmup-sft-batch-size", "32", "--prompts-per-step", "8",
         "--num-generations", "4", "--eval-examples", "16", "--eval-every", "1000", "--train-examples", "2000"]


def run_grpo(*args, env=None, timeout=600):
    """grpo.py in a subprocess on one CPU device, as a user runs it."""
    env = {**os.environ, "XLA_FLAGS": "", **(env or {})}
    return subprocess.run([sys.executable, "grpo.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def by_step(out, key) -> dict[int, float]:
    """step → value, the last logged one for a step (a resumed run logs some steps twice)."""
    return {m["step"]: m[key] for m in metrics(out) if key in m}


@pytest.mark.slow
def test_dapo_recipe_learns_and_trains_only_groups_that_teach(tmp_path):
    """DAPO: clip-higher, token-level averaging, dynamic sampling and the soft overlong punishment, 150 steps of
    the README's recipe: eval/reward rises past the bar, and no trained group has equal rewards."""
    start = time.time()
    r = run_grpo("--loss-type", "dapo", "--epsilon-high", "0.28", "--dynamic-sampling", "--soft-punish-cache", "1",
                 "--steps", "150", "--eval-every", "150", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    evals = by_step(tmp_path / "run", "eval/reward")
    print(f"\ndapo: eval/reward {evals[0]} -> {evals[max(evals)]} in {time.time() - start:.0f} s")
    assert evals[max(evals)] - evals[0] >= 0.15, evals  # CI measured 0.34 -> 0.54 (300 steps: 0.69)
    logged = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert logged and all(m["frac_reward_zero_std"] == 0 and m["kept_groups"] == 64 for m in logged)


@pytest.mark.slow
def test_the_default_settings_raise_eval_reward(tmp_path):
    """`python grpo.py` shortened to 250 of its 800 steps (the suite's time; a demo has to pass its bar, not
    converge): the warm-up, then GRPO raises greedy held-out accuracy by at least 0.12 (measured on 2 cores:
    0.30 -> 0.48 at step 250, 0.33 at 50, 0.40 at 100; the full default run ends near 0.65)."""
    start = time.time()
    r = run_grpo("--steps", "250", "--eval-every", "250", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warm-up: supervised steps until" in r.stderr and "warm-up done" in r.stderr
    evals = by_step(tmp_path / "run", "eval/reward")
    first, last = evals[0], evals[max(evals)]
    print(f"\ndefault grpo, 250 steps: eval/reward {first} -> {last} in {time.time() - start:.0f} s")
    assert 0.1 < first < 0.7  # the warm-up leaves room to learn
    assert max(evals) == 250 and last - first >= 0.12, evals
    assert (tmp_path / "run" / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_the_real_gemma3_doubles_its_accuracy_on_the_sequence_task(gemma3_dir, tmp_path):
    """The README's real-model recipe (Real models) in 16 steps: the real Gemma 3 270M's greedy accuracy on 256
    held-out progressions at least doubles and rises by 0.2 (measured: 0.195 -> 0.492 in 144 s on 2 cores; 0.418
    at step 10 of the README's 50). Evaluated before and after only: each evaluation decodes 256 prompts."""
    start = time.time()
    r = run_grpo("--ckpt", str(gemma3_dir), "--task", "sequence", "--max-completion-len", "4", "--prompts-per-step",
                 "4", "--lr", "3e-6", "--temperature", "1.0", "--beta", "0", "--dynamic-sampling",
                 "--max-num-gen-batches", "4", "--steps", "16", "--eval-every", "16", "--eval-examples", "256",
                 "--log-every", "4", "--save-every", "1000", "--out", str(tmp_path / "run"), timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    evals = by_step(tmp_path / "run", "eval/reward")
    first, last = evals[0], evals[max(evals)]
    timing = {k: v for k, v in metrics(tmp_path / "run")[-1].items() if k.startswith("seconds_per_step/")}
    print(f"\nreal gemma3 on sequences: eval/reward {evals} in {time.time() - start:.0f} s; a step: {timing}")
    assert last >= 2 * first and last - first >= 0.2, evals
    assert set(timing) == {"seconds_per_step/rollout", "seconds_per_step/update"} and all(v > 0 for v in timing.values())


def test_the_sequence_task_and_its_reward():
    task = tasks.builtin_task("sequence")
    train, evals = task.examples("train", 5000), task.examples("eval", 5000)
    seen, held_out = {r["prompt"] for r in train}, {r["prompt"] for r in evals}
    assert not seen & held_out and len(seen | held_out) == 1800 and 0.2 < len(held_out) / 1800 < 0.3
    assert len({r["prompt"] for r in task.examples("eval", 256)}) == 256  # no repeats below the split's size
    assert task.answer("9, 17, 25, 33,") == "41" and all(r["completion"] == " " + task.answer(r["prompt"])
                                                          for r in train[:100])
    accuracy, = task.rewards()
    completions = [" 41", " 41, 49", "41", " 410", " 4 1", " 041", "٤١", "<answer>41</answer>"] + ADVERSARIAL
    want = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0] + [0.0] * len(ADVERSARIAL)
    assert accuracy(["9, 17, 25, 33,"] * len(completions), completions) == want
    rng = np.random.default_rng(0)
    assert all(not task.is_correct(r["prompt"], task.wrong_answer(r["prompt"], rng)) for r in evals[:200])


def test_a_named_task_is_the_data_of_a_pretrained_model_too():
    named, default = grpo.Config(ckpt="runs/x/hf", task="sequence"), grpo.Config(ckpt="runs/x/hf")
    assert (named.data, named.system_prompt, named.task) == ("", "", "sequence")
    assert [f.__name__ for f in rl.reward_functions(named)] == ["accuracy_reward"]
    assert rl.reward_functions(named)[0](["1, 2, 3, 4,"], [" 5"]) == [1.0]  # the task's, not GSM8K's
    assert (default.data, default.system_prompt, default.task) == ("openai/gsm8k:main", tasks.REASONING_PROMPT, "*,3,1")
    assert grpo.Config().task == "*,3,1" and grpo.Config().data is None


# ----------------------------------------------------------------------------- advantages and losses

def test_advantages_match_trl_for_every_scaling():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 1.0, 0.0, 1.0])
    groups = [list(rewards[i:i + 4]) for i in range(0, 12, 4)]
    for scale in ("group", "batch", "none"):
        adv, std = grpo.group_advantages(rewards, 4, scale)
        want_adv, want_std = [], []
        for g in groups:
            s = statistics.stdev(rewards) if scale == "batch" else statistics.stdev(g)  # unbiased, as torch.std
            for r in g:
                centred = r - statistics.mean(g)  # always the group's mean
                want_adv.append(centred if scale == "none" else centred / (s + 1e-4))
                want_std.append(s)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(std, want_std, rtol=1e-12)
    adv, std = grpo.group_advantages(rewards, 4, "group")
    assert np.all(adv[4:8] == 0) and np.mean(np.isclose(std, 0)) == 1 / 3  # one group of three has no signal
    assert abs(adv[:4].sum()) < 1e-12  # centred: the reason the logged loss is ~0 at mu = 1


def losses(logp, old, ref, adv, eps_low, eps_high, beta, **kw):
    """grpo.token_losses with π_sampler = π_old (no correction to make), every token valid: loss, k3 KL, clipped."""
    cfg = grpo.Config(epsilon=eps_low, epsilon_high=eps_high, beta=beta, warmup_sft_steps=0, **kw)
    ones = jnp.ones(jnp.shape(logp))
    old = jnp.asarray(old)
    loss, terms = grpo.token_losses(jnp.asarray(logp), old, old, ref, jnp.asarray(adv), ones, 0 * ones, cfg)
    return loss, terms["kl"], terms["clip_ratio"]


def trl_loss(per_token, mask, loss_type, max_len):
    """TRL GRPOTrainer._compute_loss on each micro-batch, divided by the accumulation steps (dapo:
    by the rollout batch's completion tokens), summed over micro-batches."""
    A, b, _ = mask.shape
    total = 0.0
    for pt, m in zip(per_token, mask):
        if loss_type == "grpo":
            total += np.mean([(pt[i] * m[i]).sum() / max(m[i].sum(), 1.0) for i in range(b)]) / A
        elif loss_type == "bnpo":
            total += (pt * m).sum() / max(m.sum(), 1.0) / A
        elif loss_type == "dr_grpo":
            total += (pt * m).sum() / (b * max_len) / A
        else:
            total += (pt * m).sum() / mask.sum()
    return total


def random_rollout(seed=0, shape=(2, 3, 5)):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.9, shape)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, shape)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, shape)).astype(np.float32)
    adv = rng.normal(0, 1, shape[:2]).astype(np.float32)
    lengths = np.array([[5, 2, 3], [1, 1, 5]])  # 10 and 7 tokens
    mask = (np.arange(shape[2]) < lengths[..., None]).astype(np.float32)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])  # cispo and sapo: their own test
def test_every_loss_type_is_trls_aggregation(loss_type):
    logp, old, ref, adv, mask = random_rollout()
    eps_low, eps_high, beta = 0.2, 0.28, 0.04
    ratio = np.exp(logp.astype(np.float64) - old)
    a = adv[..., None]
    k3 = np.exp(ref - logp.astype(np.float64)) - (ref - logp) - 1
    per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a) + beta * k3
    want = trl_loss(per_token, mask, loss_type, max_len=8)
    loss, kl, _ = losses(logp, old, ref, adv, eps_low, eps_high, beta)
    np.testing.assert_allclose(kl, k3, rtol=1e-5, atol=1e-6)
    got = float(jnp.sum(loss * grpo.loss_weights(mask, loss_type, 8)))
    assert abs(got - want) < 1e-6 * max(1.0, abs(want)), (got, want)
    if loss_type in ("bnpo", "dapo"):  # they differ only when micro-batches hold different token counts
        other = trl_loss(per_token, mask, "dapo" if loss_type == "bnpo" else "bnpo", 8)
        assert abs(other - want) > 1e-4


def test_clipped_tokens_get_no_gradient():
    eps = 0.2
    old = np.zeros(8, np.float32)
    logp = np.log(np.array([1.5, 1.5, 0.5, 0.5, 1.1, 0.9, 1.3, 0.7], np.float32))  # ratios, old = 0
    adv = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 2.0, -2.0], np.float32)
    clipped_want = np.array([1, 0, 0, 1, 0, 0, 1, 1], bool)  # ratio past the range on the side A pushes

    def loss(lp):
        per_token, _, clipped = losses(lp[:, None], old[:, None], None, adv, eps, eps, 0.0)
        return jnp.sum(per_token), clipped[:, 0]
    (_, clipped), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp))
    np.testing.assert_array_equal(clipped, clipped_want)
    ratio = np.exp(logp)
    np.testing.assert_allclose(grad, np.where(clipped_want, 0.0, -ratio * adv), rtol=1e-6)


def test_k3_kl_is_nonnegative_and_its_expectation_is_the_kl():
    rng = np.random.default_rng(0)
    p_logits, q_logits = rng.normal(0, 1.5, 50), rng.normal(0, 1.5, 50)
    logp, logq = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
    exact = float(jnp.sum(jnp.exp(logp) * (logp - logq)))  # KL(pi || ref)
    _, k3, _ = losses(logp[None], logp[None], logq[None], jnp.zeros(1), 0.2, 0.2, 1.0)
    k3 = np.asarray(k3[0], np.float64)
    assert np.all(k3 >= 0) and exact > 0.1
    assert abs(np.sum(np.exp(logp) * k3) - exact) < 1e-5  # E_pi[k3] = KL(pi || ref): unbiased
    p = np.exp(np.asarray(logp, np.float64))
    samples = rng.choice(50, 40_000, p=p / p.sum())  # tokens drawn from the policy
    assert abs(k3[samples].mean() - exact) < 4 * k3[samples].std() / np.sqrt(len(samples))


# ----------------------------------------------------------------------------- the variants, against their references

def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def trl_per_token(logp, old, adv, mask, loss_type, level, eps, eps_high, delta=None, tau_pos=1.0, tau_neg=1.05):
    """TRL's GRPOTrainer._compute_loss (f2cd577) in numpy, its policy term before aggregation: the importance
    weights at `level` (sequence_token: GSPO-token, trl.experimental.gspo_token, the same values as sequence),
    then cispo / sapo / the clip with `delta`."""
    log_ratio = logp - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0))[..., None]
    coef_1, a = np.exp(log_w), adv[..., None]
    if loss_type == "cispo":
        return -np.minimum(coef_1, eps_high) * a * logp
    if loss_type == "sapo":
        temps = np.where(a > 0, tau_pos, tau_neg)
        return -(np_sigmoid(temps * (coef_1 - 1)) * 4 / temps) * a
    coef_2 = np.clip(coef_1, 1 - eps, 1 + eps_high)
    if delta is not None:
        coef_1 = np.minimum(coef_1, delta)
    return -np.minimum(coef_1 * a, coef_2 * a)


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("loss_type,delta", [("grpo", None), ("grpo", 3.0), ("dapo", 1.5), ("cispo", None),
                                             ("sapo", None)])
def test_every_policy_loss_is_trls_on_a_grid_of_ratios_and_advantages(loss_type, delta, level):
    ratios = np.exp(np.linspace(-1.5, 1.5, 13))  # ρ from 0.22 to 4.5, 1 in the middle
    adv = np.array([-2.0, -0.3, 0.0, 0.4, 1.5])
    logp = np.log(np.linspace(0.05, 0.95, 13))[None].repeat(5, 0)  # [5 sequences, 13 tokens]
    old = logp - np.log(ratios)[None]
    mask = np.ones_like(logp)
    mask[1, 9:] = 0  # one shorter sequence
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    cfg = grpo.Config(loss_type=loss_type, epsilon_high=eps_high, delta=delta, importance_sampling_level=level,
                      importance_sampling_correction=False, beta=0.0, warmup_sft_steps=0)
    got, terms = grpo.token_losses(jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
                                   jnp.asarray(old, jnp.float32), None, jnp.asarray(adv, jnp.float32),
                                   jnp.asarray(mask, jnp.float32), jnp.zeros(logp.shape), cfg)
    want = trl_per_token(logp, old, adv, mask, loss_type, level, 0.2, eps_high, delta)
    np.testing.assert_allclose(np.broadcast_to(got, logp.shape) * mask, np.broadcast_to(want, logp.shape) * mask,
                               rtol=2e-5, atol=2e-6)
    if level != "token":  # GSPO-token: GSPO's values, and with one advantage a sequence, GSPO's gradient
        def objective(lp, lvl):
            c = dataclasses.replace(cfg, importance_sampling_level=lvl)
            loss, _ = grpo.token_losses(lp, jnp.asarray(old, jnp.float32), jnp.asarray(old, jnp.float32), None,
                                        jnp.asarray(adv, jnp.float32), jnp.asarray(mask, jnp.float32),
                                        jnp.zeros(logp.shape), c)
            return jnp.sum(jnp.broadcast_to(loss, lp.shape) * mask / mask.sum(-1, keepdims=True))  # grpo averaging
        g_seq, g_tok = (jax.grad(objective)(jnp.asarray(logp, jnp.float32), lvl) for lvl in ("sequence", "sequence_token"))
        np.testing.assert_allclose(g_tok, g_seq, rtol=1e-5, atol=1e-6)


def test_cispo_and_sapo_average_as_trl_does():
    assert grpo.LOSS_TYPES["cispo"][1] == "dapo" and grpo.LOSS_TYPES["sapo"][1] == "grpo"
    assert grpo.Config(loss_type="cispo", warmup_sft_steps=0).epsilon_high == 5.0  # ScaleRL's cap, TRL's docs


@pytest.mark.parametrize("mode", grpo.IS_MODES)
@pytest.mark.parametrize("low", [None, 0.6])
def test_the_sampler_correction_is_trls_in_every_mode(mode, low):
    rng = np.random.default_rng(4)
    old, sampler = rng.normal(-2, 0.5, (6, 7)), rng.normal(-2, 0.5, (6, 7))
    mask = (np.arange(7) < rng.integers(2, 8, 6)[:, None]).astype(np.float64)
    cfg = grpo.Config(importance_sampling_mode=mode, importance_sampling_min=low, importance_sampling_max=3.0,
                      warmup_sft_steps=0)
    got = np.asarray(grpo.sampler_weights(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask), cfg))
    diff = (old - sampler) * mask  # TRL l.2581-2620, in numpy
    ratio = np.exp(diff.sum(-1, keepdims=True) if mode.startswith("sequence") else diff)
    lo, hi = (-np.inf if low is None else low), 3.0
    want = np.clip(ratio, low, hi) if mode.endswith("truncate") else np.where((ratio < lo) | (ratio > hi), 0.0, ratio)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.shape == ((6, 1) if mode.startswith("sequence") else (6, 7))
    if mode == "sequence_mask":
        assert 0 < np.mean(want == 0) < 1  # the grid has sequences on both sides


def test_the_correction_is_1_when_sampler_and_learner_agree_and_follows_a_forced_mismatch():
    """f32: the sampler's log-probs are the learner's (to ~1e-6): w = 1 to 1e-5 and the loss is the uncorrected
    one to 1e-6. Sampled at temperature 1 and scored at 0.9, w follows exp(Σ (log π_0.9 − log π_1)) exactly."""
    model = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(5))
    batch, _ = sampled_batch(model, 1.0, G=4)
    N = batch["mask"].shape[0]
    adv = jnp.asarray(np.random.default_rng(1).normal(size=N), jnp.float32)
    m = jnp.asarray(batch["mask"])
    for temperature in (1.0, 0.9):
        logp, entropy, _ = rl.policy_logps(model, batch, temperature)
        cfg = grpo.Config(temperature=temperature, warmup_sft_steps=0)  # sequence_mask, [None, 3]
        corrected, terms = grpo.token_losses(logp, jax.lax.stop_gradient(logp), jnp.asarray(batch["sampler_logp"]),
                                             None, adv, m, entropy, cfg)
        plain, _ = grpo.token_losses(logp, logp, logp, None, adv, m, entropy,
                                     dataclasses.replace(cfg, importance_sampling_correction=False))
        w = np.asarray(terms["is_weight"])[:, 0]
        delta = np.sum((np.asarray(logp, np.float64) - batch["sampler_logp"]) * batch["mask"], -1)
        if temperature == 1.0:  # w to 1e-5; the loss (grpo's average of the token terms) to 1e-6
            np.testing.assert_allclose(w, 1.0, atol=1e-5)
            weights = grpo.loss_weights(np.asarray(m)[None], "grpo", 6)[0]
            assert abs(float(jnp.sum((corrected - plain) * weights))) < 1e-6
        else:
            assert np.abs(delta).max() > 0.05  # a real mismatch
            np.testing.assert_allclose(w, np.where(np.exp(delta) > 3.0, 0.0, np.exp(delta)), rtol=1e-5)


def test_the_entropy_and_off_policy_masks_are_trls():
    rng = np.random.default_rng(6)
    logp = rng.normal(-2, 0.6, (5, 8))
    sampler = logp + np.array([0.5, -0.5, 0.5, 0.0, 0.05])[:, None] + rng.normal(0, 0.01, (5, 8))  # drifts
    entropy, adv = rng.uniform(0, 3, (5, 8)), np.array([-1.0, -0.5, 0.5, 1.0, -2.0])
    mask = (np.arange(8) < np.array([8, 3, 6, 8, 5])[:, None]).astype(np.float64)
    cfg = grpo.Config(top_entropy_quantile=0.2, off_policy_mask_threshold=0.1, importance_sampling_correction=False,
                      beta=0.0, warmup_sft_steps=0)
    args = [jnp.asarray(x, jnp.float32) for x in (logp, logp, sampler)]
    got, _ = grpo.token_losses(*args, None, jnp.asarray(adv, jnp.float32), jnp.asarray(mask, jnp.float32),
                               jnp.asarray(entropy, jnp.float32), cfg)
    tau = np.quantile(entropy[mask > 0], 1 - 0.2)  # TRL's get_high_entropy_mask: torch.quantile, linear
    kl = ((sampler - logp) * mask).sum(-1, keepdims=True) / mask.sum(-1, keepdims=True)  # TRL's get_off_policy_mask
    keep = (adv[:, None] >= 0) | (kl <= 0.1)
    want = -adv[:, None] * (entropy >= tau) * keep  # ρ = 1: the clipped term is −A
    np.testing.assert_allclose(np.asarray(got) * mask, want * mask, rtol=1e-6, atol=1e-7)
    assert 0 < np.mean(~keep) < 1 and 0.1 < np.mean((entropy >= tau)[mask > 0]) < 0.3


def test_the_advantage_estimators_are_verls_and_trls():
    rng = np.random.default_rng(7)
    G, per_func = 4, rng.integers(0, 3, (12, 2)).astype(np.float64)
    weights, lengths = np.array([1.0, 0.5]), rng.integers(1, 9, 12)
    r = per_func @ weights
    cfg = grpo.Config(advantage_estimator="rloo", warmup_sft_steps=0, num_generations=G)
    got, _ = grpo.advantages(per_func, weights, lengths, cfg)
    want = [r[i] - (r[g:g + G].sum() - r[i]) / (G - 1) for g in range(0, 12, G) for i in range(g, g + G)]
    np.testing.assert_allclose(got, want, rtol=1e-12)  # verl's compute_rloo_outcome_advantage
    got, _ = grpo.advantages(per_func, weights, lengths, dataclasses.replace(cfg, advantage_estimator=
                                                                             "reinforce_plus_plus_baseline"))
    scores = np.array([r[i] - r[i // G * G:i // G * G + G].mean() for i in range(12)])  # verl, then masked_whiten
    tokens = np.repeat(scores, lengths)
    mean, var = tokens.mean(), tokens.var() * len(tokens) / (len(tokens) - 1)
    np.testing.assert_allclose(got, (scores - mean) / np.sqrt(var + 1e-8), rtol=1e-10)
    got, _ = grpo.advantages(per_func, weights, lengths, dataclasses.replace(
        cfg, advantage_estimator="grpo", multi_objective_aggregation="normalize_then_sum"))
    grouped = per_func.reshape(-1, G, 2)  # TRL's normalize_then_sum
    reward_k = ((grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-4))
    total = reward_k.reshape(-1, 2) @ weights
    np.testing.assert_allclose(got, (total - total.mean()) / (total.std(ddof=1) + 1e-4), rtol=1e-10)


def test_soft_overlong_punishment_is_dapos_in_tokens():
    f = tasks.soft_overlong_punishment(100, 20)  # TRL's docstring example: 90 tokens of 100 with a cache of 20
    ids = [[1] * n for n in (10, 80, 81, 90, 100, 101)]
    assert f(["p"] * 6, ["x"] * 6, completion_ids=ids) == [0.0, 0.0, -0.05, -0.5, -1.0, -1.0]
    assert f.__name__ == "soft_overlong_punishment"
    assert rl.reward_functions(grpo.Config(soft_punish_cache=2, warmup_sft_steps=0))[-1].__name__ == \
        "soft_overlong_punishment"


def test_several_steps_per_generation_keep_the_sampling_policy_and_score_it_once():
    """--steps-per-generation k: one pass of π_old over the k slices before the first update, all k (x μ)
    updates against it; k = μ = 1: no such pass (the update's own forward is π_old)."""
    graphdef, params, frozen, batch, tx, step, logps = step_inputs(0.0)
    theta0, calls, seen = np.asarray(logps(params, batch)), [], []

    def counted(p, f, b):  # grpo.learner's logps(params, frozen, batch)
        calls.append(1)
        return logps(p, b)

    def spy(params, opt_state, frozen, b):
        seen.append(np.asarray(b["old_logp"]))
        return step(params, opt_state, frozen, b)
    half = [{k: v[:, :3] for k, v in batch.items()}, {k: v[:, 3:] for k, v in batch.items()}]  # two slices
    cfg = grpo.Config(beta=0.0, temperature=0.8, max_completion_len=6, num_iterations=2, steps_per_generation=2)
    grpo.policy_updates(spy, counted, params, tx.init(params), frozen, half, cfg)
    assert len(calls) == 2 and len(seen) == 4
    for i, old in enumerate(seen):
        np.testing.assert_allclose(old, theta0[:, :3] if i % 2 == 0 else theta0[:, 3:], atol=1e-5)  # other shapes
    calls.clear()
    grpo.policy_updates(step, counted, params, tx.init(params), frozen, [batch],
                        dataclasses.replace(cfg, num_iterations=1, steps_per_generation=1))
    assert not calls


def test_no_enable_thinking_reaches_qwen3s_template():
    import data
    tok = tokenizer.ByteTokenizer()
    turn = [{"role": "user", "content": "2+2?"}]
    on, off = (tok.decode(data.encode_prompt(turn, tok, "qwen3", 512, thinking)) for thinking in (True, False))
    assert off == on + "<think>\n\n</think>\n\n" and "<think>" not in on
    assert data.encode_prompt(turn, tok, "gemma3", 512, False) == data.encode_prompt(turn, tok, "gemma3", 512)


VARIANTS = [  # every new flag value, in five tiny runs
    ["--loss-type", "cispo", "--importance-sampling-level", "sequence_token", "--importance-sampling-mode",
     "token_truncate", "--log-completions-every", "1", "--no-enable-thinking"],
    ["--loss-type", "sapo", "--steps-per-generation", "2", "--num-iterations", "2", "--importance-sampling-mode",
     "token_mask", "--importance-sampling-min", "0.5"],
    ["--importance-sampling-level", "sequence", "--delta", "4", "--advantage-estimator", "rloo",
     "--importance-sampling-mode", "sequence_truncate"],
    ["--advantage-estimator", "reinforce_plus_plus_baseline", "--top-entropy-quantile", "0.2",
     "--off-policy-mask-threshold", "0.5", "--no-importance-sampling-correction"],
    ["--loss-type", "dapo", "--epsilon-high", "0.28", "--dynamic-sampling", "--soft-punish-cache", "1",
     "--multi-objective-aggregation", "normalize_then_sum"],
]


@pytest.mark.parametrize("args", VARIANTS)
def test_every_variant_runs_three_steps(tmp_path, args):
    warm = "20" if "--dynamic-sampling" in args else "0"  # groups with different rewards to keep
    r = run_grpo("--warmup-sft-steps", warm, "--warmup-sft-batch-size", "32", "--prompts-per-step", "4",
                 "--num-generations", "4", "--train-examples", "200", "--eval-examples", "8", "--steps", "3",
                 "--eval-every", "1000", "--log-every", "1", *args, "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    records = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in records)
    if "--dynamic-sampling" in args:
        assert all(m["frac_reward_zero_std"] == 0 and m["num_gen_batches"] >= 1 for m in records)
        assert "rewards/soft_overlong_punishment" in records[0]
    if "--log-completions-every" in args:
        rows = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
        assert len(rows) == 3 * 8 and {"prompt", "completion", "reward", "advantage", "accuracy_reward"} <= set(rows[0])
    if "--no-importance-sampling-correction" not in args:
        assert 0 < records[0]["sampling/importance_sampling_ratio/min"] <= 1 <= \
            records[0]["sampling/importance_sampling_ratio/max"] < 1.001  # f32 sampler and learner agree


def test_dynamic_sampling_and_several_steps_per_generation_resume_exactly(tmp_path):
    """The data position advances by every prompt batch drawn, and the shuffle and samples derive from the step:
    a run resumed from step 2 logs steps 3 and 4 exactly as the uninterrupted run did. Rollouts in 4 slots of
    the decode engine (the static batch's resume is test_faults')."""
    args = ["--warmup-sft-steps", "20", "--warmup-sft-batch-size", "32", "--prompts-per-step", "4",
            "--num-generations", "4", "--train-examples", "200", "--eval-examples", "8", "--eval-every", "1000",
            "--dynamic-sampling", "--steps-per-generation", "2", "--num-iterations", "2", "--rollout-slots", "4"]
    assert resumed_from_step_2(args, tmp_path)[4]["num_gen_batches"] >= 1


def resumed_from_step_2(args, tmp_path) -> dict[int, dict]:
    """Runs 4 steps (a checkpoint every 2), resumes a copy from step 2 and holds its steps 3 and 4 equal to the
    uninterrupted run's, every logged number but the timings. → the uninterrupted run's records by step."""
    full, again = tmp_path / "full", tmp_path / "again"
    r = run_grpo(*args, "--steps", "4", "--log-every", "1", "--save-every", "2", "--out", str(full))
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copytree(full, again)
    shutil.rmtree(again / "checkpoints" / "4")
    r = run_grpo(*args, "--steps", "4", "--log-every", "1", "--save-every", "2", "--out", str(again), "--resume")
    assert r.returncode == 0 and "resumed from step 2" in r.stderr, r.stderr[-2000:]
    want = {m["step"]: m for m in metrics(full) if "loss" in m}
    got = [m for m in metrics(again) if "loss" in m][-2:]
    assert [m["step"] for m in got] == [3, 4]
    for m in got:
        assert {k: v for k, v in m.items() if "seconds" not in k} == \
            {k: v for k, v in want[m["step"]].items() if "seconds" not in k}
    return want


# ----------------------------------------------------------------------------- the learner's log-probs

PROMPTS = ["12*3=", "7*8=", "123*4=", "hello"]
EOS = tuple(range(0, 259, 6))  # many end tokens: a random model stops at ragged lengths


def sampled_batch(model, temperature, G=3, max_new=6, mask_truncated=False, seed=0):
    tok = tokenizer.ByteTokenizer()
    ids = [tok.encode(p) for p in PROMPTS for _ in range(G)]
    completions, logps = sample.generate(model, ids, max_new_tokens=max_new, temperature=temperature, seed=seed,
                                         eos_ids=EOS, return_logprobs=True)
    N = len(ids)
    cfg = grpo.Config(max_completion_len=max_new, temperature=temperature, mask_truncated_completions=mask_truncated,
                      prompts_per_step=len(PROMPTS), num_generations=G)
    r = grpo.Rollout([{}] * N, ids, completions, logps, [[1] * len(c) for c in completions], np.zeros((N, 2)),
                     np.zeros((N, 1)), np.zeros(N), np.zeros(N), np.zeros(N))
    batch = grpo.step_batches(r, EOS, tok.pad_id, cfg, None, 0)[0]  # one step, one micro-batch: [1, N, ...]
    return {k: np.asarray(v[0]) for k, v in batch.items() if k not in ("weights", "advantages")}, completions


@pytest.mark.parametrize("preset,temperature", [("tiny-qwen3", 1.0), ("tiny-gemma3", 0.6), ("tiny-qwen3-moe", 1.0)])
def test_sampled_logprobs_are_the_learners(preset, temperature):
    """The sampler's log-probs are the learner's (a MoE model's: both route every token alike, to 1e-5 in f32)."""
    model = Transformer(CONFIGS[preset], nnx.Rngs(1))
    batch, completions = sampled_batch(model, temperature)
    lengths = [len(c) for c in completions]
    assert len(set(lengths)) > 2 and batch["mask"].sum() == sum(lengths)
    logp, entropy, _ = jax.jit(rl.policy_logps, static_argnums=2)(model, batch, temperature)
    m = batch["mask"] > 0
    np.testing.assert_allclose(np.asarray(logp)[m], batch["sampler_logp"][m], atol=1e-5)
    assert np.all(np.asarray(entropy)[m] > 0)
    assert np.isclose(float(rl.policy_logps(model, batch, 1.0)[0][m].sum()), batch["sampler_logp"][m].sum(),
                      atol=1e-3) == (temperature == 1.0)  # the temperature matters


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-gemma3", "tiny-qwen3-moe"])
def test_a_groups_shared_prompt_gives_the_same_logps_and_gradients(preset):
    """group=G runs each prompt once into a KV cache for its G completions: same log-probs, entropy, router aux
    loss and parameter gradients as running every row's prompt (unrolled layers and the scan alike)."""
    model = Transformer(CONFIGS[preset], nnx.Rngs(1))
    batch, _ = sampled_batch(model, 1.0, G=3)
    graphdef, params = nnx.split(model)
    for big in (False, True):  # pretend the model is large: the scanned forward
        with mock.patch.object(model_lib, "unrolled_if_small", (lambda m: None) if big else model_lib.unrolled_if_small):
            def objective(p, group):
                logp, entropy, aux_loss = rl.policy_logps(nnx.merge(graphdef, p), batch, 1.0, group)
                return jnp.sum((logp + entropy) * batch["mask"]) + aux_loss, (logp, entropy, aux_loss)
            (_, (logp1, ent1, aux1)), g1 = jax.value_and_grad(objective, has_aux=True)(params, 1)
            (_, (logp3, ent3, aux3)), g3 = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)(params, 3)
            assert abs(float(aux3) - float(aux1)) <= 1e-6 and (float(aux1) > 1.0) == ("moe" in preset)
            m = batch["mask"] > 0
            np.testing.assert_allclose(np.asarray(logp3)[m], np.asarray(logp1)[m], atol=1e-5)
            np.testing.assert_allclose(np.asarray(ent3)[m], np.asarray(ent1)[m], atol=1e-5)
            for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g3)):
                np.testing.assert_allclose(b, a, atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-7)


def test_mask_truncated_completions_drops_rows_without_eos():
    model = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(1))
    batch, completions = sampled_batch(model, 1.0, mask_truncated=True)
    ended = np.array([c[-1] in EOS for c in completions])
    assert 0 < ended.sum() < len(ended)
    np.testing.assert_array_equal(batch["mask"].sum(1) > 0, ended)
    np.testing.assert_array_equal(batch["mask"].sum(1)[ended], [len(c) for c, e in zip(completions, ended) if e])


@functools.lru_cache
def policy_rollout():
    """A tiny policy, one rollout of it, and a jitted scorer of [A, b, ...] batches (shared)."""
    model = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(2))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    logps = jax.jit(lambda p, b: jax.lax.map(lambda mb: rl.policy_logps(nnx.merge(graphdef, p, frozen), mb, 0.8)[0],
                                             b))
    return graphdef, params, frozen, sampled_batch(model, 0.8, G=4)[0], logps


def step_inputs(beta, loss_type="grpo", A=2):
    graphdef, params, frozen, batch, logps = policy_rollout()
    N = batch["mask"].shape[0]
    batch = {k: v.reshape(A, N // A, *v.shape[1:]) for k, v in batch.items()}
    batch["advantages"] = np.random.default_rng(0).normal(0, 1, (A, N // A)).astype(np.float32)
    batch["weights"] = grpo.loss_weights(batch["mask"], loss_type, 6)
    if beta:
        batch["ref_logp"] = logps(params, batch)  # reference = the policy: KL and its gradient are 0
    cfg = grpo.Config(beta=beta, temperature=0.8, loss_type=loss_type, max_completion_len=6,
                      importance_sampling_correction=False)  # these tests move π_old: no sampler to correct for
    tx = optax.sgd(1.0)  # new params = params - grads: compares the gradients themselves
    step = jax.jit(grpo.make_train_step(graphdef, tx, cfg))
    return graphdef, params, frozen, batch, tx, step, logps


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_first_update_is_the_policy_gradient(beta):
    graphdef, params, frozen, batch, tx, step, logps = step_inputs(beta)
    new, _, metrics, logp = step(params, tx.init(params), frozen, batch)  # no old_logp: the first update
    grads = jax.tree.map(jnp.subtract, params, new)

    def policy_gradient_objective(p):  # −Σ A · w · log π, aggregated as the loss is
        return jnp.sum(-batch["advantages"][..., None] * batch["weights"] * logps(p, batch))
    want = jax.grad(policy_gradient_objective)(params)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-4)
    assert max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want)) > 1e-3
    # ratio exactly 1: the loss is −Σ A·w, nothing is clipped, and the pass returns π_old
    assert abs(float(metrics["loss"]) - float(-np.sum(batch["advantages"][..., None] * batch["weights"]))) < 1e-6
    assert float(metrics["clip_ratio"]) == 0.0 and float(metrics["sampling/logp_difference"]) < 1e-4
    assert abs(float(metrics["kl"])) < 1e-6
    np.testing.assert_allclose(logp, logps(params, batch), atol=1e-6)


def test_later_updates_clip_against_the_old_policy():
    graphdef, params, frozen, batch, tx, step, logps = step_inputs(0.0)
    current = np.asarray(logps(params, batch))
    # π_old one nat away on the side each advantage pushes: every token's ratio is clipped
    batch["old_logp"] = current - np.sign(batch["advantages"])[..., None]
    new, _, metrics, _ = step(params, tx.init(params), frozen, batch)
    assert float(metrics["clip_ratio"]) == 1.0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        np.testing.assert_array_equal(a, b)  # no gradient at all
    batch["old_logp"] = current + np.sign(batch["advantages"])[..., None]  # the other side: unclipped
    new, _, metrics, _ = step(params, tx.init(params), frozen, batch)
    assert float(metrics["clip_ratio"]) == 0.0
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)))


def test_every_update_of_a_rollout_takes_its_ratio_against_the_sampling_policy():
    """μ = 3: updates 2 and 3 both use π_old = the policy that sampled the batch (θ_0), as the docstring, TRL and
    CleanRL say; not the weights after the update before (update 3 against θ_1 was a bug)."""
    graphdef, params, frozen, batch, tx, step, logps = step_inputs(0.0)
    theta0 = np.asarray(logps(params, batch))
    seen = []

    def spy(params, opt_state, frozen, batch):
        seen.append(None if "old_logp" not in batch else np.asarray(batch["old_logp"]))
        return step(params, opt_state, frozen, batch)
    cfg = grpo.Config(beta=0.0, temperature=0.8, max_completion_len=6, num_iterations=3, lr=0.5)
    new, _, metrics = grpo.policy_updates(spy, logps, params, tx.init(params), frozen, [dict(batch)], cfg)
    assert len(seen) == 3 and len(metrics) == 3
    for old in seen[1:]:  # the first update has none: it runs at θ_0, its ratio exactly 1
        np.testing.assert_allclose(old, theta0, atol=1e-6)
    assert not np.allclose(np.asarray(logps(new, batch)), theta0, atol=1e-3)  # the updates did move the policy


def test_several_hosts_average_the_loss_over_the_whole_batch(monkeypatch):
    """On H hosts each feeds its rows, and the weights that average the loss are those of the whole rollout
    batch: the hosts' losses add up to the one-host loss (each host once normalised over its own rows: H×)."""
    model = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(2))
    tok = tokenizer.ByteTokenizer()
    G, N = 4, 16
    ids = [tok.encode(p) for p in PROMPTS for _ in range(G)]
    completions, sampler = sample.generate(model, ids, max_new_tokens=6, temperature=1.0, seed=3, eos_ids=EOS,
                                           return_logprobs=True)
    rng = np.random.default_rng(0)
    per_token = rng.normal(size=(N, 8)).astype(np.float32)  # any token losses: the test is about their weights
    for loss_type in grpo.LOSS_TYPES:
        cfg = grpo.Config(max_completion_len=6, loss_type=loss_type, grad_accum=2, num_generations=G,
                          prompts_per_step=4)
        advantages = rng.normal(size=N)
        r = grpo.Rollout([{}] * N, ids, completions, sampler, [[1] * len(c) for c in completions], np.zeros((N, 2)),
                         np.zeros((N, 1)), np.zeros(N), advantages, np.zeros(N))

        def loss(hosts, host):
            monkeypatch.setattr(jax, "process_count", lambda: hosts)
            monkeypatch.setattr(jax, "process_index", lambda: host)
            monkeypatch.setattr(grpo.shard, "global_batch", lambda v, mesh, axis=0: np.asarray(v))
            batch, = grpo.step_batches(r, EOS, tok.pad_id, cfg, None, 0)
            C = batch["mask"].shape[-1]
            rows = np.arange(N).reshape(2, hosts, -1)[:, host].reshape(-1)  # its share of each micro-batch
            return float(np.sum(batch["weights"].reshape(-1, C) * per_token[rows, :C]))
        one = loss(1, 0)
        assert abs(loss(2, 0) + loss(2, 1) - one) < 1e-5 * max(1.0, abs(one)), loss_type


# ----------------------------------------------------------------------------- rewards

ADVERSARIAL = ["9" * 5000, "<answer>" * 3000 + "7", "", "٤٢", "__import__('os').system('echo hacked')",
               "1e999999999", "<answer>" + "9" * 100000 + "</answer>", "\x00\udcff", "-" * 10000, "1," * 5000]


def test_rewards_on_adversarial_completions(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("model output must never be evaluated")
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    cases = [  # completion, reference answer, accuracy, format
        ("<answer>72</answer>", "72", 1, 1),
        ("<think>48 + 24</think>\n<answer> 72 </answer>\n", "Natalia sold 48/2 = 24 ...\n#### 72", 1, 1),
        ("<answer>1,234.0</answer>", "1234", 1, 1),
        ("so 5 then 72", 72, 1, 0),  # no tags: the last number
        ("<answer>72</answer> and 5", "72", 1, 0),  # the tag wins over the last number
        ("<answer>seventy-two</answer> 72", "72", 0, 0),  # a tag without a number: no fallback
        ("<answer>-3</answer>", "-3", 1, 1),
        ("<answer>3</answer>", "-3", 0, 1),
        ("print(72)", "72", 1, 0),
        ("9" * 5000, "9" * 5000, 0, 0),  # too long to be an answer; never converted
        ("٧٢", "72", 0, 0),  # other scripts' digits are not ASCII numbers
    ]
    start = time.perf_counter()
    completions = [c for c, *_ in cases] + ADVERSARIAL
    answers = [a for _, a, *_ in cases] + ["7"] * len(ADVERSARIAL)
    acc = tasks.accuracy_reward(["q"] * len(completions), completions, answer=answers)
    fmt = tasks.format_reward(["q"] * len(completions), completions, answer=answers)
    assert acc[:len(cases)] == [float(c[2]) for c in cases]
    assert fmt[:len(cases)] == [float(c[3]) for c in cases]
    assert acc[len(cases):] == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert all(isinstance(r, float) for r in acc + fmt)

    task = tasks.Arithmetic("*", 3, 1)
    accuracy, form = task.rewards()
    completions = ["0492", " 0492\n", "492", "04920", "٠٤٩٢", "0492<answer>"] + ADVERSARIAL
    prompts = ["123*4="] * len(completions)
    assert accuracy(prompts, completions) == [1.0, 1.0] + [0.0] * (len(completions) - 2)
    assert form(prompts, completions) == [1.0] + [0.0] * (len(completions) - 1)
    minus, = [f for f in tasks.Arithmetic("-", 2, 2).rewards() if f.__name__ == "format_reward"]
    assert tasks.Arithmetic("-", 2, 2).answer("05-10=") == "-05"
    assert minus(["05-10="] * 4, ["-05", "+07", "05", "+005"]) == [1.0, 1.0, 0.0, 0.0]
    assert time.perf_counter() - start < 2.0
    scores = tasks.score([accuracy, form], [{"prompt": p, "answer": "x"} for p in prompts], completions)
    assert scores.shape == (len(completions), 2) and scores[0].tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- an existing run and mesh
# (kill -9, SIGTERM and resume of every script: tests/test_faults.py)

FINISHED = ["--warmup-sft-steps", "0", "--prompts-per-step", "4", "--num-generations", "2", "--train-examples", "100",
            "--eval-examples", "8", "--eval-every", "2", "--steps", "2", "--save-every", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A finished small run with a checkpoint at each step: a run not to overwrite."""
    out = tmp_path_factory.mktemp("full") / "run"
    r = run_grpo(*FINISHED, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_mesh_4x2_logs_the_single_device_metrics(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    # lr 3e-4: updates that keep the policy near π_ref (kl ~0.02), so the runs' float reassociation is not
    # amplified by a clipped jump (at 1e-3 step 3's kl is 0.74, and 1e-4 apart grows to 2e-4)
    args = [*SMALL, "--steps", "3", "--log-every", "1", "--lr", "3e-4"]
    runs = {name: subprocess.Popen([sys.executable, "grpo.py", *args, "--mesh", mesh, "--out", str(tmp_path / name)],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            for name, mesh in (("one", "fsdp=1,tp=1"), ("eight", "fsdp=4,tp=2"))}  # side by side: half the wait
    stderr = {name: proc.communicate(timeout=600)[1] for name, proc in runs.items()}
    assert all(proc.returncode == 0 for proc in runs.values()), {k: v[-1000:] for k, v in stderr.items()}
    assert "'fsdp': 4, 'tp': 2" in stderr["eight"]
    for key in ("reward", "loss", "kl", "entropy", "grad_norm", "eval/reward"):
        a, b = by_step(tmp_path / "one", key), by_step(tmp_path / "eight", key)
        assert sorted(a) == sorted(b) and len(a) >= 1, key
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-4 * max(1.0, abs(a[step])), (key, step, a[step], b[step])


# ----------------------------------------------------------------------------- bad input

def error_line(capsys, tmp_path, *args) -> str:
    """grpo.main in this process (8 simulated devices): the one-line error it exits with."""
    with pytest.raises(SystemExit) as e:
        grpo.main([*args, "--train-examples", "100", "--out", str(tmp_path / "run")])
    assert e.value.code not in (0, None)
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err  # sys.exit / shard
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), message
    return lines[0]


@pytest.mark.parametrize("content,message", [
    (b'{"prompt": "a", "answer": "1"}\n{"prompt": \n', r"bad.jsonl:2: bad JSON"),
    (b'{"prompt": "a"}\n', r"bad.jsonl:1: missing key 'answer'"),
    (b'{"query": "a", "answer": "1"}\n', r"bad.jsonl:1: expected an object with a 'prompt'"),
    (b'\n\n', r"bad.jsonl: empty file"),
    (b'{"prompt": "caf\xe9", "answer": "1"}\n', r"bad.jsonl:1: not UTF-8"),
    (b'{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}\n', r"chat prompts need a checkpoint"),
])
def test_bad_data_is_one_clear_line(capsys, tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    assert message in error_line(capsys, tmp_path, "--data", str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("args,message", [
    (["--num-generations", "1"], "--num-generations must be >= 2"),
    (["--loss-type", "ppo"], "--loss-type must be one of grpo, bnpo, dr_grpo, dapo"),
    (["--scale-rewards", "yes"], "--scale-rewards must be one of group, batch, none"),
    (["--epsilon", "0"], "0 < --epsilon < 1"),
    (["--temperature", "0"], "--temperature > 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--reward-weights", "1,x"], "--reward-weights must be comma-separated numbers, got '1,x'"),
    (["--reward-weights", "1,2,3", "--warmup-sft-steps", "0"], "3 weights for 2 reward functions"),
    (["--prompts-per-step", "3", "--num-generations", "2", "--grad-accum", "4"], "multiple of --grad-accum"),
    (["--task", "/,3,1"], "bad --task '/,3,1' (want e.g. *,3,1 or sequence)"),
    (["--ckpt", "/no/such/dir"], "/no/such/dir: no such checkpoint directory"),
    (["--data", "/no/such.jsonl"], "/no/such.jsonl: no such file"),
    (["--model", "gpt5"], "unknown model preset 'gpt5'"),
    (["--mesh", "fsdp=3"], "has 3 slots for 8 devices"),
    (["--tpu"], "no TPU"),
])
def test_bad_flags_are_one_clear_line(capsys, tmp_path, args, message):
    assert message in error_line(capsys, tmp_path, *args)


@pytest.mark.parametrize("args,message", [
    (["--num-generations", "1"], "--num-generations must be >= 2"),  # before the model loads
    (["--data", "BAD"], "bad.jsonl:1: bad JSON"),  # after
])
def test_a_user_sees_one_line_on_stderr(tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    r = run_grpo(*[str(tmp_path / "bad.jsonl") if a == "BAD" else a for a in args], "--out", str(tmp_path / "run"))
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_an_existing_run_is_never_overwritten(capsys, tmp_path, full_run):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    saved = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        grpo.main([*FINISHED, "--out", str(out)])  # forgot --resume
    assert "already holds a run: pass --resume" in e.value.code
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == saved
    for p in (out / "checkpoints").rglob("*"):  # every checkpoint damaged: reported in one line, none used
        if p.is_file():
            p.write_bytes(b"garbage")
    damaged = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        grpo.main([*FINISHED, "--out", str(out), "--resume"])
    assert "cannot restore the train state" in e.value.code and len(e.value.code.splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == damaged


@pytest.mark.slow
def test_lora_run_exports_adapter_and_merged_model(tmp_path):
    out = tmp_path / "run"
    r = run_grpo("--lora", "--warmup-sft-steps", "0", "--steps", "1", "--prompts-per-step", "4",
                 "--num-generations", "2", "--eval-examples", "8", "--train-examples", "100", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert by_step(out, "kl")[1] == 0.0  # the reference is the base: adapters start at zero
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "hf" / "config.json").is_file()


def test_lora_trains_adapters_against_the_base_model():
    import adapters
    model = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(3))
    batch, _ = sampled_batch(model, 1.0)
    base = np.asarray(rl.policy_logps(model, batch, 1.0)[0])
    adapters.add_lora(model, 4, 8.0)
    graphdef, params, frozen = nnx.split(model, adapters.LoRA, ...)  # what --lora trains | the frozen rest
    assert all("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
    assert not any("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(frozen))
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(0), x.shape), params)
    reference = jax.tree.map(jnp.zeros_like, trained)  # grpo.py's reference under --lora
    m = batch["mask"] > 0
    ref_logp = np.asarray(rl.policy_logps(nnx.merge(graphdef, reference, frozen), batch, 1.0)[0])
    policy_logp = np.asarray(rl.policy_logps(nnx.merge(graphdef, trained, frozen), batch, 1.0)[0])
    np.testing.assert_allclose(ref_logp[m], base[m], atol=1e-5)
    assert np.max(np.abs(policy_logp[m] - base[m])) > 1e-3
