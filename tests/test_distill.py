"""distill.py: every divergence equals a numpy reference (masking and temperature included; JSD at
β = 0 and 1 the two KLs), the teacher gets no gradient and no optimizer state, on-policy steps
sample from the student reproducibly, vocabularies padded differently still distil and different
tokenizers stop with one line, chunked numbers equal unchunked, the run resumes exactly, and the
default run learns (slow)."""
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import data
import distill
import logprobs
import sample
import tokenizer
from model import CONFIGS, Transformer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_distill(*args, timeout=600):
    return subprocess.run([sys.executable, "distill.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "XLA_FLAGS": ""})


def by_step(out, key) -> dict[int, float]:
    rows = [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m[key] for m in rows if key in m}


# ----------------------------------------------------------------------------- the divergences

def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference(name, s_logits, t_logits, target, beta, alpha, temperature):
    """Each divergence per position from its definition, in float64: p_S, p_T = softmax(logits / τ)."""
    ls, lt = log_softmax(s_logits / temperature), log_softmax(t_logits / temperature)
    ps, pt = np.exp(ls), np.exp(lt)
    KL = lambda p, q: (p * (np.log(p) - np.log(q))).sum(-1)  # noqa: E731
    if name == "jsd":  # TRL's GKD: β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M), M = β p_T + (1 − β) p_S
        if beta == 0:
            return KL(pt, ps)
        if beta == 1:
            return KL(ps, pt)
        m = beta * pt + (1 - beta) * ps
        return beta * KL(pt, m) + (1 - beta) * KL(ps, m)
    if name == "symmetric_kl":
        return (1 - beta) * KL(pt, ps) + beta * KL(ps, pt)
    if name == "tv":
        return 0.5 * np.abs(pt - ps).sum(-1)
    if name == "skew_forward_kl":  # DistiLLM: KL(p_T ‖ α p_T + (1 − α) p_S)
        return KL(pt, alpha * pt + (1 - alpha) * ps)
    if name == "skew_reverse_kl":  # KL(p_S ‖ α p_S + (1 − α) p_T)
        return KL(ps, alpha * ps + (1 - alpha) * pt)
    picked_s, picked_t = ls[np.arange(len(target)), target], lt[np.arange(len(target)), target]
    return -(picked_t - picked_s) * picked_s  # sampled_reverse_kl's value


def cfg_for(**kw):
    return distill.Config(**kw)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,beta", [("jsd", 0.0), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0), ("symmetric_kl", 0.3),
                                       ("tv", 0.5), ("skew_forward_kl", 0.5), ("skew_reverse_kl", 0.5),
                                       ("sampled_reverse_kl", 0.5)])
def test_every_divergence_is_its_definition(name, beta, temperature):
    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 2, (7, 11)), rng.normal(0, 2, (7, 11))
    target = rng.integers(0, 11, 7)
    cfg = cfg_for(loss=name, beta=beta, skew_alpha=0.2, temperature=temperature)
    ls, lt = (jax.nn.log_softmax(jnp.asarray(z, jnp.float32) / temperature) for z in (s, t))
    got = distill.DIVERGENCES[name](ls, lt, jnp.asarray(target), cfg)
    np.testing.assert_allclose(got, reference(name, s, t, target, beta, 0.2, temperature), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0)])
