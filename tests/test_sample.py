"""sample.py: greedy ids against transformers' generate(), the sampling distribution, and the CLI."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import chat
import ckpt
import int8head
import sample
import tokenizer
from hf_models import FAMILIES, make_hf_model, save_hf_model
from model import CONFIGS, Transformer

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def hf_greedy(hf, prompts, max_new_tokens, pad_id, eos_id=None):
    """transformers' generate(do_sample=False) on a left-padded ragged batch."""
    P = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=pad_id, eos_token_id=eos_id, min_new_tokens=0)
    rows = []
    for row in out[:, P:].tolist():
        if eos_id in row:
            row = row[:row.index(eos_id) + 1]
        rows.append(row)
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(family, tmp_path):
    hf = make_hf_model(family, seed=1)
    ours = ckpt.load_hf(save_hf_model(hf, tmp_path / family))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, n).tolist() for n in (5, 17, 11)]  # ragged; + 24 new > window 16
    expected = hf_greedy(hf, prompts, 24, pad_id=0)
    assert sample.generate(ours, prompts, max_new_tokens=24, eos_ids=()) == expected


def test_greedy_stops_after_eos_like_transformers(tmp_path):
    hf = make_hf_model("qwen3", seed=2)
    ours = ckpt.load_hf(save_hf_model(hf, tmp_path / "q"))
    prompts = [[5, 9, 33], [7, 8, 9, 10, 11, 12, 13]]
    free = sample.generate(ours, prompts, max_new_tokens=20, eos_ids=())
    eos = free[0][6]  # a token the first row emits mid-way: make it the end-of-sequence token
    got = sample.generate(ours, prompts, max_new_tokens=20, eos_ids=(eos,))
    assert got == hf_greedy(hf, prompts, 20, pad_id=0, eos_id=eos)
    assert got[0][-1] == eos and len(got[0]) <= 7


def test_real_gemma3_greedy_matches_transformers(gemma3_dir):
    tok = tokenizer.load_tokenizer(gemma3_dir)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
             "1, 2, 3, 4,"]
    prompts = [tok.encode(t) for t in texts]
    hf = transformers.AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32)
    expected = hf_greedy(hf, prompts, 24, pad_id=tok.pad_id, eos_id=1)
    del hf
    model = ckpt.load_hf(gemma3_dir)
    for int8 in (True, False):  # the int8 head's ids are the float head's
        ours = sample.generate(model, prompts, max_new_tokens=24, int8=int8)
        assert ours == expected
    assert tok.decode(ours[0]).startswith(" the capital of the country of France. It is")
    kw = dict(max_new_tokens=24, temperature=0.8, seed=2)
    assert sample.generate(model, prompts, int8=True, **kw) == sample.generate(model, prompts, int8=False, **kw)


def test_real_gemma3_int8_candidates_fit_and_hold_the_winner(gemma3_dir):
    """On real hidden states the bound is tight enough that the int8 path (not the fallback) runs,
    and the exact winner is always among its candidates."""
    tok, model = tokenizer.load_tokenizer(gemma3_dir), ckpt.load_hf(gemma3_dir)
    texts = ["The capital of France is Paris, and the capital of Germany is Berlin. Many people visit",
             "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
             "Once upon a time, in a small village by the sea, there lived an old fisherman who",
             "12 + 35 = 47. 128 * 4 = 512. The square root of 144 is 12, and"]
    head8 = int8head.cached(model)
    fits_seen = []
    for i, text in enumerate(texts):
        hidden = model(jnp.asarray([tok.encode(text)]), hidden=True)[0]  # [T, D]
        for temperature in (0.0, 1.0):
            V = model.cfg.vocab_size
            noise = jnp.zeros((len(hidden), V)) if temperature == 0 else \
                jax.random.gumbel(jax.random.key(i), (len(hidden), V))
            for row in range(0, len(hidden), 4):  # the int8 path runs at <= 4 rows
                x, g = hidden[row:row + 4], noise[row:row + 4]
                cand, fits = int8head.candidates(model, x, head8, g, temperature)
                fits_seen.append(bool(fits))
                if fits:
                    for r, w in enumerate(exact_winners(model, x, g, temperature)):
                        assert w in np.asarray(cand[r])
    assert np.mean(fits_seen) >= 0.9, np.mean(fits_seen)


# ----------------------------------------------------------------------------- the int8 output head

