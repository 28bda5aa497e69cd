"""lora.py and the adapter/quantization code under it: the adapter math, PEFT interchange in both
directions, quantization error bounds, the default run's bar, resume, mesh, bad input."""
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ckpt
import data
import adapters
import model as M
import sft
import tasks
import tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = ["--train-examples", "2000", "--eval-examples", "16", "--batch-size", "32", "--eval-every", "1000"]


def run_lora(*args, env=None, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "", **(env or {})}
    return subprocess.run([sys.executable, "lora.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


def trained_adapter(model, seed=1, scale=0.05):
    """Give every B a random value, as training would (a fresh adapter is the identity)."""
    state = nnx.state(model, adapters.LoRA)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [
        x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    return model


def tokens(vocab=259, shape=(2, 12), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


# ----------------------------------------------------------------------------- adapter math

@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gemma3"])
def test_fresh_adapter_is_identity_and_merge_equals_adapter(name):
    model = M.Transformer(M.CONFIGS[name], nnx.Rngs(0))
    x = jnp.asarray(tokens())
    base = model(x)
    adapters.add_lora(model, 4, 8.0, rslora=name == "tiny-gemma3")
    np.testing.assert_array_equal(model(x), base)  # B = 0: exactly the base
    trained_adapter(model)
    adapted = model(x)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2  # the adapters change the function
    merged = adapters.merge_lora(model)
    assert not any(isinstance(v, adapters.LoRA) for v in jax.tree.leaves(nnx.state(merged), is_leaf=lambda v: isinstance(v, nnx.Variable)))
    np.testing.assert_allclose(merged(x), adapted, atol=1e-5, rtol=1e-5)


def test_lora_scale_and_dropout():
    assert adapters.LoRAConfig(8, 16.0).scale == 2.0 and adapters.LoRAConfig(16, 16.0, rslora=True).scale == 4.0
    model = M.Transformer(M.CONFIGS["tiny-llama3"], nnx.Rngs(0))
    adapters.add_lora(model, 4, 8.0, targets=("q", "v"), dropout=0.5)
    assert {k for k in vars(model.layers) if "lora" in k} == {"q_lora_a", "q_lora_b", "v_lora_a", "v_lora_b"}
    trained_adapter(model)
    x = jnp.asarray(tokens())
    plain = model(x)
    np.testing.assert_array_equal(plain, model(x, dropout_key=None))
    a, b = model(x, dropout_key=jax.random.key(0)), model(x, dropout_key=jax.random.key(1))
    assert float(jnp.max(jnp.abs(a - plain))) > 1e-4 and float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_training_moves_only_the_adapters():
    """Base parameters bit-identical after training; only adapters in the optimizer state."""
    model = adapters.add_lora(M.Transformer(M.CONFIGS["tiny-qwen3"], nnx.Rngs(0)), 8, 16.0)
    graphdef, params, frozen = nnx.split(model, adapters.LoRA, ...)
    base_before = jax.tree.map(np.array, frozen)
    lora_before = jax.tree.map(np.array, params)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    assert {p[-1] for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0] if hasattr(p[-1], "key")} \
        <= {f"{t}_lora_{f}" for t in adapters.TARGETS for f in "ab"}
    step = jax.jit(sft.make_train_step(graphdef, tx))  # lora.py trains with sft.py's step
    task, tok = tasks.Arithmetic("*", 3, 1), tokenizer.ByteTokenizer()
    batch = data.collate([[data.tokenize(r, tok)] for r in task.examples("train", 16)], 32)
    batch = {k: v[None] for k, v in batch.items()}
    first = None
    for i in range(5):
        params, opt_state, out = step(params, opt_state, frozen, batch, jax.random.key(i))
        first = first if first is not None else float(out["loss"])
    assert float(out["loss"]) < first
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, b)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora_before), jax.tree.leaves(params))
               if a.any() or b.any())


