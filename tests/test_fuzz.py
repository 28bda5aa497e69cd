"""Hostile files: every reader of user files fed thousands of seeded mutations and truncations of a good
file. Each case must end either in success or in the module's own error (CheckpointError, DataError,
TokenizerError: ValueErrors with a one-line message): no other exception, no hang, no huge allocation
(the cases run under an 8 GiB address-space limit), nothing written outside the case's directory."""
import json
import os
import pathlib
import resource
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("private_jax_cache")  # runs killed or starved write no shared cache
CASES = int(os.environ.get("NANOTUNE_FUZZ_CASES", "1000"))  # per reader


def mutate(good: bytes, rng) -> bytes:
    """One seeded mutation: flipped bytes, a truncation, an inserted / deleted / repeated span, or (JSON) a
    value swapped for one of the wrong type or size."""
    kind = int(rng.integers(7))
    data = bytearray(good)
    n = len(data)
    if kind == 0 and n:  # flip a few bytes
        for i in rng.integers(0, n, int(rng.integers(1, 8))):
            data[i] = int(rng.integers(256))
    elif kind == 1:  # truncate
        data = data[:int(rng.integers(0, n + 1))]
    elif kind == 2:  # insert random bytes
        i = int(rng.integers(0, n + 1))
        data[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 64))).astype("uint8"))
    elif kind == 3 and n:  # delete a span
        i = int(rng.integers(0, n))
        del data[i:i + int(rng.integers(1, 256))]
    elif kind == 4 and n:  # repeat a span
        i = int(rng.integers(0, n))
        data[i:i] = data[i:i + int(rng.integers(1, 256))] * int(rng.integers(1, 4))
    else:  # a JSON value of the wrong type or size, wherever the text holds JSON
        return json_mutation(good, rng)
    return bytes(data)


WRONG = [None, True, -1, 0, 2 ** 62, -2 ** 62, 1e308, float("nan"), "", "x" * 10000, "../../escape", [], [1, 2, 3],
         {}, {"a": 1}, [[]], "\u0000", "é"]


def json_mutation(good: bytes, rng) -> bytes:
    lines = good.split(b"\n")
    i = int(rng.integers(len(lines)))
    try:
        value = json.loads(lines[i]) if len(lines) > 1 else json.loads(good)
    except ValueError:
        return good[:len(good) // 2]

    def visit(node, depth=0):  # mutate one random node in place (or return a replacement for the root)
        if isinstance(node, dict) and node and depth < 6:
            key = list(node)[int(rng.integers(len(node)))]
            choice = int(rng.integers(4))
            if choice == 0:
                del node[key]
            elif choice == 1:
                node[key] = WRONG[int(rng.integers(len(WRONG)))]
            else:
                node[key] = visit(node[key], depth + 1)
            return node
        if isinstance(node, list) and node and depth < 6:
            j = int(rng.integers(len(node)))
            node[j] = visit(node[j], depth + 1) if rng.integers(2) else WRONG[int(rng.integers(len(WRONG)))]
            return node
        return WRONG[int(rng.integers(len(WRONG)))]
    text = json.dumps(visit(value)).encode()
    if len(lines) > 1:
        lines[i] = text
        return b"\n".join(lines)
    return text


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["jsonl_sft", "jsonl_grpo", "jsonl_dpo", "parquet", "safetensors", "config",
                                    "tokenizer", "peft"])
def test_every_mutated_file_ends_in_the_readers_own_error(reader, tmp_path):
    """Runs fuzz_worker.py in a child process (an 8 GiB address-space limit: a huge allocation fails there)."""
    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_worker.py"), reader, str(CASES), str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60 + CASES * 2, preexec_fn=limits,
                       env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\n{reader}: {summary}")
    assert summary["cases"] == CASES and summary["other"] == 0, summary
    assert sum(summary.values()) - summary["cases"] == CASES  # every case ended one of the counted ways
    outside = [p for p in tmp_path.parent.iterdir() if p.name.startswith("escape")]
    assert not outside, outside