@pytest.mark.parametrize("family", FAMILIES)
def test_int8_head_picks_the_float_heads_ids(family, tmp_path):
    """A vocabulary of 8192 (far more than the 16 x 64 ids scored exactly), so both the int8 bound
    and its fallback run; Gemma 2's final soft-cap included."""
    hf = make_hf_model(family, seed=3, vocab_size=8192)
    ours = ckpt.load_hf(save_hf_model(hf, tmp_path / family))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 8000, n).tolist() for n in (5, 17, 11)]
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=20, eos_ids=(), temperature=temperature, seed=5)
        assert sample.generate(ours, prompts, int8=True, **kw) == sample.generate(ours, prompts, int8=False, **kw)


def exact_winners(model, x, noise, temperature):
    logits = np.asarray(model.logits(x[:, None])[:, 0], np.float64)
    return np.argmax(logits / (temperature or 1.0) + np.asarray(noise), axis=-1)


def test_int8_candidates_hold_every_winner_on_near_ties():
    """Rows in pairs that differ by 1e-4 (their int8 codes are equal; their logits differ by far more
    than float32 rounding): both must stay candidates, and the exact scores pick the right one. A head
    of identical rows cannot be narrowed down and falls back to the full head (ties: the lowest id)."""
    model = Transformer(CONFIGS["tiny-qwen3"].replace(vocab_size=8192), nnx.Rngs(0))
    base = np.asarray(model.embed[...])[::2]
    model.embed[...] = jnp.asarray(np.repeat(base, 2, 0) + 1e-4 * np.random.default_rng(0).standard_normal((8192, 128)),
                                   jnp.float32)
    head8 = int8head.build(model.head())
    x = jax.random.normal(jax.random.key(0), (4, 128)) * 3
    for temperature in (0.0, 1.0):
        noise = jnp.zeros((4, 8192)) if temperature == 0 else jax.random.gumbel(jax.random.key(1), (4, 8192))
        cand, fits = int8head.candidates(model, x, head8, noise, temperature)
        assert bool(fits)
        winners = exact_winners(model, x, noise, temperature)
        for row, w in enumerate(winners):
            assert w in np.asarray(cand[row]) and (w ^ 1) in np.asarray(cand[row])  # and its twin
        ids = int8head.next_token(model, x, head8, jax.random.key(1), temperature)
        np.testing.assert_array_equal(ids, winners)
    model.embed[...] = jnp.ones((8192, 128), jnp.float32)
    cand, fits = int8head.candidates(model, x, int8head.build(model.head()), jnp.zeros((4, 8192)), 0.0)
    assert not bool(fits)
    np.testing.assert_array_equal(int8head.next_token(model, x, int8head.build(model.head()), None, 0.0), 0)


# ----------------------------------------------------------------------------- sampling

def test_first_argmax_is_an_argmax_when_xla_rounds_twice():
    """A repeated row divided by a temperature: XLA's CPU backend computed x twice with different
    last bits, so a max + lowest-equal-index found no index for some rows (it returned V)."""
    l = jax.random.normal(jax.random.key(0), (4, 259)) * 5

    @jax.jit
    def pick(l, key):
        x = jnp.repeat(l[:1], 10, axis=0) / 0.7 + jax.random.gumbel(key, (10, 259))
        return sample.first_argmax(x), x
    for seed in range(10):
        ids, x = map(np.asarray, pick(l, jax.random.key(seed)))
        assert np.all(ids < 259)
        np.testing.assert_allclose(x[np.arange(10), ids], x.max(-1), rtol=1e-6)
    x = jnp.asarray([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(jax.jit(sample.first_argmax)(x), [1, 0])  # ties: the lowest index



@pytest.fixture(scope="module")
def peaked():
    """A tiny model with varied next-token distributions (a scaled-up separate output head:
    top token ~0.4, the 0.8 nucleus ~16 tokens)."""
    model = Transformer(CONFIGS["tiny-qwen3"].replace(tie_embeddings=False), nnx.Rngs(0))
    model.lm_head[...] = model.lm_head[...] * 12.0
    return model


def first_token_logits(model, prompt):
    return np.asarray(model(jnp.asarray([prompt]))[0, -1], np.float64)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0),
                                                     (1.3, 0, 0.8), (0.9, 20, 0.9)])
