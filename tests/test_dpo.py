"""dpo.py: every loss is TRL v1's (a numpy transcription of its trainers' code), the shared-prompt and
chunked forwards change no number, the reference is what it claims in each of its four forms, pairs
are read and cut as TRL does (a broken prompt boundary is an error with its line), the default run
learns, it resumes exactly, and bad input ends in one clear line."""
import json
import os
import pathlib
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import chat
import data
import dpo
import logprobs
import tasks
import tokenizer
from model import CONFIGS, Transformer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_dpo(*args, timeout=600):
    """dpo.py in a subprocess on one CPU device, as a user runs it."""
    return subprocess.run([sys.executable, "dpo.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "XLA_FLAGS": ""})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def by_step(out, key) -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics(out) if key in m}


# ----------------------------------------------------------------------------- the losses against TRL v1

def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def trl_dpo_loss(loss_type, c, r, c0, r0, nc, nr, nll, beta, eps, tau=0.05, f="reverse_kl", alpha=0.5, w=None):
    """trl/trainer/dpo_trainer.py::_compute_loss (TRL v1, f2cd577), one loss type, line by line in numpy:
    c r c0 r0 summed log-probs, nc nr completion lengths, nll the batch's chosen-token cross-entropy."""
    chosen_logratios, rejected_logratios = c - c0, r - r0
    if f == "reverse_kl":
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    elif f == "forward_kl":
        chosen_scores, rejected_scores = -np.exp(-chosen_logratios), -np.exp(-rejected_logratios)
    elif f == "js_divergence":
        chosen_scores, rejected_scores = log_sigmoid(chosen_logratios), log_sigmoid(rejected_logratios)
    else:
        coef = 1.0 / (alpha - 1.0)
        chosen_scores = np.exp(np.minimum((alpha - 1.0) * chosen_logratios, 80.0)) * coef
        rejected_scores = np.exp(np.minimum((alpha - 1.0) * rejected_logratios, 80.0)) * coef
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        per_sequence_loss = -log_sigmoid(beta * delta_score)
    elif loss_type == "hinge":
        per_sequence_loss = np.maximum(0, 1 - beta * delta_score)
    elif loss_type == "ipo":
        ipo_delta = chosen_scores / np.maximum(nc, 1.0) - rejected_scores / np.maximum(nr, 1.0)
        per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        qw, log_qw = sigmoid(beta * delta_score), log_sigmoid(beta * delta_score)
        ql, log_ql = sigmoid(-beta * delta_score), log_sigmoid(-beta * delta_score)
        per_sequence_loss = qw * (log_qw - np.log1p(-eps)) + ql * (log_ql - np.log(eps))
    elif loss_type == "nca_pair":
        cr, rr = beta * chosen_scores, beta * rejected_scores
        per_sequence_loss = -log_sigmoid(cr) - 0.5 * log_sigmoid(-cr) - 0.5 * log_sigmoid(-rr)
    elif loss_type == "robust":
        clean = -(1 - eps) * log_sigmoid(beta * delta_score)
        flipped = -eps * log_sigmoid(-beta * delta_score)
        per_sequence_loss = (clean - flipped) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        per_sequence_loss = -log_sigmoid(beta * chosen_scores) - log_sigmoid(-beta * rejected_scores)
    elif loss_type == "sppo_hard":
        per_sequence_loss = (chosen_scores - 0.5 / beta) ** 2 + (rejected_scores + 0.5 / beta) ** 2
    elif loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            delta = np.sort(c - r) - np.sort(c0 - r0)
        else:
            delta = np.sort(chosen_logratios) - np.sort(rejected_logratios)
        per_sequence_loss = -log_sigmoid(beta * delta) * (1 - eps) - log_sigmoid(-beta * delta) * eps
    elif loss_type == "apo_zero":
        per_sequence_loss = (1 - sigmoid(beta * chosen_logratios)) + sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        per_sequence_loss = sigmoid(beta * chosen_logratios) + (1 - sigmoid(beta * delta_score))
    elif loss_type == "discopop":
        logits = delta_score * beta
        modulation = sigmoid(logits / tau)
        per_sequence_loss = -log_sigmoid(logits) * (1 - modulation) + np.exp(-logits) * modulation
    elif loss_type == "sft":
        per_sequence_loss = np.full_like(c, nll)
    elif loss_type == "sigmoid_norm":
        chosen_avg, rejected_avg = chosen_scores / np.maximum(nc, 1.0), rejected_scores / np.maximum(nr, 1.0)
        per_sequence_loss = -log_sigmoid(beta * (chosen_avg - rejected_avg))
    if w is not None:
        per_sequence_loss = per_sequence_loss * w
    return per_sequence_loss.mean()


def trl_reference_free_loss(loss_type, c, r, nc, nr, nll, beta, eps, gamma=0.5, cpo_alpha=1.0):
    """CPOTrainer.cpo_loss (+ cpo_alpha · NLL) and ORPOTrainer.odds_ratio_loss (NLL − mean(β log σ(log odds))),
    trl/experimental/{cpo,orpo}, in numpy; simpo and orpo see length-averaged log-probs."""
    if loss_type == "orpo":
        pc, pr = c / nc, r / nr
        log1mexp = lambda x: np.where(x < -0.6931471805599453, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))  # noqa: E731
        log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
        return nll - (beta * log_sigmoid(log_odds)).mean()
    logits = (c / nc - r / nr) if loss_type == "simpo" else (c - r)
    if loss_type == "simpo":
        logits = logits - gamma / beta
    losses = -log_sigmoid(beta * logits) * (1 - eps) - log_sigmoid(-beta * logits) * eps
    return losses.mean() + cpo_alpha * nll


def fixed_pairs(seed=0, b=6):
    rng = np.random.default_rng(seed)
    nc, nr = rng.integers(1, 9, b).astype(np.float32), rng.integers(1, 9, b).astype(np.float32)
    c, r = -rng.uniform(0.2, 3, b) * nc, -rng.uniform(0.2, 3, b) * nr
    c0, r0 = c + rng.normal(0, 1, b), r + rng.normal(0, 1, b)
    return [np.asarray(a, np.float32) for a in (c, r, c0, r0, nc, nr)]


def cfg_for(loss_type, **kw):
    return dpo.Config(loss_type=loss_type, **{"warmup_sft_steps": 0, **kw})


@pytest.mark.parametrize("f", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", [n for n, loss in dpo.LOSSES.items() if not loss.reference_free])
def test_every_loss_is_trls(loss_type, f):
    c, r, c0, r0, nc, nr = fixed_pairs()
    nll, eps = 1.7, 0.1 if loss_type != "sigmoid" else 0.0
    cfg = cfg_for(loss_type, beta=0.3, label_smoothing=eps, f_divergence_type=f, f_alpha_divergence_coef=0.3)
    q = dpo.pairs(*map(jnp.asarray, (c, r, c0, r0, nc, nr)), jnp.full(len(c), nll), cfg)
    got = float(jnp.mean(dpo.LOSSES[loss_type].per_pair(q, cfg)))
    want = trl_dpo_loss(loss_type, c.astype(np.float64), r, c0, r0, nc, nr, nll, 0.3, eps, f=f, alpha=0.3)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type,eps", [("simpo", 0.0), ("simpo", 0.1), ("cpo", 0.0), ("cpo", 0.2), ("orpo", 0.0)])
def test_every_reference_free_loss_is_trls(loss_type, eps):
    c, r, _, _, nc, nr = fixed_pairs(1)
    cfg = cfg_for(loss_type, beta=0.5, label_smoothing=eps, simpo_gamma=0.7, cpo_alpha=0.4)
    q = dpo.pairs(jnp.asarray(c), jnp.asarray(r), 0 * c, 0 * r, jnp.asarray(nc), jnp.asarray(nr), jnp.full(len(c), 1.3), cfg)
    got = float(jnp.mean(dpo.LOSSES[loss_type].per_pair(q, cfg)))
    want = trl_reference_free_loss(loss_type, c.astype(np.float64), r, nc, nr, 1.3, 0.5, eps, 0.7, 0.4)
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_log1mexp_is_stable_on_both_sides():
    x = jnp.array([-1e-6, -0.1, -0.69, -0.7, -5.0, -50.0])
    np.testing.assert_allclose(dpo.log1mexp(x), np.log(-np.expm1(np.float64(x))), rtol=1e-5, atol=1e-20)


def test_the_sigmoid_gradient_is_its_closed_form():
    """∂/∂c of −log σ(β(ρ⁺ − ρ⁻)) = −β σ(−βΔ), and the opposite for r."""
    c, r, c0, r0, nc, nr = map(jnp.asarray, fixed_pairs(2))
    cfg = cfg_for("sigmoid", beta=0.2)
    loss = lambda c, r: jnp.sum(dpo.LOSSES["sigmoid"].per_pair(dpo.pairs(c, r, c0, r0, nc, nr, 0 * c, cfg), cfg))  # noqa: E731
    g_c, g_r = jax.grad(loss, (0, 1))(c, r)
    want = -0.2 * jax.nn.sigmoid(-0.2 * ((c - c0) - (r - r0)))
    np.testing.assert_allclose(g_c, want, rtol=1e-5)
    np.testing.assert_allclose(g_r, -want, rtol=1e-5)


def test_wpo_weights_and_ld_alpha_are_trls():
    """use_weighting multiplies each pair's loss by w⁺w⁻, w = exp(mean_t[log π(y_t) − log Σ_v π(v)²]); ld_alpha
    scales the tokens past the shorter answer (TRL v1's comp_pos / shared_lens masks)."""
    rng = np.random.default_rng(3)
    logp, mask = rng.uniform(-3, 0, (4, 5)).astype(np.float32), np.array(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], np.float32)
    got = dpo.sequence_logps(dpo.as_pairs(jnp.asarray(logp)), dpo.as_pairs(jnp.asarray(mask)), 0.25).reshape(-1)
    comp_pos, lens = np.cumsum(mask, 1), mask.sum(1)
    shared = np.repeat(np.minimum(lens[0::2], lens[1::2]), 2)[:, None]
    shared_mask, tail_mask = (comp_pos > 0) & (comp_pos <= shared), comp_pos > shared
    want = (logp * mask * shared_mask).sum(1) + 0.25 * (logp * mask * tail_mask).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(dpo.sequence_logps(dpo.as_pairs(jnp.asarray(logp)), dpo.as_pairs(jnp.asarray(mask)), None)
                               .reshape(-1), (logp * mask).sum(1))


# ----------------------------------------------------------------------------- the forward pass

def random_pairs(n=3, seed=0, tok=None):
    """n text pairs of random lengths (byte tokenizer): (prompt, chosen, rejected) ids."""
    tok, rng = tok or tokenizer.ByteTokenizer(), np.random.default_rng(seed)
    return [data.tokenize_pair({"prompt": "q" * int(rng.integers(1, 9)) + "=", "chosen": "a" * int(rng.integers(1, 6)),
                                "rejected": "b" * int(rng.integers(1, 7))}, tok, None) for _ in range(n)]


def local_batch(pairs, ref=None):
    """dpo.pair_batch's arrays for one micro-batch, on the default device."""
    return {k: jnp.asarray(v) for k, v in data.pair_batch(pairs, ref, 0).items()}


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-gemma3"])
def test_the_shared_prompt_forward_gives_the_same_logps_and_gradients(preset):
    """A pair's prompt runs once for both answers (group 2): the answers' log-probs and the parameters'
    gradients equal those of running each row whole."""
    model = Transformer(CONFIGS[preset], nnx.Rngs(1))
    batch = local_batch(random_pairs(n=3))
    graphdef, params = nnx.split(model)
    C = batch["mask"].shape[-1]

    def objective(p, whole):
        logp = dpo.answer_stats(nnx.merge(graphdef, p), batch, orpo=whole)[0][0][:, -C:]
        return jnp.sum(logp * batch["mask"] * jnp.arange(1, 7)[:, None]), logp
    (_, shared), g_shared = jax.value_and_grad(objective, has_aux=True)(params, False)
    (_, whole), g_whole = jax.value_and_grad(objective, has_aux=True)(params, True)
    m = np.asarray(batch["mask"]) > 0
    np.testing.assert_allclose(np.asarray(shared)[m], np.asarray(whole)[m], atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_shared)):
        np.testing.assert_allclose(b, a, atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-7)


