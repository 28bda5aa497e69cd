"""logprobs.py: chunked log-probs, entropy and their gradients equal the whole-vocabulary computation,
and no [positions, V] float32 tensor is ever made (XLA's own buffer accounting)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import logprobs
import model as model_lib
from model import CONFIGS, Transformer


def reference(x, head, targets, cap, temperature):
    """The plain computation: whole logits, jax.nn.log_softmax, gather."""
    logits = logprobs.softcap(jnp.einsum("...D,VD->...V", x, head, preferred_element_type=jnp.float32), cap)
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def inputs(B=3, T=37, D=32, V=1000, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (B, T, D)), 0.3 * jax.random.normal(k[1], (V, D)),
            jax.random.randint(k[2], (B, T), 0, V))


def max_rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


@pytest.mark.parametrize("chunk_bytes", [4 * 1000 * 8, 4 * 1000 * 13, 1 << 30])  # 14 chunks, 9 (padded), one
@pytest.mark.parametrize("cap,temperature", [(None, 1.0), (5.0, 0.7)])
def test_chunked_logps_entropy_and_gradients_equal_the_whole_vocabulary(chunk_bytes, cap, temperature):
    x, head, targets = inputs()
    chunks, rows = logprobs.chunk_rows(3 * 37, 1000, chunk_bytes)
    assert (chunks > 1) == (chunk_bytes < 1 << 30) and chunks * rows >= 3 * 37
    chunked = lambda x, head: logprobs.token_logps(x, head, targets, cap=cap, temperature=temperature,  # noqa: E731
                                                   entropy=True, chunk_bytes=chunk_bytes)
    plain = lambda x, head: reference(x, head, targets, cap, temperature)  # noqa: E731
    for a, b in zip(jax.jit(chunked)(x, head), plain(x, head)):
        assert a.shape == (3, 37) and max_rel(a, b) < 1e-5
    w = jax.random.normal(jax.random.key(1), (2, 3, 37))  # weights on log-probs and entropies: any cotangent
    loss = lambda f: lambda x, head: jnp.sum(jnp.stack(f(x, head)) * w)  # noqa: E731
    for a, b in zip(jax.jit(jax.grad(loss(chunked), (0, 1)))(x, head), jax.grad(loss(plain), (0, 1))(x, head)):
        assert max_rel(a, b) < 1e-5


@pytest.mark.parametrize("min_rows,max_rows,chunk_bytes", [
    (8, 1024, 4 * 1000 * 20),  # 6 chunks of 19 whole vocabulary rows (the last padded)
    (256, 1024, 4 * 1000 * 20),  # one chunk of 111 rows against 6 vocabulary blocks (the last overlaps)
    (256, 40, 4 * 1000 * 20),  # 3 chunks of 37 rows x 2 blocks: both at once
    (8, 1024, 1 << 30)])  # everything in one chunk: the plain program
@pytest.mark.parametrize("cap", [None, 5.0])
def test_the_supervised_loss_and_its_gradients_equal_the_whole_vocabulary(min_rows, max_rows, chunk_bytes, cap,
                                                                          monkeypatch):
    """weighted_nll takes its gradients inside the forward pass, tile by tile: value, d/dx, d/dhead and
    d/dweights against autodiff of the plain log-softmax, and the head's gradient skipped when unused."""
    monkeypatch.setattr(logprobs, "MIN_ROWS", min_rows)
    monkeypatch.setattr(logprobs, "MAX_ROWS", max_rows)
    x, head, targets = inputs()
    weights = (jax.random.uniform(jax.random.key(2), (3, 37)) > 0.3).astype(jnp.float32)
    tiles = logprobs.nll_tiles(3 * 37, 1000, chunk_bytes)
    assert tiles == {(8, 1024): (6, 19, 1), (256, 1024): (1, 111, 6), (256, 40): (3, 37, 2)}.get(
        (min_rows, max_rows), (1, 111, 1)) if chunk_bytes < 1 << 30 else tiles == (1, 111, 1)
    fused = lambda x, head, w: logprobs.weighted_nll(x, head, targets, w, cap=cap, chunk_bytes=chunk_bytes)  # noqa: E731
    plain = lambda x, head, w: -jnp.sum(w * reference(x, head, targets, cap, 1.0)[0])  # noqa: E731
    assert max_rel(jax.jit(fused)(x, head, weights), plain(x, head, weights)) < 1e-6
    grads = jax.jit(jax.grad(fused, (0, 1, 2)))(x, head, weights)
    for a, b in zip(grads, jax.grad(plain, (0, 1, 2))(x, head, weights)):
        assert max_rel(a, b) < 1e-5
    d_x = jax.jit(jax.grad(fused))(x, head, weights)  # the head not differentiated: its matmul is not made
    assert max_rel(d_x, grads[0]) < 1e-6
    if tiles != (1, 111, 1):
        assert jax.jit(jax.grad(fused)).lower(x, head, weights).as_text().count("dot_general") < \
            jax.jit(jax.grad(fused, (0, 1))).lower(x, head, weights).as_text().count("dot_general")


