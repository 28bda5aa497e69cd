"""shard.py on 8 simulated CPU devices: the sharded program computes the single-device numbers."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import ckpt
import moe
import shard
from model import CONFIGS, Config, Transformer

MESHES = ["data=1,fsdp=1,tp=1", "fsdp=8", "fsdp=4,tp=2", "data=2,fsdp=2,tp=2"]
# Big enough that every weight is >= 1 MB, small enough for CPU; 4 kv heads so tp=2 splits them.
SMALL = Config(family="qwen3", vocab_size=4096, dim=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=64,
               ffn_dim=1024, qk_norm=True, rope_theta=1e6, eos_ids=(1,))


def test_eight_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("spec,expected", [("", {"data": 1, "fsdp": 8, "tp": 1}),
                                           ("data=2,fsdp=-1,tp=2", {"data": 2, "fsdp": 2, "tp": 2}),
                                           ("tp=8", {"data": 1, "fsdp": 1, "tp": 8})])
def test_parse_mesh(spec, expected):
    assert shard.parse_mesh(spec, 8) == expected


@pytest.mark.parametrize("spec,message", [("fsdp=3", "3 slots for 8 devices"), ("pp=2", "unknown mesh axis 'pp'"),
                                          ("fsdp=-1,tp=-1", "only one mesh axis may be -1"),
                                          ("tp=x", "needs an integer"), ("fsdp=-1,tp=3", "do not divide by 3"),
                                          ("fsdp=0", "positive size")])
def test_bad_mesh_specs(spec, message):
    with pytest.raises(shard.MeshError, match=message):
        shard.parse_mesh(spec, 8)


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def moe_loss_fn(model, tokens):  # the NLL + a weighted router aux loss
    logits, taps = model(tokens[:, :-1], taps=("router",))
    logp = jax.nn.log_softmax(logits, axis=-1)
    aux = moe.load_balancing_loss(taps["router"], jnp.ones(tokens[:, :-1].shape), model.cfg)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)) + 0.1 * aux


def run(mesh_spec, tokens, cfg=SMALL, loss_fn=loss_fn):
    """Forward logits and one AdamW step on the given mesh, through explicit jit shardings."""
    mesh = shard.make_mesh(mesh_spec)
    model = shard.shard_model(Transformer(cfg, nnx.Rngs(0)), mesh)
    graphdef, params = nnx.split(model)
    # Adam's first step is lr * g / (|g| + eps): gradients that differ in the 7th digit because
    # the sharded program sums in another order move a near-zero component by up to lr, so
    # the parameter tolerance scales with lr; the gradients themselves are compared below.
    tx = optax.adamw(1e-3)
    param_sh = shard.tree_shardings(params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=shard.tree_shardings(jax.eval_shape(tx.init, params), mesh))(params)
    opt_sh = shard.tree_shardings(opt_state, mesh)
    batch = jax.device_put(tokens, shard.batch_sharding(mesh))

    @jax.jit
    def forward(params, tokens):
        return nnx.merge(graphdef, params)(tokens)

    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), tokens))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, in_shardings=(param_sh, opt_sh, shard.batch_sharding(mesh)),
                   out_shardings=(param_sh, opt_sh, None), donate_argnums=(0, 1))
    logits = forward(params, batch)
    grads = jax.jit(jax.grad(lambda p, t: loss_fn(nnx.merge(graphdef, p), t)))(params, batch)
    new_params, new_opt, loss = step(params, opt_state, batch)
    return logits, grads, new_params, new_opt, loss, mesh


@pytest.fixture(scope="module")
def reference():
    tokens = np.random.default_rng(0).integers(0, SMALL.vocab_size, (8, 33)).astype(np.int32)
    logits, grads, params, opt_state, loss, _ = run("data=1,fsdp=1,tp=1", tokens)
    as_np = lambda t: jax.tree.map(np.asarray, t)
    return tokens, np.asarray(logits), as_np(grads), as_np(params), as_np(opt_state), float(loss)


@pytest.mark.parametrize("mesh_spec", MESHES[1:])
def test_sharded_forward_and_step_equal_single_device(reference, mesh_spec):
    assert_equal_to_reference(reference, run(mesh_spec, reference[0]))


# Qwen 3 MoE: a sparse layer and a dense one, 8 experts of 1 MB or more each layer's stack (split on fsdp)
SMALL_MOE = SMALL.replace(experts=moe.Experts(8, 2, 256, norm_topk_prob=True, sparse_layers=(True, False)))


@pytest.mark.parametrize("grouped,mesh_spec", [(False, "fsdp=8"), (True, "data=2,fsdp=2,tp=2")])
def test_a_moe_model_on_eight_devices_equals_one(grouped, mesh_spec, monkeypatch):
    """Values, gradients (the router's aux loss among the losses) and an AdamW step of a mixed MoE model, the
    dense and the grouped (ragged_dot) experts alike: the experts split along D on fsdp (shard.py says why)."""
    monkeypatch.setattr(moe, "experts", lambda *a, f=moe.experts: f(*a, grouped=grouped))
    tokens = np.random.default_rng(1).integers(0, SMALL.vocab_size, (8, 33)).astype(np.int32)
    logits, grads, params, opt_state, loss, _ = run("data=1,fsdp=1,tp=1", tokens, SMALL_MOE, moe_loss_fn)
    reference = (tokens, np.asarray(logits), *jax.tree.map(np.asarray, (grads, params, opt_state)), float(loss))
    assert_equal_to_reference(reference, run(mesh_spec, tokens, SMALL_MOE, moe_loss_fn))


def assert_equal_to_reference(reference, result):
    tokens, ref_logits, ref_grads, ref_params, ref_opt, ref_loss = reference
    logits, grads, params, opt_state, loss, mesh = result
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5)
    assert abs(float(loss) - ref_loss) < 1e-5
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert np.max(np.abs(np.asarray(a) - b)) <= 1e-5 * np.max(np.abs(b))
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(ref_opt)):  # Adam's moments
        assert np.max(np.abs(np.asarray(a) - b)) <= 1e-5 * max(np.max(np.abs(b)), 1e-30)
    for a, b, g in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), jax.tree.leaves(ref_grads)):
        # Adam's first step is lr * g / (|g| + eps): where |g| is near zero the last bits of
        # the summation order decide it, so only well-conditioned components must agree to 1e-5
        diff = np.abs(np.asarray(a) - b)
        conditioned = np.abs(g) > 1e-3 * np.max(np.abs(g))
        assert np.max(diff[conditioned], initial=0) <= 1e-5 and np.max(diff) <= 2e-3
    # every array of 1 MB or more (parameters and Adam moments alike) is split as the table says
    for tree in (params, opt_state):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = shard.path_str(path)
            expected = shard.spec_for(name, leaf.shape, mesh)
            assert leaf.sharding.spec == expected or leaf.sharding.is_equivalent_to(
                jax.sharding.NamedSharding(mesh, expected), leaf.ndim), name
            if leaf.nbytes >= 1 << 20:
                assert any(a is not None for a in expected), name
                assert leaf.addressable_shards[0].data.nbytes < leaf.nbytes, name


def test_table_entries():
    mesh = shard.make_mesh("fsdp=4,tp=2")
    assert shard.spec_for("layers/q", (2, 256, 8, 64), mesh) == P(None, "fsdp", "tp", None)
    assert shard.spec_for("opt/0/mu/layers/down", (2, 1024, 256), mesh) == P(None, "tp", "fsdp")
    assert shard.spec_for("embed", (4096, 256), mesh) == P("tp", "fsdp")
    assert shard.spec_for("layers/k", (2, 256, 1, 64), mesh) == P(None, "fsdp", None, None)  # 1 kv head
    assert shard.spec_for("layers/attn_norm", (2, 256), mesh) == P()
    # Gemma 4's per-layer LoRA factors (no L axis) follow their weights as the stacked ones do
    assert shard.spec_for("layers/3/q_lora_a", (256, 8), mesh) == P("fsdp", None)
    assert shard.spec_for("layers/3/q_lora_b", (8, 8, 64), mesh) == P(None, "tp", None)
    assert shard.spec_for("layers/3/o_lora_a", (8, 64, 8), mesh) == P("tp", None, None)
    assert shard.spec_for("opt/0/mu/layers/3/down_lora_b", (8, 256), mesh) == P(None, "fsdp")


def test_real_preset_is_split_eight_ways_without_allocating():
    model = ckpt.abstract_model(CONFIGS["qwen3-0.6b"])
    params = nnx.state(model, nnx.Param)
    mesh = shard.make_mesh("fsdp=8")
    total = per_device = 0
    for leaf, sh in zip(jax.tree.leaves(params), jax.tree.leaves(shard.tree_shardings(params, mesh))):
        nbytes = np.dtype(leaf.dtype).itemsize
        total += nbytes * int(np.prod(leaf.shape))
        per_device += nbytes * int(np.prod(sh.shard_shape(leaf.shape)))
    assert total > 2e9
    assert per_device / total < 1 / 8 * 1.01


def test_tpu_flag_fails_cleanly_without_tpu():
    r = subprocess.run([sys.executable, "sft.py", "--tpu"], capture_output=True, text=True,
                       cwd=shard.__file__.rsplit("/", 1)[0], timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no TPU" in lines[0], r.stderr


def test_a_gemma4_model_on_eight_devices_equals_one():
    """Gemma 4's per-layer weights (no L axis), PLE tables, k = v and KV-shared layers on data=2,fsdp=2,tp=2:
    values, gradients and an AdamW step equal one device's, every array of 1 MB or more split (gemma4.py)."""
    import gemma4
    cfg = SMALL.replace(family="gemma4", n_layers=4, act="gelu_tanh", post_norms=True, embed_scale=True, query_scale=1.0,
                        rope_local_theta=1e4, sliding_window=16, sliding_layers=(True, False) * 2,
                        gemma4=gemma4.Gemma4(global_head_dim=128, global_kv_heads=2, k_eq_v=True, kv_shared_layers=2,
                                             ple_dim=64, ple_vocab=4096, global_rope_fraction=0.25,
                                             double_wide_mlp=True))
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (8, 33)).astype(np.int32)
    one, eight = run("data=1,fsdp=1,tp=1", tokens, cfg), run("data=2,fsdp=2,tp=2", tokens, cfg)
    # Query scale 1 on unit-norm q and k (QK-norm at init): attention logits of order sqrt(H), so the summation
    # order moves the outputs by up to ~3e-5 of their size; the tolerance is relative to each array's largest value
    for k in (0, 1, 3, 4):  # logits, gradients, Adam's moments, the loss (a leaf near 0, a cancelling sum such as
        ours, ref = jax.tree.leaves(eight[k]), jax.tree.leaves(one[k])  # a layer_scalar's gradient: to its tree's size)
        scale = max(np.max(np.abs(np.asarray(b))) for b in ref)
        for a, b in zip(ours, ref):
            a, b = np.asarray(a), np.asarray(b)
            assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b)) + 1e-6 * scale
    for a, b in zip(jax.tree.leaves(eight[2]), jax.tree.leaves(one[2])):  # Adam's first step: lr * g / (|g| + eps)
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 2e-3
    for tree in eight[2:4]:  # every parameter and Adam moment of 1 MB or more is split as the table says
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            expected = shard.spec_for(shard.path_str(path), leaf.shape, eight[5])
            assert leaf.sharding.is_equivalent_to(jax.sharding.NamedSharding(eight[5], expected), leaf.ndim)
            assert leaf.nbytes < 1 << 20 or leaf.addressable_shards[0].data.nbytes < leaf.nbytes, path
    mesh = shard.make_mesh("fsdp=8")
    assert shard.spec_for("layers/5/expert_gate_up", (128, 1408, 2816), mesh) == P(None, None, "fsdp")
    assert shard.spec_for("opt/0/mu/layers/5/expert_down", (128, 2816, 704), mesh) == P(None, "fsdp", None)
