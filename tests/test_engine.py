"""engine.py, the continuous-batching decoder, against sample.generate: the same greedy ids and log-probs on
ragged batches that end at different steps, for every family; sampled ids that depend on the request alone
(not the slot count, not the arrival order); a group's shared prompt prefilled once."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ckpt
import engine
import sample
from hf_models import FAMILIES, make_hf_model, save_hf_model
from model import CONFIGS, Transformer


def ragged_prompts(count=11, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, rng.integers(1, 30)).tolist() for _ in range(count)]


def model_for(name):
    return Transformer(CONFIGS[name], nnx.Rngs(0))


def end_ids(model, prompts, max_new_tokens):
    """Stop ids that end the greedy rows at different steps: the tokens some rows make early on."""
    free = sample.generate(model, prompts, max_new_tokens=max_new_tokens, eos_ids=())
    ids = {row[2] for row in free[::3]} | {row[9] for row in free[1::4]}
    ends = sorted(ids - {row[0] for row in free})[:4]  # not a first token: each row makes at least one more
    assert ends, free
    return tuple(ends)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_and_logprobs_equal_generate_on_ragged_batches(family, tmp_path):
    """Tiny random models of every family with their awkward settings on (hf_models.py: sliding windows of 16,
    shorter than prompt + completion; soft-caps); sample.generate's greedy ids equal transformers' there."""
    model, prompts = ckpt.load_hf(save_hf_model(make_hf_model(family, seed=1), tmp_path / family)), ragged_prompts()
    if family.startswith("gemma"):  # its sqrt(D)-scaled embedding swamps a random model's blocks: rows would repeat
        model.embed[...] = model.embed[...] / 8  # one token, and end at step 1 or never
    eos = end_ids(model, prompts, 24)
    want, want_lp = sample.generate(model, prompts, max_new_tokens=24, eos_ids=eos, return_logprobs=True)
    lengths = {len(row) for row in want}
    assert len(lengths) >= 3 and max(lengths) == 24, lengths  # rows end at different steps, some at the limit
    eng = engine.Engine(model, slots=4, max_new_tokens=24, max_prompt_len=32, chunk=4, eos_ids=eos)
    got, got_lp = eng.generate(prompts, return_logprobs=True)
    assert got == want
    np.testing.assert_allclose(np.concatenate(got_lp), np.concatenate(want_lp), atol=2e-5, rtol=1e-5)
    assert eng.stats["prefills"] >= 3  # 11 requests through 4 slots: freed slots were refilled


def run_in_order(eng, prompts, order, **sampling):
    """Requests added in `order` (request r keeps index r): each request's ids, by r."""
    rids = {eng.add(prompts[r], index=r, **sampling): r for r in order}
    got = {r: [] for r in order}
    while eng.busy():
        for update in eng.step():
            got[rids[update.request]] += update.ids
    return [got[r] for r in range(len(prompts))]


def test_sampled_ids_depend_on_the_request_alone():
    model, prompts = model_for("tiny-qwen3"), ragged_prompts(13, seed=1)
    sampling = dict(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=20)
    runs = [run_in_order(engine.Engine(model, slots=s, max_new_tokens=20, max_prompt_len=32, chunk=3), prompts,
                         range(len(prompts)), **sampling) for s in (2, 4, 8)]
    runs.append(run_in_order(engine.Engine(model, slots=4, max_new_tokens=20, max_prompt_len=32, chunk=3), prompts,
                             [7, 0, 12, 3, 1, 11, 2, 10, 4, 9, 5, 8, 6], **sampling))
    assert runs[0] == runs[1] == runs[2] == runs[3]
    other_seed = run_in_order(engine.Engine(model, slots=4, max_new_tokens=20, max_prompt_len=32, chunk=3), prompts,
                              range(len(prompts)), **{**sampling, "seed": 8})
    assert other_seed != runs[0]
    # sampling is sampling: a random tiny model at temperature 1 rarely repeats its greedy answer
    greedy = engine.Engine(model, slots=4, max_new_tokens=20, max_prompt_len=32, chunk=3).generate(prompts)
    assert sum(a != b for a, b in zip(runs[0], greedy)) >= len(prompts) // 2