@pytest.mark.parametrize("chunk_bytes,nll_coefficient", [(4 * 1000 * 8, 0.3), (1 << 30, 0.3), (4 * 1000 * 8, 0.0)])
@pytest.mark.parametrize("cap", [None, 5.0])  # chunk_bytes: 14 chunks (the last padded), or one
def test_summed_terms_and_their_gradients_equal_autodiff_of_the_chunked_terms(chunk_bytes, nll_coefficient, cap):
    """summed_terms (each chunk's logits made once, the gradient taken there) against jax.grad of per_position
    (the chunk made again in the backward pass) and of the whole-vocabulary terms: a distillation-like loss
    with a second model's logits inside the chunk, two weighted terms and one only logged, a 0/1 mask; with the
    NLL's coefficient 0 (distill.py at kd_ratio 1) it is logged and left out of the gradient's program."""
    x, head, targets = inputs()
    x_t, head_t = 2 * inputs(seed=1)[0], inputs(seed=2)[1]
    mask = (jax.random.uniform(jax.random.key(3), (3, 37)) > 0.3).astype(jnp.float32)
    coefficients = {"kd": 0.7, "nll": nll_coefficient}

    def terms(logits, target, x_t_c):  # [c, V], [c], [c, D]
        log_s = jax.nn.log_softmax(logits, axis=-1)
        log_t = jax.nn.log_softmax(jnp.einsum("RD,VD->RV", x_t_c, head_t), axis=-1)
        return {"kd": jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1), "logged": jnp.max(log_s, -1),
                "nll": -jnp.take_along_axis(log_s, target[:, None], axis=-1)[:, 0]}

    def summed(x, head):
        loss, sums = logprobs.summed_terms(terms, x, head, mask, coefficients, targets, x_t, cap=cap,
                                           chunk_bytes=chunk_bytes)
        return loss / 7.0, sums  # a cotangent other than 1

    def autodiff(make_terms):
        def loss_fn(x, head):
            sums = {k: jnp.sum(t * mask) for k, t in make_terms(x, head).items()}
            return sum(c * sums[k] for k, c in coefficients.items()) / 7.0, sums
        return loss_fn
    chunked = autodiff(lambda x, head: logprobs.per_position(terms, x, head, targets, x_t, cap=cap,
                                                             chunk_bytes=chunk_bytes))
    whole = autodiff(lambda x, head: jax.tree.map(lambda t: t.reshape(3, 37), terms(
        logprobs.softcap(jnp.einsum("BTD,VD->BTV", x, head), cap).reshape(-1, 1000), targets.reshape(-1),
        x_t.reshape(-1, 32))))
    (loss, sums), grads = jax.jit(jax.value_and_grad(summed, (0, 1), has_aux=True))(x, head)
    for other in (chunked, whole):
        (loss_o, sums_o), grads_o = jax.jit(jax.value_and_grad(other, (0, 1), has_aux=True))(x, head)
        assert abs(float(loss - loss_o)) <= 1e-5 * abs(float(loss_o)) and loss_o > 0
        assert sums.keys() == sums_o.keys() and all(abs(float(sums[k] - sums_o[k])) <= 1e-5 * abs(float(sums_o[k]))
                                                    for k in sums)
        for a, b in zip(grads, grads_o):
            assert max_rel(a, b) < 1e-5
    d_x = jax.jit(jax.grad(lambda x: summed(x, head)[0]))(x)  # the head frozen (LoRA): its gradient is not made
    assert max_rel(d_x, grads[0]) < 1e-6
    count = lambda f, *a: jax.jit(f).lower(*a).as_text().count("dot_general")  # noqa: E731
    assert count(jax.grad(lambda x: summed(x, head)[0]), x) < count(jax.grad(lambda x, h: summed(x, h)[0], (0, 1)), x, head)
    # the NLL's gradient scatters into the target's column (take_along_axis transposed): there only when it counts
    scatters = jax.jit(jax.grad(lambda x: summed(x, head)[0])).lower(x).as_text().count("scatter")
    assert (scatters == 0) == (nll_coefficient == 0.0) and abs(float(sums["nll"])) > 0