def test_chunked_logps_equal_unchunked(monkeypatch):
    model = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(2))
    batch = local_batch(random_pairs(n=4, seed=1))
    graphdef, params = nnx.split(model)
    cfg = cfg_for("sigmoid,sft", use_weighting=True)

    def run():
        return jax.value_and_grad(lambda p: dpo.dpo_loss(nnx.merge(graphdef, p), batch, cfg)[0])(params)
    loss, grads = run()
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 8 * 259 * 4)  # 8 positions per chunk
    assert logprobs.chunk_rows(int(batch["mask"].size), 259)[0] > 1
    loss_c, grads_c = run()
    np.testing.assert_allclose(loss_c, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
        np.testing.assert_allclose(b, a, atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-7)


def test_policy_equal_to_reference_gives_log2_and_zero_margins():
    """π_θ = π_ref: every ρ is 0, the sigmoid loss is log 2, rewards and margins 0; and the logged
    per-token numbers are the model's own (mean logit, top-1 accuracy)."""
    model = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(3))
    pairs = random_pairs(n=4, seed=2)
    batch = local_batch(pairs)
    ref = dpo.sequence_logps(dpo.as_pairs(dpo.answer_stats(model, batch)[0][0]), dpo.as_pairs(batch["mask"]), None)
    ref = ref.reshape(-1)  # rows 2i, 2i + 1 as the batch holds them
    loss, aux = dpo.dpo_loss(model, {**batch, "ref_logps": ref}, cfg_for("sigmoid"))
    metrics = dpo.summarise(jax.device_get(aux))
    np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)
    assert abs(metrics["rewards/margins"]) < 1e-6 and abs(metrics["rewards/chosen"]) < 1e-6
    assert metrics["rewards/accuracies"] == 0.0  # no pair's reward is strictly higher
    logits = model(batch["tokens"][:, :-1], positions=batch["positions"][:, :-1],
                   segment_ids=batch["segment_ids"][:, :-1])[:, -batch["mask"].shape[1]:]  # [2b, C, V]
    chosen = np.asarray(batch["mask"][0::2]) > 0
    targets = np.asarray(batch["tokens"][0::2, -batch["mask"].shape[1]:])
    np.testing.assert_allclose(metrics["logits/chosen"], np.asarray(logits[0::2].mean(-1))[chosen].mean(), rtol=1e-5)
    hits = (np.asarray(logits[0::2]).argmax(-1) == targets)[chosen]
    assert metrics["mean_token_accuracy"] == pytest.approx(hits.mean())


