"""Bad input to every CLI ends with one line on stderr starting "error: " and a non-zero exit: malformed,
empty and non-UTF-8 JSONL (with the line number), missing keys, wrong types, a broken Parquet file, a
missing or corrupt checkpoint, an unknown preset, out-of-range and unknown flags, --tpu without TPUs, an
unknown --report-to, a Hub dataset that cannot be had. (distill.py's teacher with another vocabulary:
tests/test_distill.py.)"""
import pytest

import distill
import dpo
import grpo
import lora
import ppo
import sft

MAINS = {"sft": sft.main, "lora": lora.main, "dpo": dpo.main, "grpo": grpo.main, "ppo": ppo.main,
         "distill": distill.main}
SMALL = {"sft": [], "lora": [], "dpo": ["--warmup-sft-steps", "0"], "grpo": ["--warmup-sft-steps", "0"],
         "ppo": ["--warmup-sft-steps", "0"],
         "distill": ["--teacher", "tiny-qwen3"]}
# each script's row format: a good row, a row missing a key, a row with a value of the wrong type
ROWS = {
    "completion": ('{"prompt": "a", "completion": "b"}', '{"prompt": "a"}', '{"prompt": 1, "completion": "b"}',
                   "missing key 'completion'", "'prompt' must be a string"),
    "pair": ('{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b"}',
             '{"prompt": "a", "chosen": 1, "rejected": "c"}', "expected keys 'chosen' and 'rejected'",
             "'prompt', 'chosen' and 'rejected' must all be text or all chat messages"),
    "answer": ('{"prompt": "a", "answer": "1"}', '{"prompt": "a"}', '{"prompt": 5, "answer": "1"}',
               "missing key 'answer'", "expected an object with a 'prompt'"),
}
FORMAT = {"sft": "completion", "lora": "completion", "distill": "completion", "dpo": "pair", "grpo": "answer",
          "ppo": "answer"}


def error_line(capsys, script, tmp_path, *args) -> str:
    """The script's main in this process: the one line it exits with."""
    with pytest.raises(SystemExit) as e:
        MAINS[script]([*SMALL[script], *args, "--train-examples", "50", "--out", str(tmp_path / "run")])
    assert e.value.code not in (0, None)
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err  # sys.exit / argparse
    lines = [line for line in message.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), message
    return lines[0]


def data_cases(script):
    good, missing, wrong, missing_message, wrong_message = ROWS[FORMAT[script]]
    return [
        (f"{good}\n{good[:-3]}\n".encode(), "bad.jsonl:2: bad JSON"),
        (b"\n\n", "bad.jsonl: empty file (no JSON lines)"),
        (good.replace('"a"', '"caf\xe9"').encode("latin-1") + b"\n", "bad.jsonl:1: not UTF-8"),
        (f"{good}\n{missing}\n".encode(), f"bad.jsonl:2: {missing_message}"),
        (f"{wrong}\n".encode(), f"bad.jsonl:1: {wrong_message}"),
        (b"[1, 2]\n", "bad.jsonl:1: "),
    ]


@pytest.mark.parametrize("script", list(MAINS))
@pytest.mark.parametrize("case", range(6))
def test_bad_data_files(script, case, capsys, tmp_path):
    content, message = data_cases(script)[case]
    (tmp_path / "bad.jsonl").write_bytes(content)
    assert message in error_line(capsys, script, tmp_path, "--data", str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("script", list(MAINS))
def test_a_broken_parquet_file(script, capsys, tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert "bad.parquet: not a readable Parquet file" in error_line(capsys, script, tmp_path, "--data",
                                                                    str(tmp_path / "bad.parquet"))


@pytest.mark.parametrize("script", list(MAINS))
def test_a_hub_dataset_that_cannot_be_had(script, capsys, tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    line = error_line(capsys, script, tmp_path, "--data", "nobody/no-such-dataset")
    assert "nobody/no-such-dataset: no such file, and no Hugging Face dataset could be had" in line


@pytest.mark.parametrize("script", list(MAINS))
def test_missing_and_corrupt_checkpoints(script, capsys, tmp_path):
    assert "/no/such/dir: no such checkpoint directory" in error_line(capsys, script, tmp_path, "--ckpt", "/no/such/dir")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "qwen3", ')
    assert "config.json: not valid JSON" in error_line(capsys, script, tmp_path, "--ckpt", str(tmp_path / "broken"))
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "qwen3"}')
    assert "not a config this loader understands" in error_line(capsys, script, tmp_path, "--ckpt",
                                                                str(tmp_path / "broken"))


@pytest.mark.parametrize("script", list(MAINS))
@pytest.mark.parametrize("args,message", [
    (["--model", "gpt5"], "unknown model preset 'gpt5'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--dtype", "float8"], "must be float32 or bfloat16"),
    (["--report-to", "mlflow"], "--report-to takes tensorboard and/or wandb"),
    (["--tpu"], "no TPU"),
])
def test_bad_flags(script, args, message, capsys, tmp_path):
    assert message in error_line(capsys, script, tmp_path, *args)