@pytest.mark.parametrize("max_rows", [1024, 40])  # one chunk of 111 rows x 6 blocks; 3 chunks of 37 x 2 blocks
@pytest.mark.parametrize("cap,temperature", [(None, 1.0), (5.0, 0.7)])
def test_logps_and_entropy_in_vocabulary_blocks_equal_the_whole_vocabulary(max_rows, cap, temperature, monkeypatch):
    """Past MIN_ROWS rows of a chunk (a large vocabulary) token_logps runs in row x vocabulary tiles with an
    online log-sum-exp and entropy: values, d/dx, d/dhead against the plain log-softmax for any cotangents on
    both outputs, the head's gradient skipped when it does not train."""
    monkeypatch.setattr(logprobs, "MIN_ROWS", 256)
    monkeypatch.setattr(logprobs, "MAX_ROWS", max_rows)
    x, head, targets = inputs()
    assert logprobs.nll_tiles(3 * 37, 1000, 4 * 1000 * 20) == ((1, 111, 6) if max_rows == 1024 else (3, 37, 2))
    blocked = lambda x, head: logprobs.token_logps(x, head, targets, cap=cap, temperature=temperature,  # noqa: E731
                                                   entropy=True, chunk_bytes=4 * 1000 * 20)
    plain = lambda x, head: reference(x, head, targets, cap, temperature)  # noqa: E731
    for a, b in zip(jax.jit(blocked)(x, head), plain(x, head)):
        assert a.shape == (3, 37) and max_rel(a, b) < 1e-5
    w = jax.random.normal(jax.random.key(1), (2, 3, 37))
    loss = lambda f: lambda x, head: jnp.sum(jnp.stack(f(x, head)) * w)  # noqa: E731
    grads = jax.jit(jax.grad(loss(blocked), (0, 1)))(x, head)
    for a, b in zip(grads, jax.grad(loss(plain), (0, 1))(x, head)):
        assert max_rel(a, b) < 1e-5
    logp_only = lambda f: lambda x: jnp.sum(f(x, jax.lax.stop_gradient(head))[0] * w[0])  # noqa: E731
    d_x = jax.jit(jax.grad(logp_only(blocked)))(x)  # no entropy cotangent, the head frozen
    assert max_rel(d_x, jax.grad(logp_only(plain))(x)) < 1e-5
    count = lambda f, *a: jax.jit(f).lower(*a).as_text().count("dot_general")  # noqa: E731
    assert count(jax.grad(logp_only(blocked)), x) < count(jax.grad(loss(blocked), (0, 1)), x, head)