def test_token_terms_from_logits_are_their_definitions_with_autodiffs_gradient(beta, temperature):
    """token_terms takes logits (the exact forward KL through forward_kl's written-out gradient, the logged KLs
    and NLLs from the rows' logsumexps): every term equals its definition from the log-probs, and the gradient
    of 0.7·kd + 0.3·NLL equals autodiff of the same terms written with log_softmax, to 1e-5."""
    rng = np.random.default_rng(2)
    s, t = (jnp.asarray(rng.normal(0, 3, (9, 50)), jnp.float32) for _ in range(2))
    target, weights = jnp.asarray(rng.integers(0, 50, 9)), jnp.asarray(rng.uniform(0, 1, 9), jnp.float32)
    cfg = cfg_for(loss="jsd", beta=beta, temperature=temperature)

    def terms_of(s):
        return distill.token_terms(s / temperature, t / temperature, s, t, target, cfg)
    terms = terms_of(s)
    s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
    ls, lt = log_softmax(s64), log_softmax(t64)
    rows = np.arange(9)
    want = {"kd_loss": reference("jsd", s64, t64, target, beta, 0.1, temperature), "nll_loss": -ls[rows, target],
            "teacher_nll": -lt[rows, target], "kl/forward": (np.exp(lt) * (lt - ls)).sum(-1),
            "kl/reverse": (np.exp(ls) * (ls - lt)).sum(-1)}
    for name, value in want.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-5, atol=1e-5, err_msg=name)

    def autodiff_terms(s):  # the log-prob formulation, differentiated by jax
        log_s, log_t = (jax.nn.log_softmax(z / temperature) for z in (s, t))
        return {"kd_loss": distill.DIVERGENCES["jsd"](log_s, log_t, target, cfg),
                "nll_loss": -distill.picked(jax.nn.log_softmax(s), target)}

    def loss(terms_fn):
        return lambda s: jnp.sum(weights * (0.7 * terms_fn(s)["kd_loss"] + 0.3 * terms_fn(s)["nll_loss"]))
    got, expected = jax.grad(loss(terms_of))(s), jax.grad(loss(autodiff_terms))(s)
    np.testing.assert_allclose(got, expected, atol=1e-5 * float(jnp.max(jnp.abs(expected))))
    if beta == 0 and temperature == 1:  # the written-out gradient is p_S − p_T, the teacher's side left alone
        g = jax.grad(lambda s, t: jnp.sum(weights * distill.forward_kl(s, t)), argnums=(0, 1))(s, t)
        np.testing.assert_allclose(g[0], weights[:, None] * (np.exp(ls) - np.exp(lt)), atol=1e-6)
        assert not np.any(np.asarray(g[1]))


def test_top1_agreement_is_the_argmax_agreement():
    """top1_agreement (an equality with each row's max) is argmax(student) == argmax(teacher) where neither has
    a tie, and 1 where a tied likeliest token of one is the other's likeliest."""
    s, t = jax.random.normal(jax.random.key(0), (2, 500, 37))
    t = t.at[:250].set(t[:250] + 10 * jax.nn.one_hot(jnp.argmax(s[:250], -1), 37))  # half the rows agree
    expected = (jnp.argmax(s, -1) == jnp.argmax(t, -1)).astype(jnp.float32)
    got = distill.top1_agreement(s, t)
    assert np.array_equal(got, expected) and 0.4 < float(got.mean()) < 0.6
    tied_s, tied_t = jnp.array([[1.0, 3.0, 3.0, 0.0]]), jnp.array([[0.0, 1.0, 2.0, 0.5]])  # student: 1 or 2
    assert float(distill.top1_agreement(tied_s, tied_t)[0]) == float(distill.top1_agreement(tied_t, tied_s)[0]) == 1.0


def test_jsd_tends_to_the_two_kls_at_its_ends():
    rng = np.random.default_rng(1)
    s, t = (jax.nn.log_softmax(jnp.asarray(rng.normal(0, 1, (5, 9)), jnp.float32)) for _ in range(2))
    forward, reverse = distill.kl(t, s), distill.kl(s, t)
    for beta, want in ((0.0, forward), (1.0, reverse)):
        got = distill.DIVERGENCES["jsd"](s, t, jnp.zeros(5, jnp.int32), cfg_for(beta=beta))
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # near the ends the generalized JSD is ~β·(its KL): a strength knob, not only a direction (TRL's own caveat)
    near = distill.DIVERGENCES["jsd"](s, t, jnp.zeros(5, jnp.int32), cfg_for(beta=1e-3))
    assert float(jnp.max(near)) < 0.01 * float(jnp.max(forward)) + 1e-6


# ----------------------------------------------------------------------------- intermediate layers

def avg_pool_reference(h, width):
    """Tunix's avg_pool_array_to_target_shape on the last axis, VALID padding, written out in numpy."""
    D = h.shape[-1]
    stride = D // width
    window = D - (width - 1) * stride
    return np.stack([h[..., i * stride:i * stride + window].mean(-1) for i in range(width)], -1)