def test_sampling_frequencies_match_filtered_distribution(peaked, temperature, top_k, top_p):
    prompt = [257, 10, 20, 30]
    logits = first_token_logits(peaked, prompt) / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.ones_like(p, bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:  # nucleus of the top-k-renormalised distribution (transformers' order)
        pk = np.where(keep, p, 0.0) / p[keep].sum()
        mass_before = np.cumsum(pk[order]) - pk[order]
        keep[order[mass_before >= top_p]] = False
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    assert 2 <= keep.sum() < len(p) or (top_k == 0 and top_p == 1.0)

    n = 6000
    out = sample.generate(peaked, [prompt] * n, max_new_tokens=1, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=3, eos_ids=())
    counts = np.bincount([o[0] for o in out], minlength=len(p))
    assert counts[~keep].sum() == 0  # nothing outside the filtered support
    # Pearson chi-square over tokens with expected count >= 5 (rest pooled); fixed seed.
    expected = n * q
    big = expected >= 5
    obs = np.r_[counts[big], counts[~big & keep].sum()]
    exp = np.r_[expected[big], expected[~big & keep].sum()]
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof) + 10, (chi2, dof)


def test_low_temperature_equals_greedy_and_seed_is_deterministic(peaked):
    prompts = [[257, 1, 2, 3], [257, 50, 60]]
    greedy = sample.generate(peaked, prompts, max_new_tokens=12, eos_ids=())
    assert sample.generate(peaked, prompts, max_new_tokens=12, temperature=1e-4, eos_ids=()) == greedy
    a = sample.generate(peaked, prompts, max_new_tokens=12, temperature=1.0, seed=7, eos_ids=())
    assert a == sample.generate(peaked, prompts, max_new_tokens=12, temperature=1.0, seed=7, eos_ids=())
    assert a != sample.generate(peaked, prompts, max_new_tokens=12, temperature=1.0, seed=8, eos_ids=())


def test_sampled_logprobs_equal_a_training_forward(peaked):
    """Sampler and learner agree: the kept log-probs are those of a plain forward pass."""
    prompts = [[257, 1, 2, 3], [257, 50, 60, 70, 80, 90]]
    T = 0.8
    outs, lps = sample.generate(peaked, prompts, max_new_tokens=10, temperature=T, seed=1, eos_ids=(),
                                return_logprobs=True)
    for prompt, out, lp in zip(prompts, outs, lps):
        seq = jnp.asarray([prompt + out])
        logits = peaked(seq)[0, len(prompt) - 1:-1] / T
        ref = jax.nn.log_softmax(logits, axis=-1)[jnp.arange(len(out)), jnp.asarray(out)]
        np.testing.assert_allclose(lp, ref, atol=1e-4)


# ----------------------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_generates_with_a_checkpoint(gemma3_dir):
    r = run_cli("--ckpt", str(gemma3_dir), "--prompt", "The capital of France is", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is the capital of the country of France.")


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "/nonexistent/dir", "--prompt", "x"], "no such checkpoint directory"),
    (["--model", "gpt5", "--prompt", "x"], "unknown model preset 'gpt5'"),
    (["--prompt", "x", "--top-p", "1.5"], "0 < --top-p <= 1"),
    (["--prompt", "x", "--max-new-tokens", "0"], "need --max-new-tokens >= 1"),
    (["--prompt", "x", "--max-new-tokens", "many"], "invalid int value"),
    (["--max-new-tokens", "3"], "--prompt"),
    (["--chat", "--prompt", "x", "--tools", "no_such_module:fn"], "--tools: importing no_such_module failed"),
    (["--chat", "--prompt", "x", "--tools", "calculator,abacus"], "want calculator, or module:fn1,fn2"),
    (["--chat", "--prompt", "x", "--tools", "tasks:no_such_fn"], "tasks has no function 'no_such_fn'"),
    (["--prompt", "x", "--tools", "calculator"], "--tools needs --chat"),
])
def test_cli_bad_input_is_one_clear_line(args, message):
    r = run_cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_cli_adapter_gives_the_merged_checkpoints_greedy_ids(tmp_path):
    """--adapter DIR: a PEFT adapter applied on the base at load time, unmerged, generates the ids the merged
    checkpoint does (greedy; adapters with non-zero B, so the adapter changes the text)."""
    import adapters
    base = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(0))
    ckpt.save_hf(base, tmp_path / "base")
    adapted = adapters.add_lora(Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(0)), 4, 8.0)
    for name in adapted.lora.targets:
        b = getattr(adapted.layers, f"{name}_lora_b")
        b.set_value(0.3 * jax.random.normal(jax.random.key(len(name)), b.shape, b.dtype))
    ckpt.save_peft(adapted, tmp_path / "adapter")
    ckpt.save_hf(adapters.merge_lora(adapted), tmp_path / "merged")
    for d in ("base", "merged"):
        tokenizer.ByteTokenizer().save(tmp_path / d)
    args = ["--prompt", "123+456=", "--prompt", "9", "--max-new-tokens", "12"]
    with_adapter = run_cli("--ckpt", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), *args)
    merged = run_cli("--ckpt", str(tmp_path / "merged"), *args)
    plain = run_cli("--ckpt", str(tmp_path / "base"), *args)
    assert with_adapter.returncode == merged.returncode == 0, with_adapter.stderr + merged.stderr
    assert with_adapter.stdout == merged.stdout != plain.stdout
    assert "+ adapter" in with_adapter.stderr


