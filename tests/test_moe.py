"""moe.py and Qwen 3 MoE checkpoints against transformers' Qwen3MoeForCausalLM: logits, greedy generation,
save_hf round trip, and the grouped (ragged_dot) experts against the dense ones in values and gradients."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import ckpt
import moe
import sample
import shard
from hf_models import MOE_VARIANTS, hf_logits, make_hf_model, save_hf_model, to_classic_config
from model import CONFIGS, Transformer, get_config
from test_model import rel_err, tokens
from test_sample import hf_greedy

SPARSE = {"qwen3_moe": (False, True, False, True), "qwen3_moe_unnormed": (False, True, True),
          "qwen3_moe_all_sparse": (True, True, True)}


def to_hub_config(path):
    """config.json as the Hub's Qwen3-MoE checkpoints write it: rope_theta, num_experts."""
    to_classic_config(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("style", ["transformers5", "hub"])
@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_logits_match_transformers(variant, style, tmp_path):
    hf = make_hf_model(variant, attn_implementation="eager")
    path = save_hf_model(hf, tmp_path / variant)
    if style == "hub":
        to_hub_config(path)
    model = ckpt.load_hf(path)
    assert model.cfg.experts.sparse_layers == SPARSE[variant]  # the switch is really read, so parity means something
    assert model.cfg.experts.norm_topk_prob == (variant != "qwen3_moe_unnormed")
    x = tokens()
    ref, out = hf_logits(hf, x), np.asarray(model(jnp.asarray(x)))
    assert rel_err(out, ref) <= 2e-4
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) == 1.0


def test_transformers_writes_one_tensor_per_expert(tmp_path):
    """What ckpt.py reads is what transformers 5 writes: per-expert tensors, num_local_experts, rope_parameters."""
    path = save_hf_model(make_hf_model("qwen3_moe"), tmp_path / "m")
    names = set(ckpt.tensor_index(path))
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in names and "model.layers.1.mlp.gate.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names and not any("gate_up_proj" in n for n in names)
    hf_config = json.loads((path / "config.json").read_text())
    assert hf_config["num_local_experts"] == 6 and "rope_parameters" in hf_config