@pytest.mark.parametrize("D,width", [(128, 64), (100, 64), (96, 96), (7, 3)])
def test_pooling_is_tunix_average_pooling(D, width):
    h = np.random.default_rng(0).normal(size=(2, 5, D)).astype(np.float32)
    np.testing.assert_allclose(distill.pooled(jnp.asarray(h), width), avg_pool_reference(h, width), rtol=1e-5,
                               atol=1e-6)


def test_layer_losses_are_their_definitions():
    """hidden mse (projected to the teacher's width), cosine (the wider pooled), attention-map KL: each
    per position against numpy, each summed over its pairs."""
    rng = np.random.default_rng(1)
    B, T, Ds, Dt = 2, 6, 8, 12
    hidden_s, hidden_t = rng.normal(size=(3, B, T, Ds)), rng.normal(size=(4, B, T, Dt))
    maps = lambda n: rng.dirichlet(np.ones(T), size=(n, B, T))  # noqa: E731 (rows sum to 1)
    attn_s, attn_t = maps(2), maps(3)
    attn_s[..., -1], attn_t[..., -1] = 0.0, 0.0  # a masked key: zero in both maps
    attn_s, attn_t = attn_s / attn_s.sum(-1, keepdims=True), attn_t / attn_t.sum(-1, keepdims=True)
    taps_s = {"hidden": jnp.asarray(hidden_s, jnp.float32), "attention": jnp.asarray(attn_s, jnp.float32)}
    taps_t = {"hidden": jnp.asarray(hidden_t, jnp.float32), "attention": jnp.asarray(attn_t, jnp.float32)}
    W = {"s1_t2": rng.normal(size=(Ds, Dt)), "s2_t3": rng.normal(size=(Ds, Dt))}
    cfg = cfg_for(hidden_layers="1:2,2:3", attention_layers="0:1,1:2")
    got = distill.layer_terms(taps_s, taps_t, {k: jnp.asarray(v, jnp.float32) for k, v in W.items()}, cfg)
    mse = sum(((hidden_s[s] @ W[f"s{s}_t{t}"] - hidden_t[t]) ** 2).mean(-1) for s, t in [(1, 2), (2, 3)])
    np.testing.assert_allclose(got["hidden_loss"], mse, rtol=1e-4)
    kl = lambda p, q: np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(np.where(q > 0, q, 1))), 0).sum(-1)  # noqa
    np.testing.assert_allclose(got["attention_loss"], kl(attn_t[1], attn_s[0]) + kl(attn_t[2], attn_s[1]), rtol=1e-4,
                               atol=1e-6)
    cosine = distill.layer_terms(taps_s, taps_t, {}, cfg_for(hidden_layers="1:2", hidden_loss="cosine"))
    a, b = hidden_s[1], avg_pool_reference(hidden_t[2], Ds)
    want = 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(cosine["hidden_loss"], want, rtol=1e-4, atol=1e-6)
    assert set(cosine) == {"hidden_loss"}


def test_projections_have_the_two_widths_and_are_trained():
    """--hidden-loss mse between the 64-wide student and the 128-wide teacher: a [64, 128] projection per pair,
    updated by the train step with the student (the teacher still gets nothing); equal widths need none."""
    student, teacher = models()
    cfg = cfg_for(hidden_layers="1:1,2:2", attention_layers="1:0")
    projections = distill.make_projections(cfg, student.cfg, teacher.cfg)
    assert {k: v.shape for k, v in projections.items()} == {"s1_t1": (64, 128), "s2_t2": (64, 128)}
    assert distill.make_projections(cfg, teacher.cfg, teacher.cfg) == {}
    assert distill.make_projections(cfg_for(hidden_layers="1:1", hidden_loss="cosine"), student.cfg, teacher.cfg) == {}
    import run
    graphdef, params, frozen = nnx.split(student, nnx.Param, ...)
    t_graphdef, t_state = nnx.split(teacher)
    params = {"student": params, "projections": projections}
    tx, _ = run.adamw(cfg_for(warmup=0.0), 10)
    step = jax.jit(distill.make_train_step(graphdef, t_graphdef, tx, cfg))
    batch = {k: v[None] for k, v in task_batch().items()}
    new, opt_state, metrics, aux = step(params, tx.init(params), distill.Frozen(frozen, t_state), batch, None)
    assert float(jnp.sum(aux["hidden_loss"])) > 0 and float(jnp.sum(aux["attention_loss"])) > 0
    for name, w in projections.items():
        assert new["projections"][name].shape == w.shape and not np.allclose(new["projections"][name], w)
    # the loss is the weighted sum of its parts
    cfg2 = cfg_for(hidden_layers="1:1,2:2", attention_layers="1:0", hidden_weight=0.5, attention_weight=2.0)
    loss, sums = distill.distill_loss(student, teacher, task_batch(), cfg2, projections=projections)
    np.testing.assert_allclose(loss, sums["kd_loss"] + 0.5 * sums["hidden_loss"] + 2.0 * sums["attention_loss"],
                               rtol=1e-5)


