"""The real-world path, offline: a real preset resolves through huggingface_hub's own cache lookup (the
call that downloads when online), a preset that is not there stops with one line, --init random still
works; grpo.py on the real Gemma 3 270M with a GSM8K-format parquet runs with the pretrained defaults
(no warm-up, the reasoning system prompt) and reports to TensorBoard and Weights & Biases (offline) the
numbers metrics.jsonl holds; curves.py draws a run."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

import ckpt
import flags
import run

ROOT = pathlib.Path(__file__).resolve().parent.parent


def hub_cache(root: pathlib.Path, repo: str, files: pathlib.Path) -> pathlib.Path:
    """HF_HOME=root holding `files` as the hub's cache lays out a download: blobs/, snapshots/<commit>/
    (links into blobs/), refs/main naming the commit."""
    repo_dir = root / "hub" / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in files.iterdir():
        if f.name == "DONE":
            continue
        blob = repo_dir / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        blob.symlink_to(f.resolve())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, gemma3_dir, monkeypatch):
    """An offline machine whose Hugging Face cache holds google/gemma-3-270m (the real weights)."""
    snapshot = hub_cache(tmp_path / "hf", "google/gemma-3-270m", gemma3_dir)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # for the scripts run as subprocesses
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants  # read at import: set where this process's huggingface_hub looks
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_a_real_preset_resolves_through_the_hub_cache(offline_hub):
    loaded = ckpt.load_model("gemma3-270m")
    assert loaded.directory.resolve() == offline_hub.resolve()
    assert loaded.model.cfg.vocab_size == 262144 and "random" not in loaded.source


def test_a_preset_not_in_the_cache_is_one_clear_line(offline_hub):
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_model("qwen3-0.6b")
    message = str(e.value)
    assert "\n" not in message and "Qwen/Qwen3-0.6B" in message and "--init random" in message, message


def test_init_random_needs_no_weights(offline_hub):
    loaded = ckpt.load_model("qwen3-0.6b", init="random", dtype="float32")
    assert loaded.directory is None and loaded.source == "random qwen3-0.6b"
    assert loaded.model.cfg.n_layers == 28


def gsm8k_parquet(path: pathlib.Path, n: int) -> pathlib.Path:
    """Rows in GSM8K's own columns: question, and answer ending in "#### <number>"."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"question": f"Ann has {a} apples and buys {a + 1} more. How many apples does she have?",
             "answer": f"She has {a} + {a + 1} = {2 * a + 1} apples.\n#### {2 * a + 1}"} for a in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_on_the_real_gemma_with_pretrained_defaults_reports_everywhere(offline_hub, tmp_path):
    data = gsm8k_parquet(tmp_path / "gsm8k.parquet", 8)
    out = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, "grpo.py", "--model", "gemma3-270m", "--data", str(data), "--eval-data", str(data),
                        "--steps", "2",
                        "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-len", "8",
                        "--eval-examples", "2", "--eval-every", "2", "--log-every", "1",
                        "--report-to", "tensorboard,wandb", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warm-up" not in r.stderr  # a pretrained model starts GRPO at once
    assert "lr 1e-06" in r.stderr and "First think" in r.stderr, r.stderr[-3000:]  # settings and rendered prompt
    records = metrics(out)
    train = [m for m in records if "reward" in m]
    assert [m["step"] for m in train] == [1, 2] and all(m["lr"] <= 1e-6 for m in train)
    assert all("rewards/accuracy_reward" in m and "rewards/format_reward" in m for m in train)
    assert "eval/reward" in records[-1]

    # TensorBoard's own reader returns what metrics.jsonl holds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("reward", "loss", "kl", "eval/reward"):
        want = {m["step"]: m[key] for m in records if key in m}
        got = {e.step: e.value for e in events.Scalars(key)}
        assert want and got.keys() == want.keys(), key
        assert all(abs(got[s] - want[s]) <= 1e-6 * max(1.0, abs(want[s])) for s in want), key
    # W&B offline: the run's file holds the same numbers at the same steps
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((out / "wandb").rglob("*"))[:20]
    history = {h["_step"]: h for h in wandb_history(runs[0])}
    for key in ("reward", "loss", "eval/reward"):
        want = {m["step"]: m[key] for m in records if key in m}
        assert want and all(abs(history[s][key] - want[s]) <= 1e-6 * max(1.0, abs(want[s])) for s in want), key


def wandb_history(path) -> list[dict]:
    """The logged rows of an offline W&B run file: LevelDB's log format (32 KiB blocks of records with a 7-byte
    header: crc, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ":W&B" file header, each record a
    wandb_internal_pb2.Record."""
    import struct
    from wandb.proto import wandb_internal_pb2
    raw, pos, pending, rows = pathlib.Path(path).read_bytes(), 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending, pos = pending + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_report_to_checks_its_names():
    with pytest.raises(ValueError, match="--report-to"):
        flags.check_report_to("tensorboard,mlflow")


def test_curves_draws_a_png(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rows = [{"step": s, "loss": 1.0 / (s + 1), "reward": s / 10, **({"eval/reward": s / 8} if s % 5 == 0 else {})}
            for s in range(0, 21)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, "curves.py", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "reward, eval/reward, loss" in r.stderr
    bad = subprocess.run([sys.executable, "curves.py", str(out), "--keys", "nope"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == ["error: no run logged nope"]