def test_bfloat16_hidden_states_give_float32_logps():
    x, head, targets = inputs()
    logp = logprobs.token_logps(x.astype(jnp.bfloat16), head.astype(jnp.bfloat16), targets, chunk_bytes=4 * 1000 * 8)
    assert logp.dtype == jnp.float32
    ref, _ = reference(x.astype(jnp.bfloat16), head.astype(jnp.bfloat16), targets, None, 1.0)
    assert max_rel(logp, ref) < 1e-5


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-gemma2"])  # gemma2: the final soft-cap
def test_model_token_logps_equal_the_log_softmax_of_its_logits(preset, monkeypatch):
    """model.token_logps (chunked here: 6 chunks of 8 positions, the fewest a chunk holds) against the forward's
    own logits, and its parameter gradients against the single-chunk program."""
    model = Transformer(CONFIGS[preset], nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 24)), jnp.int32)
    batch = {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(24), (2, 24)),
             "segment_ids": jnp.ones((2, 24), jnp.int32)}
    graphdef, params = nnx.split(model)

    def nll(params, temperature):
        logp, entropy = model_lib.token_logps(nnx.merge(graphdef, params), batch, temperature=temperature, entropy=True)
        return -jnp.sum(logp) + 0.1 * jnp.sum(entropy), (logp, entropy)

    whole = jax.grad(nll, has_aux=True)(params, 0.8)
    logits = model(tokens)[:, :-1]  # [B, T-1, V]
    want = reference(logits, jnp.eye(259), tokens[:, 1:], None, 0.8)  # eye: the head is the identity on logits
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 3 * 4 * 259)
    assert logprobs.chunk_rows(2 * 23, 259) == (6, 8)
    chunked = jax.grad(nll, has_aux=True)(params, 0.8)
    for got in (whole, chunked):
        assert all(max_rel(a, b) < 1e-5 for a, b in zip(got[1], want))
    for a, b in zip(jax.tree.leaves(chunked[0]), jax.tree.leaves(whole[0])):
        assert max_rel(a, b) < 1e-5


def temp_bytes(rows, V=50_000, D=64, chunk_bytes=None):
    """XLA's scratch memory for the gradient of a token NLL over `rows` positions (inputs/outputs aside)."""
    x, head, targets = jnp.zeros((rows, D)), jnp.zeros((V, D)), jnp.zeros((rows,), jnp.int32)
    loss = lambda x, head: -jnp.sum(logprobs.token_logps(x, head, targets, chunk_bytes=chunk_bytes))  # noqa: E731
    return jax.jit(jax.grad(loss, (0, 1))).lower(x, head).compile().memory_analysis().temp_size_in_bytes


def test_the_vocabulary_costs_a_few_chunks_whatever_the_number_of_positions():
    chunk = 1 << 22  # 4 MiB: 20 positions of a 50k vocabulary
    whole_logits = 512 * 50_000 * 4  # one [512, V] float32 tensor: 102 MB
    assert temp_bytes(512, chunk_bytes=1 << 40) >= whole_logits  # unchunked: at least one such tensor
    head_grad = 50_000 * 64 * 4  # the head's gradient, summed over chunks, is the one V-sized buffer
    for rows in (512, 1024, 2048):
        assert temp_bytes(rows, chunk_bytes=chunk) < head_grad + 4 * chunk + rows * 64 * 4 * 4
    assert temp_bytes(2048, chunk_bytes=chunk) - temp_bytes(512, chunk_bytes=chunk) < 1536 * 64 * 4 * 4


def test_the_supervised_loss_scratch_memory_is_a_few_tiles_whatever_the_number_of_positions(monkeypatch):
    """weighted_nll's gradient (head included) with vocabulary blocks: XLA's scratch is the head's gradient
    and a few [rows, block] tiles, so four times the positions cost only their own [rows, D] arrays."""
    monkeypatch.setattr(logprobs, "MAX_ROWS", 256)
    V, D, chunk = 50_000, 64, 1 << 22

    def scratch(rows):
        x, head, targets = jnp.zeros((rows, D)), jnp.zeros((V, D)), jnp.zeros((rows,), jnp.int32)
        loss = lambda x, head: logprobs.weighted_nll(x, head, targets, jnp.ones((rows,)), chunk_bytes=chunk)  # noqa: E731
        assert logprobs.nll_tiles(rows, V, chunk)[2] > 1  # vocabulary blocks
        return jax.jit(jax.grad(loss, (0, 1))).lower(x, head).compile().memory_analysis().temp_size_in_bytes
    head_grad = V * D * 4
    assert scratch(512) < 2 * head_grad + 4 * chunk + 512 * D * 4 * 4
    assert scratch(2048) - scratch(512) < 1536 * D * 4 * 4
