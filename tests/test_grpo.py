"""grpo.py: advantages and losses are TRL's, the learner scores exactly what the sampler drew,
rewards never raise, the default run learns, it resumes exactly, it shards, and bad input ends
in one clear line."""
import builtins
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
def test_default_run_raises_eval_reward(tmp_path):
    start = time.time()
    r = run_grpo("--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warm-up: supervised steps until" in r.stderr and "warm-up done" in r.stderr
    evals = by_step(tmp_path / "run", "eval/reward")
    first, last = evals[0], evals[max(evals)]
    print(f"\ndefault grpo: eval/reward {first} -> {last} in {time.time() - start:.0f} s")
    assert 0.1 < first < 0.7  # the warm-up leaves room to learn
    assert last - first >= 0.25, evals
    assert (tmp_path / "run" / "hf" / "config.json").is_file()


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
    r = grpo.Rollout([{}] * N, ids, completions, logps, np.zeros((N, 1)), np.zeros(N), np.zeros(N), np.zeros(N))
    batch = grpo.step_batches(r, EOS, tok.pad_id, cfg, None, 0)[0]  # one step, one micro-batch: [1, N, ...]
    return {k: np.asarray(v[0]) for k, v in batch.items() if k not in ("weights", "advantages")}, completions


@pytest.mark.parametrize("preset,temperature", [("tiny-qwen3", 1.0), ("tiny-gemma3", 0.6)])
def test_sampled_logprobs_are_the_learners(preset, temperature):
    model = Transformer(CONFIGS[preset], nnx.Rngs(1))
    batch, completions = sampled_batch(model, temperature)
    lengths = [len(c) for c in completions]
    assert len(set(lengths)) > 2 and batch["mask"].sum() == sum(lengths)
    logp, entropy = jax.jit(grpo.policy_logps, static_argnums=2)(model, batch, temperature)
    m = batch["mask"] > 0
    np.testing.assert_allclose(np.asarray(logp)[m], batch["sampler_logp"][m], atol=1e-4)
    assert np.all(np.asarray(entropy)[m] > 0)
    assert np.isclose(float(grpo.policy_logps(model, batch, 1.0)[0][m].sum()), batch["sampler_logp"][m].sum(),
                      atol=1e-3) == (temperature == 1.0)  # the temperature matters


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-gemma3"])
def test_a_groups_shared_prompt_gives_the_same_logps_and_gradients(preset):
    """group=G runs each prompt once into a KV cache for its G completions: same log-probs, entropy
    and parameter gradients as running every row's prompt (unrolled layers and the scan alike)."""
    model = Transformer(CONFIGS[preset], nnx.Rngs(1))
    batch, _ = sampled_batch(model, 1.0, G=3)
    graphdef, params = nnx.split(model)
    for big in (False, True):  # pretend the model is large: the scanned forward
        with mock.patch.object(model_lib, "unrolled_if_small", (lambda m: None) if big else model_lib.unrolled_if_small):
            def objective(p, group):
                logp, entropy = grpo.policy_logps(nnx.merge(graphdef, p), batch, 1.0, group)
                return jnp.sum((logp + entropy) * batch["mask"]), (logp, entropy)
            (_, (logp1, ent1)), g1 = jax.value_and_grad(objective, has_aux=True)(params, 1)
            (_, (logp3, ent3)), g3 = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)(params, 3)
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
    logps = jax.jit(lambda p, b: jax.lax.map(lambda mb: grpo.policy_logps(nnx.merge(graphdef, p, frozen), mb, 0.8)[0],
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
        r = grpo.Rollout([{}] * N, ids, completions, sampler, np.zeros((N, 1)), np.zeros(N), advantages, np.zeros(N))

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
    (["--task", "/,3,1"], "bad --task '/,3,1' (want e.g. *,3,1)"),
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
    base = np.asarray(grpo.policy_logps(model, batch, 1.0)[0])
    adapters.add_lora(model, 4, 8.0)
    graphdef, params, frozen = nnx.split(model, adapters.LoRA, ...)  # what --lora trains | the frozen rest
    assert all("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
    assert not any("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(frozen))
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(0), x.shape), params)
    reference = jax.tree.map(jnp.zeros_like, trained)  # grpo.py's reference under --lora
    m = batch["mask"] > 0
    ref_logp = np.asarray(grpo.policy_logps(nnx.merge(graphdef, reference, frozen), batch, 1.0)[0])
    policy_logp = np.asarray(grpo.policy_logps(nnx.merge(graphdef, trained, frozen), batch, 1.0)[0])
    np.testing.assert_allclose(ref_logp[m], base[m], atol=1e-5)
    assert np.max(np.abs(policy_logp[m] - base[m])) > 1e-3