# ----------------------------------------------------------------------------- the models

def models(teacher_vocab=None):
    student = Transformer(CONFIGS["tiny-qwen3-small"], nnx.Rngs(0))
    teacher_cfg = CONFIGS["tiny-qwen3"].replace(vocab_size=teacher_vocab or 259)
    return student, Transformer(teacher_cfg, nnx.Rngs(1))


def task_batch(n=6):
    tok = tokenizer.ByteTokenizer()
    rows = [data.tokenize(r, tok) for r in distill.tasks.builtin_task("*,3,1").examples("train", n)]
    return {k: jnp.asarray(v) for k, v in data.collate([[r] for r in rows], 16, tok.pad_id).items()}


def test_loss_is_the_masked_mean_and_chunks_change_nothing(monkeypatch):
    """distill_loss sums kd_ratio·D + (1 − kd_ratio)·NLL over completion tokens only; with the head in
    chunks of 8 positions the value and gradients are the same."""
    student, teacher = models()
    batch = task_batch()
    cfg = cfg_for(kd_ratio=0.7, beta=0.3, temperature=1.5)
    graphdef, params = nnx.split(student)

    def loss(p):
        return distill.distill_loss(nnx.merge(graphdef, p), teacher, batch, cfg)
    (value, sums), grads = jax.value_and_grad(loss, has_aux=True)(params)
    # by hand: full logits of both models
    s_logits = np.asarray(student(batch["tokens"][:, :-1]), np.float64)
    t_logits = np.asarray(teacher(batch["tokens"][:, :-1]), np.float64)
    mask = np.asarray(batch["loss_mask"][:, 1:]) > 0
    target = np.asarray(batch["tokens"][:, 1:])[mask]
    kd = reference("jsd", s_logits[mask], t_logits[mask], target, 0.3, 0.1, 1.5).sum()
    nll = -log_softmax(s_logits[mask])[np.arange(mask.sum()), target].sum()
    np.testing.assert_allclose(value, 0.7 * kd + 0.3 * nll, rtol=1e-4)
    assert float(sums["tokens"]) == mask.sum()
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 8 * 259 * 4)
    (value_c, _), grads_c = jax.value_and_grad(loss, has_aux=True)(params)
    np.testing.assert_allclose(value_c, value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
        np.testing.assert_allclose(b, a, atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-7)


def test_the_teacher_gets_no_gradient_and_no_optimizer_state():
    student, teacher = models()
    batch = task_batch()
    graphdef, params, frozen = nnx.split(student, nnx.Param, ...)
    t_graphdef, t_state = nnx.split(teacher)
    grads = jax.grad(lambda ts: distill.distill_loss(student, nnx.merge(t_graphdef, ts), batch, cfg_for())[0])(t_state)
    assert all(not jnp.any(g) for g in jax.tree.leaves(grads))
    import run
    cfg = cfg_for()
    tx, _ = run.adamw(cfg, 10)
    opt_state = tx.init({"student": params})
    step = jax.jit(distill.make_train_step(graphdef, t_graphdef, tx, cfg))
    b = {k: v[None] for k, v in batch.items()}
    new_params, new_opt, metrics, _ = step({"student": params}, opt_state, distill.Frozen(frozen, t_state), b, None)
    n_student = sum(x.size for x in jax.tree.leaves(params))
    assert sum(x.size for x in jax.tree.leaves(new_opt)) <= 2 * n_student + 8  # AdamW's two moments (+ counts)
    assert np.isfinite(float(metrics["loss"]))


def test_on_policy_steps_sample_from_the_student_reproducibly():
    student, teacher = models()
    tok = tokenizer.ByteTokenizer()
    examples = [data.tokenize(r, tok) for r in distill.tasks.builtin_task("*,3,1").examples("train", 8)]
    cfg = cfg_for(lmbda=1.0, max_new_tokens=5)
    a, lengths = distill.step_examples(examples, list(range(8)), student, teacher, tok, cfg, 3)
    b, _ = distill.step_examples(examples, list(range(8)), student, teacher, tok, cfg, 3)
    assert a == b and lengths and all(1 <= n <= 5 for n in lengths)
    prompts = [data.prompt_of(ex) for ex in examples]
    assert all(ids[:len(p)] == p and mask == [0] * len(p) + [1] * (len(ids) - len(p))
               for (ids, mask), p in zip(a, prompts))
    assert a != distill.step_examples(examples, list(range(8)), student, teacher, tok, cfg, 4)[0]
    in_slots = cfg_for(lmbda=1.0, max_new_tokens=5, rollout_slots=3)  # the decode engine: reproducible too
    c, slot_lengths = distill.step_examples(examples, list(range(8)), student, teacher, tok, in_slots, 3)
    assert c == distill.step_examples(examples, list(range(8)), student, teacher, tok, in_slots, 3)[0]
    assert all(1 <= n <= 5 for n in slot_lengths) and [ids[:len(p)] for (ids, _), p in zip(c, prompts)] == prompts
    offline, none = distill.step_examples(examples, list(range(8)), student, teacher, tok, cfg_for(), 3)
    assert offline == examples and none is None
    seq_kd, _ = distill.step_examples(examples, list(range(8)), student, teacher, tok, cfg_for(seq_kd=True,
                                      max_new_tokens=5), 3)
    draw = np.random.default_rng([0, 3, 1])
    draw.random()
    teacher_outs = sample.generate(teacher, prompts, max_new_tokens=5, temperature=0.9, seed=int(draw.integers(2**31)),
                                   eos_ids=tok.eos_ids)
    assert [ids[len(p):] for (ids, _), p in zip(seq_kd, prompts)] == teacher_outs


def test_a_padded_teacher_vocabulary_is_cut_to_the_common_size():
    """A teacher whose vocabulary has rows past the tokenizer's ids (here: large logits that would swamp
    its softmax) distils exactly as the same teacher without them."""
    student, teacher = models()
    _, padded = models(teacher_vocab=300)
    weights = nnx.state(teacher).to_pure_dict()
    extra = jnp.full((41, weights["embed"].shape[1]), 3.0)  # rows 259..299: never a real token
    state = nnx.state(padded)
    state.replace_by_pure_dict({**weights, "embed": jnp.concatenate([weights["embed"], extra])})
    nnx.update(padded, state)
    batch = task_batch()
    a = distill.distill_loss(student, teacher, batch, cfg_for())[0]
    b = distill.distill_loss(student, padded, batch, cfg_for())[0]
    assert padded.cfg.vocab_size == 300
    np.testing.assert_allclose(a, b, rtol=1e-5)


def cached_batch(teacher, batch, K, temperature=1.0):
    """The batch with the teacher's top-K log-probs at its target positions, as the cache gives them."""
    logits = teacher(batch["tokens"][:, :-1])[..., :259] / temperature
    values, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), K)
    return {**batch, "topk_ids": ids, "topk_logps": values}