# ----------------------------------------------------------------------------- data

class MergingTokenizer(tokenizer.ByteTokenizer):
    """Bytes, except that `merge` (two characters) becomes one token: a tokenizer whose tokens for a
    prompt are not always a prefix of the tokens for prompt + answer."""
    def __init__(self, merge: str):
        self.merge = merge

    def encode(self, text, add_bos=True):
        ids, i = ([self.bos_id] if add_bos else []), 0
        while i < len(text):
            if text.startswith(self.merge, i):
                ids, i = ids + [258], i + 2
            else:
                ids, i = ids + [ord(text[i]) % 256], i + 1
        return ids


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_are_read_in_trls_formats(tmp_path):
    tok = tokenizer.ByteTokenizer()
    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},  # the shared start is the prompt
            {"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
             "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]}]
    assert data.preference_row(rows[1], "x") == rows[0]  # TRL's extract_prompt keeps the space with the answers
    assert data.preference_row(rows[2], "x") == {"prompt": rows[2]["chosen"][:1], "chosen": rows[2]["chosen"][1:],
                                                 "rejected": rows[2]["rejected"][1:]}
    train, _, _ = data.preference_data(tok, "qwen3", write_jsonl(tmp_path / "p.jsonl", rows), None, "*,3,1", 1, 1, 0)
    eos = tok.eos_ids[0]
    assert train[0] == (tok.encode("The sky is"), tok.encode(" blue.", add_bos=False) + [eos],
                        tok.encode(" green.", add_bos=False) + [eos]) == train[1]
    prompt = chat.apply_chat_template([{"role": "user", "content": "Sky?"}], "qwen3")
    full = chat.apply_chat_template(rows[2]["chosen"], "qwen3", add_generation_prompt=False)
    assert train[2][0] == tok.encode(prompt, add_bos=False) and tok.decode(train[2][1]) == full[len(prompt):]


@pytest.mark.parametrize("row,merge", [
    ({"prompt": "xa", "chosen": "b", "rejected": "c"}, "ab"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "Yes"}],
      "rejected": [{"role": "assistant", "content": "No"}]}, "\nY"),
])
def test_a_prompt_that_is_not_a_token_prefix_is_an_error_naming_the_line(tmp_path, row, merge):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": " 1", "rejected": " 2"}, row])
    with pytest.raises(data.DataError, match=r"p.jsonl:2: the prompt's tokens are not a prefix of prompt \+ chosen"):
        data.preference_data(MergingTokenizer(merge), "gemma3", path, None, "*,3,1", 1, 1, 0)


