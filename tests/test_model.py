"""model.py against transformers, and the mask/cache/remat/dtype contracts of the forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ckpt
from hf_models import FAMILIES, hf_logits, make_hf_model, save_hf_model, to_classic_config
from model import ALIASES, CONFIGS, KVCache, Transformer, count_params, get_config

SEQ = 48  # longer than the tiny configs' sliding window (16)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def tokens(batch=2, length=SEQ, vocab=300, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("style", ["transformers5", "classic"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, style, tmp_path):
    hf = make_hf_model(family)
    path = save_hf_model(hf, tmp_path / family)
    if style == "classic":
        to_classic_config(path)
    model = ckpt.load_hf(path)
    assert model.cfg.family == family
    x = tokens()
    ref = hf_logits(hf, x)
    assert rel_err(model(jnp.asarray(x)), ref) < 1e-4


def test_configs_that_matter_are_read(tmp_path):
    """The parity test would pass vacuously if a switch were off in both; check it is on."""
    cfgs = {f: ckpt.load_hf(save_hf_model(make_hf_model(f), tmp_path / f)).cfg for f in FAMILIES}
    assert cfgs["llama3"].rope_scaling == "llama3" and cfgs["llama3"].rope_factor == 8.0
    assert cfgs["llama3"].head_dim * cfgs["llama3"].n_heads != cfgs["llama3"].dim
    assert cfgs["qwen2"].qkv_bias and cfgs["qwen3"].qk_norm and cfgs["gemma3"].qk_norm
    assert cfgs["gemma2"].sliding_layers == (True, False, True, False)
    assert cfgs["gemma2"].attn_softcap == 2.0 and cfgs["gemma2"].final_softcap == 3.0
    assert cfgs["gemma3"].sliding_layers == (True, False, True, False)
    assert cfgs["gemma3"].rope_local_theta == 100.0 and cfgs["gemma3"].rope_scaling == "linear"
    assert cfgs["gemma"].n_heads // cfgs["gemma"].n_kv_heads == 2 and cfgs["llama3"].n_heads // cfgs["llama3"].n_kv_heads == 3


def test_sliding_window_changes_the_answer(tmp_path):
    """Past the window a sliding layer must differ from a global one (so the mask is really tested)."""
    hf = make_hf_model("gemma3")
    model = ckpt.load_hf(save_hf_model(hf, tmp_path / "g3"))
    x = jnp.asarray(tokens())
    no_window = nnx.merge(*nnx.split(model))
    no_window.cfg = model.cfg.replace(sliding_window=10_000)  # same layers and RoPE, no window
    assert rel_err(no_window(x)[:, 20:], model(x)[:, 20:]) > 1e-3
    assert rel_err(no_window(x)[:, :16], model(x)[:, :16]) < 1e-5


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("tiny-")])
def test_left_padding_and_packing_are_exact(name):
    model = Transformer(CONFIGS[name], nnx.Rngs(0))
    a, b = tokens(1, 40, 259, 1)[0], tokens(1, 25, 259, 2)[0]
    ref_a, ref_b = model(jnp.asarray(a[None]))[0], model(jnp.asarray(b[None]))[0]

    # left-padded batch: positions restart at 0 after the padding, which is segment 0
    pad = 40 - 25
    batch = np.stack([a, np.concatenate([np.zeros(pad, np.int32), b])])
    seg = np.stack([np.ones(40, np.int32), np.r_[np.zeros(pad), np.ones(25)].astype(np.int32)])
    pos = np.stack([np.arange(40), np.r_[np.zeros(pad), np.arange(25)]]).astype(np.int32)
    out = model(jnp.asarray(batch), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    assert rel_err(out[0], ref_a) < 1e-5 and rel_err(out[1, pad:], ref_b) < 1e-5

    # packed: [a | b] in one row, segment ids 1 and 2, positions restarting at b
    packed = np.concatenate([a, b])[None]
    seg = np.r_[np.ones(40), 2 * np.ones(25)].astype(np.int32)[None]
    pos = np.r_[np.arange(40), np.arange(25)].astype(np.int32)[None]
    out = model(jnp.asarray(packed), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))[0]
    assert rel_err(out[:40], ref_a) < 1e-5 and rel_err(out[40:], ref_b) < 1e-5


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("tiny-")])
def test_cache_prefill_and_decode_equal_full_forward(name):
    cfg = CONFIGS[name].replace(sliding_window=8 if CONFIGS[name].sliding_window else None)
    model = Transformer(cfg, nnx.Rngs(0))
    x = jnp.asarray(tokens(2, 30, 259, 3))
    full = model(x)
    call = nnx.jit(lambda m, *a, **k: m(*a, **k))
    cache = KVCache.init(cfg, batch=2, length=32)
    logits, cache = call(model, x[:, :12], cache=cache)  # prefill
    steps = [logits]
    for t in range(12, 30):  # decode one token at a time, well past the window of 8
        pos = jnp.full((2, 1), t, jnp.int32)
        logits, cache = call(model, x[:, t:t + 1], positions=pos, cache=cache)
        steps.append(logits)
    assert int(cache.index) == 30
    assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-5


def test_remat_gives_same_logits_and_grads():
    cfg = CONFIGS["tiny-gemma3"]
    x = jnp.asarray(tokens(2, 20, 259))

    def loss(model):
        return jnp.mean(model(x) ** 2)

    plain, remat = Transformer(cfg, nnx.Rngs(0)), Transformer(cfg.replace(remat=True), nnx.Rngs(0))
    g1, g2 = nnx.grad(loss)(plain), nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_attention_softmax_has_jax_softmaxs_values_and_gradient(monkeypatch):
    """model.softmax writes its own backward pass (Σ p·g as a dot): it must be jax.nn.softmax's, on masked rows,
    a fully masked row and large logits, and through whole models (soft-capped sliding Gemma 2, GQA Qwen 3)."""
    import model
    x = 30 * jax.random.normal(jax.random.key(0), (2, 3, 5, 17))
    x = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.3, x.shape), jnp.finfo(jnp.float32).min, x)
    x = x.at[0, 0, 0].set(jnp.finfo(jnp.float32).min)  # a padding query: every key masked
    g = jax.random.normal(jax.random.key(2), x.shape)
    ours, ref = (lambda x: jnp.sum(jnp.sin(f(x)) * g) for f in (model.softmax, lambda x: jax.nn.softmax(x, axis=-1)))
    np.testing.assert_array_equal(model.softmax(x), jax.nn.softmax(x, axis=-1))
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(ref)(x), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(jax.grad(ours)(x)).max()) > 0.1  # not vacuous
    for name in ("tiny-gemma2", "tiny-qwen3"):
        x = jnp.asarray(tokens(2, 40, 259))

        def loss(m):
            return jnp.mean(jnp.sin(m(x)))

        grads_ours = nnx.grad(loss)(Transformer(CONFIGS[name], nnx.Rngs(0)))
        monkeypatch.setattr(model, "softmax", lambda x: jax.nn.softmax(x, axis=-1))
        grads_ref = nnx.grad(loss)(Transformer(CONFIGS[name], nnx.Rngs(0)))
        monkeypatch.undo()
        for a, b in zip(jax.tree.leaves(grads_ours), jax.tree.leaves(grads_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_compute_keeps_logits_f32_and_close():
    cfg = CONFIGS["tiny-llama3"]
    f32 = Transformer(cfg, nnx.Rngs(0))
    bf16 = Transformer(cfg.replace(dtype="bfloat16"), nnx.Rngs(0))
    x = jnp.asarray(tokens(2, 32, 259))
    out = bf16(x)
    assert out.dtype == jnp.float32
    assert rel_err(out, f32(x)) < 3e-2


def test_presets_have_published_sizes():
    # parameter counts from the model cards (embeddings included), via shapes only
    def n(name):
        return sum(x.size for x in jax.tree.leaves(nnx.state(ckpt.abstract_model(get_config(name)), nnx.Param)))
    assert abs(n("qwen3-0.6b") / 1e9 - 0.596) < 0.01
    assert abs(n("gemma3-270m") / 1e6 - 268.1) < 1
    assert abs(n("llama3.2-1b") / 1e9 - 1.236) < 0.01
    assert abs(n("llama3.1-8b") / 1e9 - 8.03) < 0.01
    assert abs(n("qwen2.5-0.5b") / 1e9 - 0.494) < 0.01
    assert abs(n("gemma2-2b") / 1e9 - 2.614) < 0.01
    for alias, name in ALIASES.items():
        assert get_config(alias) is CONFIGS[name]
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("gpt5")


def test_count_params_tiny():
    assert count_params(Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(0))) < 1_000_000


def test_multimodal_gemma3_checkpoint_loads_its_text_tower(tmp_path):
    """gemma3-4b and larger ship as Gemma3ForConditionalGeneration: we read the language model."""
    import torch
    import transformers
    from hf_models import HF_CONFIGS
    config = transformers.Gemma3Config(
        text_config=HF_CONFIGS["gemma3"][1], mm_tokens_per_image=4,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(-0.5, 0.5) if "norm" in name else p.normal_(0.0, 0.08)
    hf.save_pretrained(tmp_path / "mm")
    model = ckpt.load_hf(tmp_path / "mm")
    x = tokens(vocab=250)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(x)).logits.numpy()
    assert model.cfg.family == "gemma3" and model.cfg.sliding_layers == (True, False, True, False)
    assert rel_err(model(jnp.asarray(x)), ref) < 1e-4


def test_logits_of_the_last_positions_only():
    model = Transformer(CONFIGS["tiny-gemma2"], nnx.Rngs(0))
    x = jnp.asarray(tokens(2, 20, 259))
    for last in (1, 7):
        assert model(x, last=last).shape == (2, last, 259)
        np.testing.assert_allclose(model(x, last=last), model(x)[:, -last:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_taps_match_transformers_hidden_states_and_attentions(family, tmp_path):
    """model(..., taps=...) (distill.py's intermediate layers) against HF's output_hidden_states and
    output_attentions (eager attention), scanned and unrolled."""
    import torch
    from model import unstack_layers
    hf = make_hf_model(family, attn_implementation="eager")
    model = ckpt.load_hf(save_hf_model(hf, tmp_path / family))
    x = tokens()
    with torch.no_grad():
        ref = hf(torch.as_tensor(x), output_hidden_states=True, output_attentions=True)
    L = model.cfg.n_layers
    for layers in (None, unstack_layers(model)):
        logits, taps = model(jnp.asarray(x), layers=layers, taps=("hidden", "attention"))
        assert taps["hidden"].shape == (L + 1, 2, SEQ, model.cfg.dim) and taps["attention"].shape == (L, 2, SEQ, SEQ)
        for i in range(L):  # HF's last hidden state is final-normed; ours is the residual stream
            assert rel_err(taps["hidden"][i], ref.hidden_states[i].numpy()) < 1e-4
            assert rel_err(taps["attention"][i], ref.attentions[i].mean(1).numpy()) < 1e-4
        assert rel_err(logits, ref.logits.numpy()) < 1e-4
    _, only_hidden = model(jnp.asarray(x), taps=("hidden",))
    assert set(only_hidden) == {"hidden"}


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gemma3", "tiny-qwen3-moe", "tiny-gemma4"])
def test_next_token_hidden_is_the_model_on_all_but_the_last_token(name):
    """next_token_hidden runs every token and drops the last one's outputs (the layers at the batch's own length):
    at every real position of a packed row and a padded one, its hidden states and its taps (residual stream,
    attention maps, router logits) are the model's on tokens[:, :-1]. (A padding position attends to nothing:
    what it holds is weighted 0 everywhere, and differs.)"""
    from model import next_token_hidden
    model = Transformer(CONFIGS[name], nnx.Rngs(0))
    ids = jnp.asarray(tokens(length=SEQ, vocab=CONFIGS[name].vocab_size))
    segments = jnp.asarray(np.array([[1] * 30 + [2] * 18, [1] * 40 + [0] * 8], np.int32))  # packed; padded
    positions = jnp.asarray(np.array([list(range(30)) + list(range(18)), list(range(40)) + [0] * 8], np.int32))
    real = np.asarray(segments[:, :-1]) > 0  # [B, T − 1]
    taps = ("hidden", "attention") if CONFIGS[name].gemma4 else ("hidden", "attention", "router")
    x, got = next_token_hidden(model, ids, positions, segments, SEQ - 1, taps=taps)
    want_x, want = model(ids[:, :-1], positions=positions[:, :-1], segment_ids=segments[:, :-1], last=SEQ - 1,
                         hidden=True, taps=taps)
    assert x.shape == want_x.shape and rel_err(np.asarray(x)[real], np.asarray(want_x)[real]) < 1e-5
    for tap in taps:
        if want[tap] is None:  # a dense model's router
            assert got[tap] is None
            continue
        assert got[tap].shape == want[tap].shape, tap
        a, b = np.asarray(got[tap])[:, real], np.asarray(want[tap])[:, real]  # [L, positions, ...]
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.max(np.abs(b))), err_msg=tap)