@pytest.mark.parametrize("loss,beta", [("jsd", 0.0), ("jsd", 0.5), ("tv", 0.5), ("skew_forward_kl", 0.5)])
def test_the_top_k_cache_with_k_equal_v_is_the_live_teacher(loss, beta):
    student, teacher = models()
    batch = task_batch()
    cfg = cfg_for(loss=loss, beta=beta, temperature=1.5, teacher_topk=259)
    live, live_sums = distill.distill_loss(student, teacher, batch, cfg)
    cached, cached_sums = distill.distill_loss(student, None, cached_batch(teacher, batch, 259, 1.5), cfg)
    np.testing.assert_allclose(cached, live, rtol=1e-4)
    np.testing.assert_allclose(cached_sums["nll_loss"], live_sums["nll_loss"], rtol=1e-5)


def test_the_top_k_loss_is_the_k_plus_one_bucket_divergence():
    """K < V: both distributions become the K ids plus one bucket for the rest (TRL's loss_add_tail)."""
    student, teacher = models()
    batch = task_batch()
    cfg = cfg_for(loss="jsd", beta=0.0, teacher_topk=5)
    cached = cached_batch(teacher, batch, 5)
    got = distill.distill_loss(student, None, cached, cfg)[0]
    ls = log_softmax(np.asarray(student(batch["tokens"][:, :-1]), np.float64))
    mask = np.asarray(batch["loss_mask"][:, 1:]) > 0
    ids, top = np.asarray(cached["topk_ids"])[mask], np.asarray(cached["topk_logps"], np.float64)[mask]
    s_top = np.take_along_axis(ls[mask], ids, axis=-1)
    pt = np.concatenate([np.exp(top), 1 - np.exp(top).sum(-1, keepdims=True)], -1)
    ps = np.concatenate([np.exp(s_top), 1 - np.exp(s_top).sum(-1, keepdims=True)], -1)
    np.testing.assert_allclose(got, (pt * (np.log(pt) - np.log(ps))).sum(), rtol=1e-4)