# ----------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantization_error_within_the_format_bound(fmt):
    w = 0.02 * jax.random.normal(jax.random.key(0), (3, 128, 96))
    w = w.at[0, 0, 0].set(1.0)  # an outlier only inflates its own block's scale
    codes, scales = adapters.quantize(w, fmt, 64)
    assert codes.dtype == (jnp.uint8 if fmt == "nf4" else jnp.int8)
    assert codes.shape == (3, 128 * 96 // 64, 64 // 2 if fmt == "nf4" else 64)
    back = adapters.dequantize(codes, scales, w.shape, jnp.float32)
    absmax = jnp.repeat(jnp.max(jnp.abs(w.reshape(3, -1, 64)), -1), 64, axis=-1).reshape(w.shape)
    err = jnp.abs(back - w)
    if fmt == "int8":
        assert bool(jnp.all(err <= absmax / 254 * (1 + 1e-5)))  # half a step of absmax / 127
    else:  # the nearest of 16 levels: at most half the widest gap (between -1.0 and -0.6962)
        assert bool(jnp.all(err <= absmax * (1 - 0.6961928009986877) / 2 * (1 + 1e-5)))
        levels = adapters.NF4_LEVELS[None, None, None, :] * absmax[..., None]
        np.testing.assert_allclose(err, jnp.min(jnp.abs(levels - w[..., None]), -1), atol=1e-7)
    np.testing.assert_array_equal(back.reshape(3, -1, 64).max(-1) >= 0, True)
    assert float(jnp.max(jnp.abs(back[0, 0]))) == pytest.approx(1.0)  # absmax itself is exact


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_model_runs_on_its_dequantized_weights(fmt):
    model = adapters.add_lora(M.Transformer(M.CONFIGS["tiny-gemma3"], nnx.Rngs(0)), 4, 8.0)
    trained_adapter(model)
    full_bytes = M.param_bytes(model)
    adapters.quantize_model(model, fmt)
    assert M.param_bytes(model) < (0.25 if fmt == "nf4" else 0.35) * full_bytes
    x = jnp.asarray(tokens())
    merged = adapters.merge_lora(model)  # dequantized weights + adapters, as a plain model
    np.testing.assert_allclose(merged(x), model(x), atol=1e-4, rtol=1e-4)
    from sample import generate  # the sampler runs on quantized models too
    assert generate(model, [[1, 2, 3]], max_new_tokens=4) == generate(merged, [[1, 2, 3]], max_new_tokens=4)


# ----------------------------------------------------------------------------- PEFT interchange

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from hf_models import make_hf_model
    dirs = {}
    for family in ("qwen3", "gemma3", "llama3"):
        path = tmp_path_factory.mktemp(family)
        make_hf_model(family).save_pretrained(path)
        tokenizer.ByteTokenizer().save(path)  # so lora.py --ckpt finds a tokenizer (ids < 259 fit every vocab here)
        dirs[family] = path
    return dirs


def hf_model(path):
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def torch_logits(model, x):
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(x)).logits.float().numpy()


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "llama3"])
def test_peft_loads_our_adapter_with_the_same_logits(family, hf_dirs, tmp_path):
    import peft
    ours = ckpt.load_hf(hf_dirs[family])
    adapters.add_lora(ours, 4, 8.0, targets=("q", "k", "v", "o", "gate", "up", "down") if family != "llama3"
               else ("q", "o", "down"), rslora=family == "gemma3")
    trained_adapter(ours)
    ckpt.save_peft(ours, tmp_path / "adapter", base_model=str(hf_dirs[family]))
    theirs = peft.PeftModel.from_pretrained(hf_model(hf_dirs[family]), tmp_path / "adapter").eval()
    x = tokens(vocab=ours.cfg.vocab_size)
    want = torch_logits(theirs, x)
    assert np.max(np.abs(want - torch_logits(hf_model(hf_dirs[family]), x))) > 1e-2  # the adapter matters
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_an_adapter_peft_saved_loads_into_ours(rslora, hf_dirs, tmp_path):
    import peft
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                             init_lora_weights=False, use_rslora=rslora, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf_model(hf_dirs["qwen3"]), config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = ckpt.load_peft(ckpt.load_hf(hf_dirs["qwen3"]), tmp_path / "adapter")
    assert ours.lora.targets == ("q", "v", "gate", "down") and ours.lora.rslora == rslora
    x = tokens(vocab=ours.cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), torch_logits(theirs, x), atol=1e-4, rtol=1e-4)
    # and back out: our save of what we loaded is what PEFT saved
    ckpt.save_peft(ours, tmp_path / "again")
    from safetensors.numpy import load_file
    a, b = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("edit,message", [
    ({"peft_type": "PREFIX_TUNING"}, "only LORA is supported"),
    ({"use_dora": True}, "unsupported LoRA options: use_dora"),
    ({"target_modules": ["lm_head"]}, "target_modules ['lm_head']"),
])
def test_unusable_peft_adapters_are_refused_by_name(edit, message, hf_dirs, tmp_path):
    ours = adapters.add_lora(ckpt.load_hf(hf_dirs["qwen3"]), 2, 4.0)
    ckpt.save_peft(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ckpt.CheckpointError, match=__import__("re").escape(message)):
        ckpt.load_peft(ckpt.load_hf(hf_dirs["qwen3"]), tmp_path / "adapter")