def test_fused_expert_tensors_load(tmp_path):
    """A checkpoint of transformers 5's in-memory layout (its state_dict: mlp.experts.gate_up_proj [E, 2F, D],
    mlp.experts.down_proj [E, D, F]) loads to the same logits."""
    from safetensors.torch import save_file
    hf = make_hf_model("qwen3_moe", attn_implementation="eager")
    path = save_hf_model(hf, tmp_path / "m")
    (path / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.gate_up_proj" in ckpt.tensor_index(path)
    x = tokens()
    assert rel_err(ckpt.load_hf(path)(jnp.asarray(x)), hf_logits(hf, x)) <= 2e-4


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen3_moe_all_sparse"])
def test_save_hf_gives_transformers_the_same_logits(variant, tmp_path):
    hf = make_hf_model(variant, attn_implementation="eager")
    model = ckpt.load_hf(save_hf_model(hf, tmp_path / "in"))
    ckpt.save_hf(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "qwen3_moe" and written["num_experts"] == 6  # the Hub's names
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in ckpt.tensor_index(tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    x = tokens()
    assert rel_err(hf_logits(again, x), hf_logits(hf, x)) < 1e-6
    assert ckpt.load_hf(tmp_path / "out").cfg == model.cfg


def test_greedy_matches_transformers_generate(tmp_path):
    hf = make_hf_model("qwen3_moe", seed=1, attn_implementation="eager")
    ours = ckpt.load_hf(save_hf_model(hf, tmp_path / "m"))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, n).tolist() for n in (5, 17, 11)]  # ragged, left-padded
    expected = hf_greedy(hf, prompts, 24, pad_id=0)
    assert sample.generate(ours, prompts, max_new_tokens=24, eos_ids=()) == expected


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen3_moe_unnormed"])
def test_aux_loss_equals_transformers(variant, tmp_path):
    """moe.load_balancing_loss of the model's router tap equals Qwen3MoeForCausalLM's aux_loss (output_router_logits,
    right-padded rows masked by attention_mask), on models with dense layers among the sparse ones; and its
    loss is loss + router_aux_loss_coef · aux_loss, the coefficient read from config.json."""
    hf = make_hf_model(variant, attn_implementation="eager")
    hf.config.router_aux_loss_coef = hf.router_aux_loss_coef = 0.25  # the model copies it at init
    model = ckpt.load_hf(save_hf_model(hf, tmp_path / variant))
    assert model.cfg.experts.router_aux_loss_coef == 0.25
    x, mask = tokens(3, 24).astype(np.int64), np.ones((3, 24), np.int64)
    mask[1, 15:], mask[2, 7:] = 0, 0  # padding: its tokens are routed, but do not count
    with torch.no_grad():
        out = hf(torch.as_tensor(x), attention_mask=torch.as_tensor(mask), labels=torch.as_tensor(x),
                 output_router_logits=True)
        plain = hf(torch.as_tensor(x), attention_mask=torch.as_tensor(mask), labels=torch.as_tensor(x)).loss
    _, taps = model(jnp.asarray(x), segment_ids=jnp.asarray(mask), taps=("router",))
    ours = float(moe.load_balancing_loss(taps["router"], jnp.asarray(mask), model.cfg))
    assert abs(ours - float(out.aux_loss)) <= 1e-5 * float(out.aux_loss)
    assert abs(float(out.loss) - float(plain) - 0.25 * float(out.aux_loss)) < 1e-5
    unmasked = float(moe.load_balancing_loss(taps["router"], jnp.ones_like(mask), model.cfg))
    assert abs(unmasked - ours) > 1e-4  # the mask matters on this batch, so the test would see it ignored


def test_aux_loss_is_k_when_routing_is_uniform_and_dense_models_have_none():
    cfg = CONFIGS["tiny-qwen3-moe"]
    logits = jnp.zeros((2, 3, 5, cfg.experts.n_experts))  # [L, B, T, E]: every expert equally likely
    assert abs(float(moe.load_balancing_loss(logits, jnp.ones((3, 5)), cfg)) - cfg.experts.top_k) < 1e-6
    assert float(moe.load_balancing_loss(None, jnp.ones((3, 5)), CONFIGS["tiny-qwen3"])) == 0.0
    assert moe.aux_loss_coef(None, CONFIGS["tiny-qwen3"]) is None and moe.aux_loss_coef(None, cfg) == 0.001
    assert moe.aux_loss_coef(0.0, cfg) == 0.0


def test_grouped_equals_dense_in_values_and_gradients():
    E, k, D, F, M = 8, 2, 32, 24, 40
    keys = jax.random.split(jax.random.key(0), 5)
    h = jnp.abs(jax.random.normal(keys[0], (M, D)))  # positive, so the router column below is the lowest logit
    gate, up = (jax.random.normal(key, (E, D, F)) * D ** -0.5 for key in keys[1:3])
    down = jax.random.normal(keys[3], (E, F, D)) * F ** -0.5
    router = jax.random.normal(keys[4], (D, E)).at[:, 5].set(-10.0)  # expert 5 gets no token: an empty group
    cfg = moe.Experts(E, k, F, norm_topk_prob=False, sparse_layers=(True,))

    def out(compute, h, gate, up, down, router):
        weights, chosen, _ = moe.route(h, router, cfg)
        return compute(h, weights, chosen, gate, up, down, jax.nn.silu)

    args = (h, gate, up, down, router)
    dense, grouped = out(moe.dense_experts, *args), out(moe.grouped_experts, *args)
    assert float(jnp.max(jnp.abs(grouped - dense))) <= 1e-5
    loss = lambda compute: lambda *a: jnp.sum(jnp.sin(out(compute, *a)))  # noqa: E731
    g_dense = jax.grad(loss(moe.dense_experts), argnums=range(5))(*args)
    g_grouped = jax.grad(loss(moe.grouped_experts), argnums=range(5))(*args)
    for a, b in zip(g_dense, g_grouped):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5
    assert float(jnp.max(jnp.abs(g_grouped[1][5]))) == 0.0  # the unused expert learns nothing


def test_the_size_and_device_pick_grouped_or_dense(monkeypatch):
    """Tiny models take the dense path, the published ones ragged_dot on an accelerator and the dense path on CPU
    (no grouped kernel there; traced by shape only, nothing computed)."""
    seen = []
    for name in ("dense_experts", "grouped_experts"):
        f = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, f=f, name=name: seen.append(name) or f(*a))
    for backend, preset in (("tpu", "tiny-qwen3-moe"), ("tpu", "qwen3-30b-a3b"), ("cpu", "qwen3-30b-a3b")):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        cfg = CONFIGS[preset]
        shapes = moe.with_expert_shapes(cfg, {})
        p = {name: jax.ShapeDtypeStruct((*shape,), jnp.bfloat16) for name, shape in shapes.items()}
        h = jax.ShapeDtypeStruct((1, 4, cfg.dim), jnp.bfloat16)
        jax.eval_shape(lambda p, h: moe.experts(p, h, cfg.experts, jax.nn.silu), p, h)
    assert seen == ["dense_experts", "grouped_experts", "dense_experts"]