# ----------------------------------------------------------------------------- runs

SMALL = ["--teacher", "tiny-qwen3", "--train-examples", "200", "--eval-examples", "16", "--batch-size", "8",
         "--steps", "8", "--log-every", "1", "--eval-every", "4", "--save-every", "4"]


@pytest.mark.parametrize("args", [["--lora"], ["--teacher-dtype", "bfloat16", "--loss", "skew_reverse_kl"],
                                  ["--seq-kd", "--loss", "sampled_reverse_kl", "--max-new-tokens", "6"],
                                  ["--kd-ratio", "0.5", "--tau-squared", "--temperature", "2", "--grad-accum", "2"],
                                  ["--max-len", "9", "--lmbda", "1", "--max-new-tokens", "6"],  # rows cut to 9
                                  ["--hidden-layers", "1:1,2:2", "--attention-layers", "1:1"]])
def test_the_other_modes_run_end_to_end(tmp_path, args):
    r = run_distill(*SMALL, "--steps", "2", *args, "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    losses = by_step(tmp_path / "run", "loss")
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    assert (tmp_path / "run" / "hf" / "config.json").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file() == ("--lora" in args)
    if "--hidden-layers" in args:  # the trained projections are saved; both layer losses logged
        from safetensors.numpy import load_file
        assert {k: v.shape for k, v in load_file(tmp_path / "run" / "projections.safetensors").items()} == {
            "s1_t1": (64, 128), "s2_t2": (64, 128)}
        last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["hidden_loss"] > 0 and last["eval/attention_loss"] > 0
    assert ("nll_loss" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])) == (
        "--kd-ratio" in args)


def test_a_cache_trained_run_equals_the_live_teacher_run(tmp_path):
    cache = ["--teacher-cache", str(tmp_path / "cache")]
    args = [*SMALL, "--steps", "3", "--eval-every", "3", "--save-every", "3"]
    live = run_distill(*args, "--out", str(tmp_path / "live"))
    first = run_distill(*args, *cache, "--teacher-topk", "259", "--out", str(tmp_path / "cached"))
    again = run_distill(*args, *cache, "--teacher-topk", "259", "--out", str(tmp_path / "again"))
    for r in (live, first, again):
        assert r.returncode == 0, r.stderr[-2000:]
    assert "teacher top-259: computed" in first.stderr and "teacher top-259: read from" in again.stderr
    for key in ("loss", "kd_loss", "grad_norm", "eval/kd_loss"):
        want = by_step(tmp_path / "live", key)
        for name in ("cached", "again"):
            got = by_step(tmp_path / name, key)
            assert got.keys() == want.keys() and want, key
            np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-4, atol=1e-6)