def test_stream_yields_generates_ids_one_at_a_time():
    model = Transformer(CONFIGS["tiny-gemma3"], nnx.Rngs(0))
    prompt = [5, 17, 99, 3, 250, 7, 8, 9, 10, 11]
    for kw in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}):
        want = sample.generate(model, [prompt], max_new_tokens=20, **kw)[0]
        assert list(sample.stream(model, prompt, max_new_tokens=20, **kw)) == want
    first = sample.generate(model, [prompt], max_new_tokens=20)[0][4]
    assert list(sample.stream(model, prompt, max_new_tokens=20, eos_ids=(first,)))[-1] == first  # stops at an end


def test_interactive_chat_through_a_terminal(gemma3_dir):
    """--chat without --prompt, driven through a pseudo-terminal: two turns answered (the first as the
    one-shot --chat --prompt answers it, greedy), then Ctrl-D ends it with status 0."""
    import os
    import pty
    import select
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(gemma3_dir), "--chat", "--max-new-tokens", "8"],
                            cwd=ROOT, stdin=terminal, stdout=terminal, stderr=subprocess.DEVNULL, close_fds=True)
    os.close(terminal)
    seen = b""

    def read_until_prompt(count):
        nonlocal seen
        while seen.count(b"> ") < count:
            ready, _, _ = select.select([controller], [], [], 300)
            assert ready, seen
            seen += os.read(controller, 4096)
    read_until_prompt(1)
    os.write(controller, b"What is the capital of France?\n")
    read_until_prompt(2)
    os.write(controller, b"And of Italy?\n")
    read_until_prompt(3)
    os.write(controller, b"\x04")  # Ctrl-D
    assert proc.wait(timeout=60) == 0
    os.close(controller)
    turns = seen.decode(errors="replace").replace("\r", "").split("> ")
    first = turns[1].split("\n", 1)[1].strip()  # after the echoed question
    second = turns[2].split("\n", 1)[1].strip()
    one_shot = run_cli("--ckpt", str(gemma3_dir), "--chat", "--prompt", "What is the capital of France?",
                       "--max-new-tokens", "8")
    assert first and second and one_shot.stdout.strip().startswith(first), (first, second, one_shot.stdout)


def test_cli_chat_mode_uses_the_template(gemma3_dir):
    r = run_cli("--ckpt", str(gemma3_dir), "--chat", "--system", "Be brief.", "--prompt", "Hi", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    tok = tokenizer.load_tokenizer(gemma3_dir)
    text = chat.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                    "gemma3")
    expected = sample.generate(ckpt.load_hf(gemma3_dir), [tok.encode(text, add_bos=False)], max_new_tokens=4,
                               eos_ids=(1, tok.token_id("<end_of_turn>")))
    assert r.stdout == tok.decode(expected[0]) + "\n"


@pytest.mark.parametrize("family,num_beams,eos", [("gemma3", 3, None), ("qwen3", 4, "mid"), ("llama3", 2, "mid")])
def test_beam_search_matches_transformers(family, num_beams, eos, tmp_path):
    hf = make_hf_model(family, seed=3)
    ours = ckpt.load_hf(save_hf_model(hf, tmp_path / family))
    prompts = [[5, 9, 33, 7], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    eos_id = None
    if eos == "mid":  # an end token that makes some beams end early while others run on
        free = sample.generate(ours, prompts, max_new_tokens=12, num_beams=num_beams, eos_ids=())
        eos_id = next(e for e in free[0][:6] + free[1][:6] if min(map(len, sample.generate(
            ours, prompts, max_new_tokens=12, num_beams=num_beams, eos_ids=(e,)))) < 12)
    P, pad = max(map(len, prompts)), 299
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=num_beams, do_sample=False,
                      pad_token_id=pad, eos_token_id=eos_id)[:, P:].tolist()
    got = sample.generate(ours, prompts, max_new_tokens=12, num_beams=num_beams,
                          eos_ids=() if eos_id is None else (eos_id,))
    assert [g + [pad] * (len(r) - len(g)) for g, r in zip(got, ref)] == ref
    if eos_id is not None:
        assert any(len(g) < 12 and g[-1] == eos_id for g in got)  # the ending path really ran