def test_presets_have_published_sizes():
    """Total parameters from the model cards: Qwen3-30B-A3B 30.5B, Qwen3-235B-A22B 235B (shapes only)."""
    def n(name):
        return sum(x.size for x in jax.tree.leaves(nnx.state(ckpt.abstract_model(get_config(name)), nnx.Param)))
    assert abs(n("qwen3-30b-a3b") / 1e9 - 30.5) < 0.1
    assert abs(n("qwen3-235b-a22b") / 1e9 - 235) < 1
    assert not hasattr(ckpt.abstract_model(get_config("qwen3-30b-a3b")).layers, "gate")  # no dense MLP stored
    assert ckpt.hub_repo("qwen3-30b-a3b") == "Qwen/Qwen3-30B-A3B"


def test_a_mixed_model_trains_each_layer_s_kind():
    """The tiny preset made mixed (layer 0 dense): a gradient reaches the router, the experts and the dense MLP
    where they are used, and nothing where not, through the scanned and the unrolled forward alike."""
    import dataclasses
    from model import unstack_layers
    tiny = CONFIGS["tiny-qwen3-moe"]
    assert tiny.experts.sparse_layers == (True, True) and tiny.vocab_size == 259
    cfg = tiny.replace(n_layers=3, experts=dataclasses.replace(tiny.experts, sparse_layers=(False, True, True)))
    model = Transformer(cfg, nnx.Rngs(0))
    x = jnp.asarray(tokens(2, 16, 259))
    np.testing.assert_allclose(model(x), model(x, layers=unstack_layers(model)), rtol=1e-5, atol=1e-5)
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model).layers
    assert float(jnp.abs(grads.router[...][1:]).max()) > 0 and float(jnp.abs(grads.router[...][0]).max()) == 0
    assert float(jnp.abs(grads.expert_down[...][1:]).max()) > 0 and float(jnp.abs(grads.gate[...][0]).max()) > 0
    assert float(jnp.abs(grads.gate[...][1:]).max()) == 0  # a sparse layer's dense MLP is unused


def test_shard_rules_place_the_experts():
    mesh = shard.make_mesh("fsdp=1")
    for path, shape in (("layers/router", (3, 128, 4)), ("layers/expert_gate", (3, 4, 128, 64)),
                        ("layers/expert_up", (3, 4, 128, 64)), ("layers/expert_down", (3, 4, 64, 128))):
        spec = shard.spec_for(path, shape, mesh)
        assert "tp" not in spec and (("fsdp" in spec) == (path != "layers/router"))  # D on fsdp, experts whole


@pytest.mark.parametrize("script,args,message", [
    ("lora.py", ["--lora-targets", "q,gate"], "LoRA on a mixture-of-experts model takes q,k,v,o"),
    ("dpo.py", ["--lora", "--quant", "nf4"], "QLoRA does not quantize a mixture-of-experts model's experts")])
