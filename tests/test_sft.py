"""sft.py: it learns, its loss is the right one, it resumes exactly, it shards, and bad input
ends in one clear line."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import data
import sft
import tasks
import tokenizer
from model import CONFIGS, Transformer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = ["--train-examples", "2000", "--eval-examples", "16", "--batch-size", "32", "--eval-every", "1000"]


def run_sft(*args, env=None, timeout=600):
    """sft.py in a subprocess on one CPU device, as a user runs it (conftest simulates 8 for this
    process; a test that wants them passes XLA_FLAGS itself)."""
    env = {**os.environ, "XLA_FLAGS": "", **(env or {})}
    return subprocess.run([sys.executable, "sft.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> dict[int, float]:
    """step → loss, the last logged value for a step (a resumed run logs some steps twice)."""
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


@pytest.mark.slow
def test_default_run_learns_the_task(sft_demo):
    """`python sft.py --steps 600` (the session's one run, tests/conftest.py): held-out accuracy 0 -> >= 0.9
    (measured on 2 cores: 0.73 at 200, 0.949 at 400, 0.965 at 600), and the export answers through sample.py."""
    evals = [m for m in metrics(sft_demo) if "eval/accuracy" in m]
    assert evals[0]["eval/accuracy"] < 0.05  # does not start solved
    assert evals[-1]["eval/accuracy"] >= 0.9, evals
    print(f"\ndefault sft, 600 steps: eval/accuracy {evals[0]['eval/accuracy']} -> {evals[-1]['eval/accuracy']}")
    assert (sft_demo / "hf" / "config.json").is_file()
    # the README's next step: the exported model answers held-out problems through sample.py
    want = ["123*4=0492", "907*8=7256", "555*5=2775", "018*9=0162"]
    prompts = [a for w in want for a in ("--prompt", w[:6])]
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(sft_demo / "hf"), *prompts,
                        "--max-new-tokens", "6"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sum(got == w for got, w in zip(r.stdout.splitlines(), want)) >= 3, r.stdout


# ----------------------------------------------------------------------------- the loss

def tiny_examples(n=8, seed=0):
    task, tok = tasks.Arithmetic("+", 3, 3), tokenizer.ByteTokenizer()
    rows = task.examples("train", n, seed)
    rows[1]["completion"] += "   extra"  # unequal lengths: token counts differ between micro-batches
    return [data.tokenize(row, tok) for row in rows]


def test_loss_mask_covers_exactly_the_completion():
    tok = tokenizer.ByteTokenizer()
    ids, mask = data.tokenize({"prompt": "12+34=", "completion": "046"}, tok)
    assert ids == [tok.bos_id, *b"12+34=", *b"046", tok.eos_ids[0]]
    assert mask == [0] * 7 + [1] * 4
    ids, mask = data.tokenize({"text": "hello"}, tok)
    assert mask == [0] + [1] * 6
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}
    ids, mask = data.tokenize(conv, tok, "qwen3")
    learned = bytes(i for i, m in zip(ids, mask) if m).decode()
    assert learned == "yo<|im_end|><think>\n\n</think>\n\nok<|im_end|>"  # assistant turns + closing tokens
    assert bytes(i for i in ids if i < 256).decode() == data.apply_chat_template(conv["messages"], "qwen3", False)


def test_grad_accumulation_equals_one_big_batch():
    model = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(1.0)  # params - grads: compares the gradients themselves
    step = jax.jit(sft.make_train_step(graphdef, tx))
    batch = data.collate([[ex] for ex in tiny_examples()], 32)
    one = step(params, tx.init(params), frozen, {k: v[None] for k, v in batch.items()}, None)
    four = step(params, tx.init(params), frozen, {k: v.reshape(4, 2, -1) for k, v in batch.items()}, None)
    assert abs(float(one[2]["loss"]) - float(four[2]["loss"])) < 1e-6
    for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(four[0])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_a_moe_step_adds_the_weighted_aux_loss():
    """sft's step on a MoE model: loss = NLL + c · aux_loss (the micro-batches' mean), logged as aux_loss; c = 0
    leaves the NLL; a dense model logs none."""
    model = Transformer(CONFIGS["tiny-qwen3-moe"], nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.0)
    batch = data.collate([[ex] for ex in tiny_examples()], 32)
    two = {k: v.reshape(2, 4, -1) for k, v in batch.items()}
    out = {c: jax.jit(sft.make_train_step(graphdef, tx, c))(params, tx.init(params), frozen, two, None)[2]
           for c in (0.0, 0.5)}
    halves = [sft.token_nll(model, {k: v[i] for k, v in two.items()})[2] for i in range(2)]
    assert abs(float(out[0.5]["aux_loss"]) - float(np.mean(halves))) < 1e-5 and float(out[0.5]["aux_loss"]) > 1.0
    assert abs(float(out[0.5]["loss"] - out[0.0]["loss"]) - 0.5 * float(out[0.5]["aux_loss"])) < 1e-5
    dense = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(dense, nnx.Param, ...)
    assert "aux_loss" not in jax.jit(sft.make_train_step(graphdef, tx))(params, tx.init(params), frozen, two, None)[2]


def test_packed_batches_give_the_unpacked_loss():
    model = Transformer(CONFIGS["tiny-gemma3"], nnx.Rngs(0))
    examples = tiny_examples()
    unpacked = data.collate([[ex] for ex in examples], 32)
    packed = data.collate([examples[:4], examples[4:]], 128)
    assert packed["segment_ids"].max() == 4
    nll_a, n_a, _ = sft.token_nll(model, unpacked)
    nll_b, n_b, _ = sft.token_nll(model, packed)
    assert float(n_a) == float(n_b) and abs(float(nll_a) - float(nll_b)) < 1e-4
    stream = next(data.Batches(examples, 2, 128, pack=True))
    assert stream["segment_ids"].max() > 1


def test_batches_resume_at_a_position():
    examples = tiny_examples(20)
    a = data.Batches(examples, 3, 32, seed=1)
    seen = [next(a) for _ in range(10)]  # crosses an epoch boundary (20 examples)
    b = data.Batches(examples, 3, 32, seed=1, position=3 * 6)
    for want in seen[6:]:
        got = next(b)
        assert all(np.array_equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- resume and mesh

def test_mesh_4x2_logs_the_single_device_losses(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    args = [*SMALL, "--steps", "4", "--log-every", "1"]
    one = run_sft(*args, "--mesh", "fsdp=1,tp=1", "--out", str(tmp_path / "one"), env=env)
    eight = run_sft(*args, "--mesh", "fsdp=4,tp=2", "--out", str(tmp_path / "eight"), env=env)
    assert one.returncode == 0 and eight.returncode == 0, (one.stderr[-1000:], eight.stderr[-1000:])
    assert "'fsdp': 4, 'tp': 2" in eight.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(a) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step])


@pytest.mark.slow
def test_a_few_steps_lower_the_loss_of_real_gemma3(gemma3_dir, tmp_path):
    rows = [{"prompt": f"Q: What is the secret word number {i}?\nA:", "completion": f" zebra{i} lighthouse"}
            for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_sft("--ckpt", str(gemma3_dir), "--data", str(tmp_path / "train.jsonl"), "--steps", "4",
                "--batch-size", "8", "--lr", "5e-5", "--log-every", "1", "--out", str(tmp_path / "run"),
                timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    loss = losses(tmp_path / "run")
    assert loss[4] < 0.7 * loss[1], loss
    assert (tmp_path / "run" / "hf" / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------- bad input

def write(path, content: bytes):
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("content,message", [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"bad.jsonl:2: bad JSON"),
    (b'{"prompt": "a"}\n', r"bad.jsonl:1: missing key 'completion'"),
    (b'{"prompt": "a", "completion": 3}\n', r"bad.jsonl:1: 'completion' must be a string, got int"),
    (b'\n\n', r"bad.jsonl: empty file"),
    (b'{"text": "caf\xe9"}\n', r"bad.jsonl:1: not UTF-8"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}\n', r"bad.jsonl:1: messages\[0\] has unknown role"),
    (b'[1, 2]\n', r"bad.jsonl:1: expected a JSON object"),
])
def test_bad_data_is_one_clear_line(tmp_path, content, message):
    r = run_sft("--data", write(tmp_path / "bad.jsonl", content), "--out", str(tmp_path / "run"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), r.stderr


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such.jsonl"], "/no/such.jsonl: no such file"),
    (["--ckpt", "/no/such/dir"], "/no/such/dir: no such checkpoint directory"),
    (["--model", "gpt5"], "unknown model preset 'gpt5'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--batch-size", "10", "--grad-accum", "3"], "must be a multiple of --grad-accum"),
    (["--mesh", "fsdp=3"], "has 3 slots for 1 devices"),
    (["--tpu"], "no TPU"),
])
def test_bad_flags_are_one_clear_line(tmp_path, args, message):
    r = run_sft(*args, "--out", str(tmp_path / "run"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_checkpoints_are_never_overwritten_or_misread(tmp_path):
    out = tmp_path / "run"
    first = run_sft(*SMALL, "--steps", "2", "--save-every", "1", "--out", str(out))
    assert first.returncode == 0, first.stderr[-1000:]
    saved = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}

    again = run_sft(*SMALL, "--steps", "4", "--out", str(out))  # forgot --resume
    assert again.returncode != 0 and "already holds a run: pass --resume" in again.stderr
    other = run_sft(*SMALL, "--steps", "4", "--model", "tiny-gemma3", "--resume", "--out", str(out))
    assert other.returncode != 0
    lines = other.stderr.strip().splitlines()  # another model is another run: refused before anything is read
    assert "was written with --model 'tiny-qwen3', this command has 'tiny-gemma3'" in lines[-1]
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == saved

    for p in saved:  # corrupt every file of every checkpoint (steps 1 and 2): nothing left to fall back to
        p.write_bytes(b"garbage")
    broken = run_sft(*SMALL, "--steps", "4", "--resume", "--out", str(out))
    assert broken.returncode != 0 and "cannot restore the train state" in broken.stderr.strip().splitlines()[-1]
    assert {p: p.read_bytes() for p in saved} == {p: b"garbage" for p in saved}  # not overwritten either


def test_bf16_run_exports_a_checkpoint_transformers_loads(tmp_path):
    import torch
    import transformers

    import ckpt
    out = tmp_path / "run"
    r = run_sft(*SMALL, "--steps", "3", "--dtype", "bfloat16", "--remat", "--save-every", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    import orbax.checkpoint as ocp  # the trained parameters are float32 master weights
    saved = ocp.StandardCheckpointer().metadata(out / "checkpoints" / "3" / "state")
    assert saved.item_metadata["params"]["embed"]["value"].dtype == np.float32
    assert all(np.isfinite(m["loss"]) for m in metrics(out) if "loss" in m)
    ours = ckpt.load_hf(out / "hf")
    assert ours.cfg.param_dtype == "float32" and not ours.cfg.remat
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    x = np.random.default_rng(0).integers(0, 259, (2, 12))
    with torch.no_grad():
        ref = hf(torch.as_tensor(x)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-4)
