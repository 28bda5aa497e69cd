"""ckpt.py: HF round trips through transformers, sharded and bf16 checkpoints, the real
Gemma 3 270M, preset resolution, and every bad-checkpoint error."""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import ckpt
from ckpt import CheckpointError
from hf_models import hf_logits, make_hf_model
from model import CONFIGS, Transformer


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def tokens(batch=2, length=40, vocab=259, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def randomized(name: str, seed: int = 0) -> Transformer:
    """A tiny preset whose norms and biases are random too, so a swapped name would show."""
    model = Transformer(CONFIGS[name], nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    return model


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("tiny-")])
def test_save_hf_loads_in_transformers_with_same_logits(name, tmp_path):
    model = randomized(name)
    ckpt.save_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    x = tokens()
    ours = model(jnp.asarray(x))
    assert rel_err(hf_logits(hf, x), ours) < 1e-4
    back = ckpt.load_hf(tmp_path / "hf")
    assert back.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(back))):
        np.testing.assert_array_equal(a, b)


def test_sharded_save_and_load(tmp_path):
    model = randomized("tiny-gemma2")
    ckpt.save_hf(model, tmp_path / "hf", max_shard_bytes=300_000)
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    x = tokens()
    assert rel_err(hf_logits(hf, x), model(jnp.asarray(x))) < 1e-4
    assert rel_err(ckpt.load_hf(tmp_path / "hf")(jnp.asarray(x)), model(jnp.asarray(x))) == 0.0


def test_hf_sharded_bf16_checkpoint(tmp_path):
    """Hub checkpoints are bf16 and sharded; we read them into float32 or keep bf16."""
    hf = make_hf_model("qwen3")
    with torch.no_grad():  # round the weights to bf16 but keep computing in f32 (RoPE buffers too)
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    ref = hf_logits(hf, tokens(vocab=300))
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = ckpt.load_hf(tmp_path / "hf")
    assert ours.embed[...].dtype == jnp.float32
    assert rel_err(ours(jnp.asarray(tokens(vocab=300))), ref) < 1e-4
    kept = ckpt.load_hf(tmp_path / "hf", dtype="bfloat16")
    assert kept.embed[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kept.embed[...], np.float32), np.asarray(ours.embed[...]))


def test_save_never_leaves_a_half_written_checkpoint(tmp_path, monkeypatch):
    good = randomized("tiny-qwen3")
    ckpt.save_hf(good, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        ckpt.save_hf(randomized("tiny-qwen3", seed=5), tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary directories left behind


def test_real_gemma3_270m(gemma3_dir):
    """The published weights: same top-5 next tokens as transformers and max rel. error <= 1e-3."""
    ids = np.array([[2, 818, 5279, 529, 7001, 563]], np.int32)  # "The capital of France is"
    hf = transformers.AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32)
    ref = hf_logits(hf, ids)
    del hf
    model = ckpt.load_hf(gemma3_dir)
    assert model.cfg.n_layers == 18 and model.cfg.sliding_layers.count(False) == 3
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    start = time.perf_counter()
    ours = np.asarray(forward(state, jnp.asarray(ids)))
    print(f"\nGemma 3 270M forward, first call (trace + compile + run): {time.perf_counter() - start:.2f} s")
    top5 = list(np.argsort(-ours[0, -1])[:5])
    assert top5 == list(np.argsort(-ref[0, -1])[:5]) == [506, 496, 9079, 886, 3224]
    assert rel_err(ours, ref) <= 1e-3


def test_preset_resolves_to_local_hf_cache(tmp_path, monkeypatch, capsys):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    small = randomized("tiny-qwen3")
    ckpt.save_hf(small, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    from huggingface_hub import constants  # read at import: set where huggingface_hub looks now
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, source, directory = ckpt.load_model("qwen3")
    assert source == str(snapshot) and directory == snapshot and model.cfg.dim == small.cfg.dim
    # --ckpt always wins over the cache
    other = tmp_path / "other"
    ckpt.save_hf(randomized("tiny-llama3"), other)
    loaded = ckpt.load_model("qwen3", ckpt=other)
    assert loaded.model.cfg.family == "llama3" and loaded.directory == other
    # a preset with no checkpoint to be had: one line naming the repo and the ways out; random only when asked
    monkeypatch.setitem(ckpt.HF_REPOS, "tiny-gemma", "google/not-downloaded")
    with pytest.raises(ckpt.CheckpointError, match="google/not-downloaded is not in the Hugging Face cache") as e:
        ckpt.load_model("tiny-gemma")
    # in our own words, whole: why (offline here) and the ways out, not huggingface_hub's message cut short
    assert "cannot be reached" in str(e.value) and str(e.value).endswith("--init random for random weights")
    assert "repo look-ups" not in str(e.value) and "\n" not in str(e.value)
    loaded = ckpt.load_model("tiny-gemma", init="random")
    assert loaded.source == "random tiny-gemma" and loaded.directory is None


# ----------------------------------------------------------------------------- bad checkpoints

@pytest.fixture
def good_dir(tmp_path):
    ckpt.save_hf(randomized("tiny-qwen3"), tmp_path / "good")
    return tmp_path / "good"


def edit_tensors(path, edit):
    from safetensors.numpy import load_file, save_file
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_config(good_dir):
    (good_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        ckpt.load_hf(good_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        ckpt.load_hf(tmp_path / "nope")


def test_unknown_model_type(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    (good_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'mamba'"):
        ckpt.load_hf(good_dir)


def test_malformed_config(good_dir):
    (good_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        ckpt.load_hf(good_dir)


def test_missing_tensors_are_listed(good_dir):
    edit_tensors(good_dir, lambda t: (t.pop("model.layers.1.mlp.up_proj.weight"), t.pop("model.norm.weight")))
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight.*model\.norm\.weight"):
        ckpt.load_hf(good_dir)


def test_unexpected_tensors_are_listed(good_dir):
    edit_tensors(good_dir, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.mlp\.extra\.weight"):
        ckpt.load_hf(good_dir)


def test_shape_mismatch_names_tensor_and_shapes(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    (good_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 8}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: checkpoint shape \(384, 128\) "
                                              r"does not match the config's \(392, 128\)"):
        ckpt.load_hf(good_dir)


def test_corrupt_safetensors(good_dir):
    file = good_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])  # truncated download
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ckpt.load_hf(good_dir)
    file.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ckpt.load_hf(good_dir)


def test_pickle_checkpoints_are_refused(good_dir):
    (good_dir / "model.safetensors").unlink()
    (good_dir / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        ckpt.load_hf(good_dir)