def test_adapters_the_experts_cannot_take_are_one_line(tmp_path, script, args, message):
    """The experts take no adapters and are not quantized yet: an MLP target or --quant on a MoE model is one
    line before anything trains, rather than dense adapters the sparse layers never use."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, script, "--model", "tiny-qwen3-moe", *args, "--out", str(tmp_path / "run")],
                       cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr


def test_peft_loads_our_moe_attention_adapter_with_the_same_logits(tmp_path):
    """LoRA on a MoE model: q, k, v, o by default (PEFT's own default for Qwen MoE); the adapter saved in PEFT's
    layout gives transformers + peft our logits on a mixed qwen3_moe checkpoint."""
    import adapters
    import peft
    from test_lora import trained_adapter
    hf = make_hf_model("qwen3_moe", attn_implementation="eager")
    base = save_hf_model(hf, tmp_path / "base")
    ours = adapters.add_lora(ckpt.load_hf(base), 4, 8.0)
    assert ours.lora.targets == ("q", "k", "v", "o")
    trained_adapter(ours, scale=0.1)  # B moved away from 0
    ckpt.save_peft(ours, tmp_path / "adapter", base_model=str(base))
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = tokens()
    want = hf_logits(theirs, x)
    assert rel_err(want, hf_logits(make_hf_model("qwen3_moe", attn_implementation="eager"), x)) > 1e-3
    assert rel_err(ours(jnp.asarray(x)), want) <= 2e-4


# A two-step run of each script on the MoE preset (sft.py's: the learning test below).
MOE_RUNS = {
    "lora.py": ["--train-examples", "64", "--batch-size", "8", "--merge"],  # adapters on q, k, v, o
    "dpo.py": ["--warmup-sft-steps", "2", "--train-examples", "32", "--batch-size", "8"],
    "grpo.py": ["--warmup-sft-steps", "2", "--warmup-sft-batch-size", "8", "--prompts-per-step", "4", "--num-generations",
                "4", "--train-examples", "64", "--router-aux-loss-coef", "0.01"],
    "distill.py": ["--teacher", "tiny-qwen3", "--teacher-steps", "2", "--train-examples", "64", "--batch-size", "8"],
}


def test_every_script_trains_a_moe_model_and_logs_its_aux_loss(tmp_path):
    """Each of MOE_RUNS for two steps, all at once (a run is mostly compiling, which is one thread each): every
    one exits 0, logs aux_loss (about k = 2 when routing is balanced) at each step and exports a qwen3_moe model."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parent.parent
    runs = {script: subprocess.Popen([sys.executable, script, "--model", "tiny-qwen3-moe", *args, "--steps", "2",
                                      "--log-every", "1", "--eval-every", "2", "--eval-examples", "4", "--out",
                                      str(tmp_path / script)], cwd=root, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "XLA_FLAGS": ""})
            for script, args in MOE_RUNS.items()}
    errors = {script: proc.communicate(timeout=900)[1] for script, proc in runs.items()}
    for script, proc in runs.items():
        assert proc.returncode == 0, (script, errors[script][-3000:])
        records = [json.loads(line) for line in (tmp_path / script / "metrics.jsonl").read_text().splitlines()]
        trained = [rec for rec in records if rec.get("step", 0) >= 1 and "loss" in rec]
        assert len(trained) == 2 and all(1.0 < rec["aux_loss"] < 4.0 for rec in trained), (script, trained)
        exported = json.loads((tmp_path / script / "hf" / "config.json").read_text())  # as transformers loads it
        assert exported["model_type"] == "qwen3_moe" and exported["num_experts"] == 4, script


@pytest.mark.slow
def test_sft_learns_the_task_on_the_moe_preset(tmp_path):
    """python sft.py --model tiny-qwen3-moe, its first 400 steps: held-out accuracy from 0 past 0.6 (measured 0.84
    at step 400, 0.996 at the default 1200), routing kept balanced (aux_loss near k = 2)."""
    from test_sft import metrics, run_sft
    r = run_sft("--model", "tiny-qwen3-moe", "--steps", "400", "--eval-every", "400", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    evals = [m["eval/accuracy"] for m in metrics(tmp_path / "run") if "eval/accuracy" in m]
    assert evals[0] < 0.05 and evals[-1] >= 0.6, evals
    assert [m["aux_loss"] for m in metrics(tmp_path / "run") if "aux_loss" in m][-1] < 2.3  # balanced by the end
    assert json.loads((tmp_path / "run" / "hf" / "config.json").read_text())["model_type"] == "qwen3_moe"