def test_max_len_keeps_the_start_and_drops_what_cannot_train():
    pairs = [([1, 2], [3, 4, 5], [3, 4, 6]), ([1, 2, 3, 4], [5], [6]), ([1], [2, 3, 4], [2, 3, 5]), ([1, 2], [3], [4])]
    kept, dropped = data.truncate_pairs(pairs, 4)
    assert kept == [([1], [2, 3, 4], [2, 3, 5]), ([1, 2], [3], [4])]  # the first pair's answers cut to [3, 4]
    assert dropped == {"prompt_too_long": 1, "identical": 1}


def test_the_built_in_pairs_are_right_against_one_digit_wrong():
    tok = tokenizer.ByteTokenizer()
    train, evals, rows = data.preference_data(tok, None, None, None, "*,3,1", 50, 20, 0)
    task = tasks.builtin_task("*,3,1")
    for prompt, chosen, rejected in train + evals:
        p, c, r = tok.decode(prompt), tok.decode(chosen), tok.decode(rejected)
        assert task.is_correct(p, c) and not task.is_correct(p, r)
        assert len(c) == len(r) and sum(a != b for a, b in zip(c, r)) == 1
    assert [tok.decode(p) for p, _, _ in evals] == [r["prompt"] for r in rows] and len(rows) == 20