def test_adapter_of_another_shape_is_refused_by_name(hf_dirs, tmp_path):
    ckpt.save_peft(adapters.add_lora(ckpt.load_hf(hf_dirs["qwen3"]), 2, 4.0), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ckpt.CheckpointError, match=r"layers.0.self_attn.q_proj.lora_A.weight: adapter shape "
                                                   r"\(2, (\d+)\) does not match the model's \(3, \1\)"):
        ckpt.load_peft(ckpt.load_hf(hf_dirs["qwen3"]), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    other = ckpt.load_hf(hf_dirs["gemma3"])  # another model, with more layers than the adapter
    with pytest.raises(ckpt.CheckpointError, match=r"missing tensor base_model.model.model.layers.\d+.self_attn.q_proj.lora_A.weight"):
        ckpt.load_peft(other, tmp_path / "adapter")


# ----------------------------------------------------------------------------- the script

@pytest.mark.slow
def test_default_run_learns_the_task_with_few_parameters(tmp_path):
    start = time.time()
    r = run_lora("--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = metrics(tmp_path / "run")
    assert rows[0]["trainable_fraction"] <= 0.15
    evals = [m for m in rows if "eval/accuracy" in m]
    assert evals[0]["eval/accuracy"] < 0.05
    assert evals[-1]["eval/accuracy"] >= 0.8, evals
    print(f"\ndefault lora: eval/accuracy {evals[0]['eval/accuracy']} -> {evals[-1]['eval/accuracy']} "
          f"training {rows[0]['trainable_fraction']:.1%} of the parameters, in {time.time() - start:.0f} s")
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_merge_and_continue_from_the_adapter(tmp_path, hf_dirs):
    """--merge writes base + adapters, whose logits equal the adapter model's; --adapter continues."""
    base = hf_dirs["qwen3"]
    args = ["--ckpt", str(base), *SMALL, "--steps", "3", "--lr", "1e-2"]
    r = run_lora(*args, "--merge", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr[-2000:]
    adapted = ckpt.load_peft(ckpt.load_hf(base), tmp_path / "a" / "adapter")
    merged = ckpt.load_hf(tmp_path / "a" / "hf")
    x = jnp.asarray(tokens(vocab=merged.cfg.vocab_size))
    np.testing.assert_allclose(merged(x), adapted(x), atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(merged(x) - ckpt.load_hf(base)(x)))) > 1e-4  # it did train
    r = run_lora(*args, "--adapter", str(tmp_path / "a" / "adapter"), "--log-every", "1", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr[-2000:]
    # the continued run starts where the first ended: its first loss is below a fresh run's first
    fresh = run_lora(*args, "--log-every", "1", "--out", str(tmp_path / "c"))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert losses(tmp_path / "b")[1] < losses(tmp_path / "c")[1]


def test_mesh_4x2_logs_the_single_device_losses(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    args = [*SMALL, "--steps", "4", "--log-every", "1", "--quant", "int8"]
    one = run_lora(*args, "--mesh", "fsdp=1,tp=1", "--out", str(tmp_path / "one"), env=env)
    eight = run_lora(*args, "--mesh", "fsdp=4,tp=2", "--out", str(tmp_path / "eight"), env=env)
    assert one.returncode == 0 and eight.returncode == 0, (one.stderr[-1000:], eight.stderr[-1000:])
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(a) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step])


@pytest.mark.slow
def test_qlora_on_real_gemma3_saves_memory_and_learns(gemma3_dir, tmp_path):
    rows = [{"prompt": f"Q: What is the secret word number {i}?\nA:", "completion": f" zebra{i} lighthouse"}
            for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_lora("--ckpt", str(gemma3_dir), "--quant", "nf4", "--data", str(tmp_path / "train.jsonl"),
                 "--steps", "4", "--batch-size", "8", "--lr", "2e-3", "--log-every", "1",
                 "--out", str(tmp_path / "run"), timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    first = metrics(tmp_path / "run")[0]
    print(f"\nQLoRA gemma3-270m: parameter memory {first['param_bytes'] / 2**20:.0f} MiB = "
          f"{first['param_bytes'] / first['param_bytes_float32']:.1%} of float32; trains "
          f"{first['trainable_fraction']:.2%}; losses {losses(tmp_path / 'run')}")
    assert first["param_bytes"] <= 0.35 * first["param_bytes_float32"]
    assert first["trainable_fraction"] < 0.01
    loss = losses(tmp_path / "run")
    assert loss[4] < 0.7 * loss[1], loss


@pytest.mark.parametrize("args,message", [
    (["--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
    (["--lora-targets", "q,attn"], "unknown --lora-targets attn"),
    (["--quant", "nf3"], "--quant must be nf4 or int8"),
    (["--adapter", "/no/such/adapter"], "/no/such/adapter: not a PEFT adapter directory"),
    (["--lora-dropout", "1.5"], "0 <= --lora-dropout < 1"),
])
def test_bad_flags_are_one_clear_line(tmp_path, args, message):
    r = run_lora(*args, "--out", str(tmp_path / "run"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