def test_mesh_4x2_logs_the_single_device_metrics(tmp_path):
    """The same run on 8 devices (fsdp 4 x tp 2), with a step sampled by the student (in 4 slots of the decode
    engine) and both layer losses, logs the one-device numbers."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    args = [*SMALL, "--steps", "2", "--eval-every", "2", "--lmbda", "0.5", "--max-new-tokens", "6",
            "--hidden-layers", "1:1", "--attention-layers", "1:1", "--rollout-slots", "4"]
    runs = {name: subprocess.Popen([sys.executable, "distill.py", *args, "--mesh", mesh, "--out", str(tmp_path / name)],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            for name, mesh in (("one", "fsdp=1,tp=1"), ("eight", "fsdp=4,tp=2"))}
    stderr = {name: proc.communicate(timeout=600)[1] for name, proc in runs.items()}
    assert all(proc.returncode == 0 for proc in runs.values()), {k: v[-1000:] for k, v in stderr.items()}
    assert "'fsdp': 4, 'tp': 2" in stderr["eight"]
    for key in ("loss", "kd_loss", "hidden_loss", "attention_loss", "grad_norm", "eval/kl", "eval/accuracy"):
        a, b = by_step(tmp_path / "one", key), by_step(tmp_path / "eight", key)
        assert sorted(a) == sorted(b) and len(a) >= 1, key
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-4 * max(1.0, abs(a[step])), (key, step, a[step], b[step])


def error_line(capsys, tmp_path, *args) -> str:
    with pytest.raises(SystemExit) as e:
        distill.main([*args, "--train-examples", "50", "--out", str(tmp_path / "run")])
    assert e.value.code not in (0, None)
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), message
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["--loss", "kl"], "--loss must be one of jsd"),
    (["--beta", "2"], "0 <= --beta <= 1"),
    (["--kd-ratio", "1.5"], "0 <= --kd-ratio <= 1"),
    (["--teacher", "gpt5"], "unknown model preset 'gpt5'"),
    (["--teacher", "tiny-qwen3", "--data", "MISSING"], "no such file"),
    (["--teacher-topk", "8", "--lmbda", "0.5"], "--teacher-topk K > 0 scores the dataset's completions"),
    (["--hidden-layers", "1-2"], "--hidden-layers takes student:teacher layer pairs"),
    (["--teacher", "tiny-qwen3", "--attention-layers", "0:2"], "--attention-layers 0:2: the student has layers 0..1"),
    (["--teacher-topk", "8", "--hidden-layers", "1:1"], "need the teacher itself"),
])
def test_bad_input_is_one_clear_line(capsys, tmp_path, args, message):
    args = [str(tmp_path / "missing.jsonl") if a == "MISSING" else a for a in args]
    assert message in error_line(capsys, tmp_path, *args)


def test_a_teacher_with_another_tokenizer_is_one_clear_line(capsys, tmp_path, gemma3_dir):
    line = error_line(capsys, tmp_path, "--teacher", str(gemma3_dir))
    assert "distillation needs the same tokenizer" in line and "262144" in line


@pytest.mark.slow
def test_default_run_learns_from_the_teacher(tmp_path, sft_demo):
    """`python distill.py` after `python sft.py` (its teacher the session's sft run, as runs/sft/hf would be; a
    teacher trained first is tests/test_processes.py's distill run): the KL to the teacher halves and the student
    reaches 0.8 of the teacher's held-out accuracy (measured on 2 cores: KL 6.35 -> 0.18, accuracy 0.836 of the
    teacher's 0.965, in 58 s)."""
    start = time.time()
    r = run_distill("--teacher", str(sft_demo / "hf"), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    kl, accuracy = by_step(tmp_path / "run", "eval/kl"), by_step(tmp_path / "run", "eval/accuracy")
    teacher = by_step(tmp_path / "run", "eval/teacher_accuracy")[0]
    print(f"\ndefault distill: eval/kl {kl[0]:.3f} -> {kl[max(kl)]:.3f}, eval/accuracy {accuracy[max(accuracy)]} "
          f"(teacher {teacher}) in {time.time() - start:.0f} s")
    assert kl[max(kl)] <= 0.5 * kl[0], kl
    assert accuracy[max(accuracy)] >= 0.8 * teacher, (accuracy, teacher)