# ----------------------------------------------------------------------------- the reference

def test_cached_arrays_are_reused_and_invalidated(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"train": np.arange(6.0).reshape(3, 2)}
    import run
    a = run.cached_arrays(tmp_path, ["k", np.arange(3)], compute)
    b = run.cached_arrays(tmp_path, ["k", np.arange(3)], compute)
    c = run.cached_arrays(tmp_path, ["k", np.arange(4)], compute)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.npz"))) == 2
    np.testing.assert_array_equal(a["train"], b["train"])
    np.testing.assert_array_equal(a["train"], c["train"])


SMALL = ["--warmup-sft-steps", "0", "--train-examples", "64", "--eval-examples", "6", "--batch-size", "8",
         "--steps", "4", "--log-every", "1", "--eval-every", "4", "--save-every", "2", "--lr", "1e-3"]


def test_precomputed_reference_equals_the_live_one_and_is_cached(tmp_path):
    cache = ["--ref-cache", str(tmp_path / "cache")]
    live = run_dpo(*SMALL, "--out", str(tmp_path / "live"))
    first = run_dpo(*SMALL, *cache, "--precompute-ref-log-probs", "--out", str(tmp_path / "pre"))
    again = run_dpo(*SMALL, *cache, "--precompute-ref-log-probs", "--out", str(tmp_path / "again"))
    other = run_dpo(*SMALL, *cache, "--precompute-ref-log-probs", "--max-len", "9", "--out", str(tmp_path / "other"))
    for r in (live, first, again, other):
        assert r.returncode == 0, r.stderr[-2000:]
    assert "reference log-probs: computed" in first.stderr and "reference log-probs: read from" in again.stderr
    assert "reference log-probs: computed" in other.stderr  # another max_len, other pairs: another key
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    for key in ("loss", "rewards/margins", "rewards/chosen", "eval/rewards/accuracies", "eval/loss"):
        want = by_step(tmp_path / "live", key)
        for run in ("pre", "again"):
            got = by_step(tmp_path / run, key)
            assert got.keys() == want.keys() and len(want) >= 1, key
            np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-4, atol=1e-6)