def test_requests_keep_their_own_settings_in_one_decode():
    """Greedy, sampled, nucleus-cut and short requests side by side: each as if alone."""
    model, prompts = model_for("tiny-gemma3"), ragged_prompts(6, seed=2)
    greedy = sample.generate(model, prompts, max_new_tokens=16, eos_ids=())
    settings = [dict(), dict(temperature=1e-4), dict(temperature=1.0, top_p=1e-6), dict(max_new_tokens=3),
                dict(temperature=1.0, seed=5), dict(temperature=0.7, top_p=0.8, seed=5)]
    eng = engine.Engine(model, slots=3, max_new_tokens=16, max_prompt_len=32, chunk=4, eos_ids=())
    together = {}
    rids = [eng.add(p, **s) for p, s in zip(prompts, settings)]
    while eng.busy():
        for update in eng.step():
            together.setdefault(update.request, []).extend(update.ids)
    got = [together[r] for r in rids]
    assert got[0] == greedy[0]
    assert got[1] == greedy[1]  # temperature near 0 is greedy
    assert got[2] == greedy[2]  # a nucleus of one token is greedy
    assert got[3] == greedy[3][:3]  # its own limit
    for i in (4, 5):  # sampled: the same as alone in an engine of one slot
        alone = engine.Engine(model, slots=1, max_new_tokens=16, max_prompt_len=32, eos_ids=())
        assert run_in_order(alone, [prompts[i]], [0], **settings[i]) == [got[i]]


def test_a_groups_prompt_is_prefilled_once():
    model = model_for("tiny-qwen3")
    prompts = [p for p in ragged_prompts(4, seed=3) for _ in range(4)]  # GRPO's layout: each prompt G = 4 times
    eng = engine.Engine(model, slots=16, max_new_tokens=12, max_prompt_len=32, eos_ids=())
    outs = eng.generate(prompts, temperature=1.0, seed=0)
    assert eng.stats["prefills"] == 1 and all(len(o) == 12 for o in outs)
    assert len({tuple(o) for o in outs[:4]}) > 1  # a group's rows draw apart


def test_bad_requests_are_refused():
    eng = engine.Engine(model_for("tiny-qwen3"), slots=2, max_new_tokens=8, max_prompt_len=16)
    for bad in [dict(prompt=[1] * 17), dict(prompt=[]), dict(prompt=[1], max_new_tokens=9),
                dict(prompt=[1], temperature=-1.0), dict(prompt=[1], top_p=0.0)]:
        with pytest.raises(ValueError):
            eng.add(bad.pop("prompt"), **bad)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.9)])
def test_each_rows_draw_follows_its_filtered_distribution(temperature, top_k, top_p):
    """engine.pick, each row with its own key: frequencies over 6000 rows of one distribution against it
    (temperature, then top-k, then the nucleus, as transformers orders them); Pearson chi-square, fixed seed."""
    logits = np.asarray(np.random.default_rng(0).normal(size=259) * 3.0)
    p = np.exp(logits / temperature - (logits / temperature).max())
    p /= p.sum()
    order, keep = np.argsort(-p), np.ones(259, bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        pk = np.where(keep, p, 0.0) / p[keep].sum()
        keep[order[np.cumsum(pk[order]) - pk[order] >= top_p]] = False
    q = np.where(keep, p, 0.0) / p[keep].sum()
    n = 6000
    keys = jax.random.split(jax.random.key(3), n)
    ids, lps = jax.jit(engine.pick, static_argnums=5)(jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1)), keys,
                                                      jnp.zeros(n, jnp.int32), jnp.full(n, temperature),
                                                      jnp.full(n, top_p), top_k)
    counts = np.bincount(np.asarray(ids), minlength=259)
    assert counts[~keep].sum() == 0
    np.testing.assert_allclose(np.asarray(lps), np.log(p[np.asarray(ids)]), atol=1e-4)  # before the cuts
    expected = n * q
    big = expected >= 5
    obs = np.r_[counts[big], counts[~big & keep].sum()]
    exp = np.r_[expected[big], expected[~big & keep].sum()]
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2, dof = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof) + 10, (chi2, dof)