def test_lora_dpo_keeps_one_copy_of_the_base(tmp_path):
    """With --lora the live reference is the adapters zeroed (the base is shared, not copied), and it
    scores as the base model does."""
    seen = []
    real = dpo.reference_logps

    def spy(graphdef, cfg):
        fn = real(graphdef, cfg)

        def call(ref_params, frozen, batch):
            seen.append((ref_params, frozen, graphdef))
            return fn(ref_params, frozen, batch)
        return call
    with mock.patch.object(dpo, "reference_logps", spy):
        dpo.main([*SMALL, "--lora", "--steps", "2", "--out", str(tmp_path / "run")])
    ref_params, frozen, graphdef = seen[-1]
    leaves = jax.tree.leaves(ref_params)
    n_base = sum(x.size for x in jax.tree.leaves(frozen))
    assert leaves and all(isinstance(x, jax.Array) and not jnp.any(x) for x in leaves)
    assert sum(x.size for x in leaves) < 0.2 * n_base  # adapter-sized, not a copy of the base
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "hf" / "config.json").is_file()


def test_tr_dpo_moves_the_reference_toward_the_policy(tmp_path):
    r = run_dpo(*SMALL, "--sync-ref-model", "--ref-model-sync-steps", "2", "--ref-model-mixup-alpha", "1.0",
                "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    margins = by_step(tmp_path / "run", "rewards/margins")
    # α = 1: after step 2 the reference is the policy, so step 3 starts from a zero margin up to one update
    assert abs(margins[3]) < abs(margins[2]) or abs(margins[3]) < 1e-3, margins


# ----------------------------------------------------------------------------- runs

def test_mesh_4x2_logs_the_single_device_metrics(tmp_path):
    """The same run on 8 devices (fsdp 4 x tp 2, a pair's two rows kept together on a device) logs the
    one-device numbers."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    runs = {name: subprocess.Popen([sys.executable, "dpo.py", *SMALL, "--steps", "2", "--mesh", mesh,
                                    "--out", str(tmp_path / name)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, env=env)
            for name, mesh in (("one", "fsdp=1,tp=1"), ("eight", "fsdp=4,tp=2"))}
    stderr = {name: proc.communicate(timeout=600)[1] for name, proc in runs.items()}
    assert all(proc.returncode == 0 for proc in runs.values()), {k: v[-1000:] for k, v in stderr.items()}
    assert "'fsdp': 4, 'tp': 2" in stderr["eight"]
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "eval/loss", "eval/rewards/accuracies"):
        a, b = by_step(tmp_path / "one", key), by_step(tmp_path / "eight", key)
        assert sorted(a) == sorted(b) and len(a) >= 1, key
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-4 * max(1.0, abs(a[step])), (key, step, a[step], b[step])


@pytest.mark.parametrize("loss_type", ["orpo", "simpo", "ipo,sft"])
def test_every_family_runs_end_to_end(tmp_path, loss_type):
    r = run_dpo(*SMALL, "--loss-type", loss_type, "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    last = metrics(tmp_path / "run")[-1]
    assert np.isfinite(last["loss"]) and "eval/rewards/accuracies" in last
    assert "nll_loss" in last and ("log_odds_ratio" in last) == (loss_type == "orpo")  # each has an NLL term


def error_line(capsys, tmp_path, *args) -> str:
    """dpo.main in this process: the one-line error it exits with."""
    with pytest.raises(SystemExit) as e:
        dpo.main([*args, "--train-examples", "50", "--out", str(tmp_path / "run")])
    assert e.value.code not in (0, None)
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    lines = [line for line in message.strip().splitlines() if not line.startswith("warning")]
    assert len(lines) == 1 and lines[0].startswith("error: "), message
    return lines[0]


@pytest.mark.parametrize("content,message", [
    (b'{"prompt": "a", "chosen": "b"}\n', "bad.jsonl:1: expected keys 'chosen' and 'rejected'"),
    (b'{"prompt": "a", "chosen": "b", "rejected": 3}\n', "bad.jsonl:1: 'prompt', 'chosen' and 'rejected' must all"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{nope\n', "bad.jsonl:2: bad JSON"),
    (b'{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}], '
     b'"rejected": [{"role": "assistant", "content": "c"}]}\n', "bad.jsonl:1: chat pairs need a checkpoint"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "b"}\n', "no training pairs left"),
    (b'', "bad.jsonl: empty file"),
])
def test_bad_data_is_one_clear_line(capsys, tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    assert message in error_line(capsys, tmp_path, "--data", str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("args,message", [
    (["--loss-type", "kto"], "unknown --loss-type kto"),
    (["--loss-type", "sigmoid,orpo"], "simpo, cpo and orpo are used alone"),
    (["--loss-type", "sigmoid,sft", "--loss-weights", "1"], "--loss-weights has 1 weights for 2 loss types"),
    (["--loss-weights", "a"], "--loss-weights must be comma-separated numbers"),
    (["--loss-type", "exo_pair"], "exo_pair needs --label-smoothing > 0"),
    (["--label-smoothing", "0.5"], "0 <= --label-smoothing < 0.5"),
    (["--f-divergence-type", "kl"], "--f-divergence-type must be one of"),
    (["--sync-ref-model", "--lora"], "--sync-ref-model needs a full reference"),
    (["--quant", "nf4"], "--quant stores the frozen base of --lora"),
    (["--batch-size", "6", "--grad-accum", "4"], "multiple of --grad-accum"),
    (["--model", "gpt5"], "unknown model preset 'gpt5'"),
    (["--tpu"], "no TPU"),
])
def test_bad_flags_are_one_clear_line(capsys, tmp_path, args, message):
    assert message in error_line(capsys, tmp_path, *args)


@pytest.mark.slow
def test_default_run_learns_from_pairs(tmp_path):
    """The default dpo.py run: greedy held-out accuracy up by ≥ 0.10 and ≥ 0.92 of held-out pairs told apart.
    Measured at step 500 in six runs (seeds 0-2; 1 and 2 cores; with and without model.softmax):
    eval/rewards/accuracies 0.945-0.973 (it climbs 0.91 → 0.95 over steps 200-500, so a bar at 0.95 failed three
    of the six), eval/accuracy +0.26 to +0.36 (seeds 0-2 with model.softmax)."""
    start = time.time()
    r = run_dpo("--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warm-up: supervised steps until" in r.stderr and "warm-up done" in r.stderr
    accuracy, pairs = by_step(tmp_path / "run", "eval/accuracy"), by_step(tmp_path / "run", "eval/rewards/accuracies")
    first, last = accuracy[0], accuracy[max(accuracy)]
    print(f"\ndefault dpo: eval/accuracy {first} -> {last}, eval/rewards/accuracies {pairs[max(pairs)]} "
          f"in {time.time() - start:.0f} s")
    assert first < 0.7  # the warm-up leaves room to learn
    assert last - first >= 0.10, accuracy
    assert pairs[max(pairs)] >= 0.92, pairs
