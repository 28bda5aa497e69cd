"""test_fuzz.py's child: `python fuzz_worker.py READER CASES DIR` feeds READER that many seeded mutations of
a good file in DIR and prints one JSON line {"cases", "ok", "own_error", "other"}; the first few "other"
outcomes (any exception but the module's own one-line error, or more than 20 s) go to stderr."""
import json
import pathlib
import signal
import sys
import traceback

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import ckpt  # noqa: E402
import data  # noqa: E402
import tokenizer  # noqa: E402
from test_fuzz import mutate  # noqa: E402

OWN = (ckpt.CheckpointError, data.DataError, tokenizer.TokenizerError)


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def tiny_model(lora: bool = False):
    from flax import nnx
    import adapters
    from model import CONFIGS, Transformer
    model = Transformer(CONFIGS["tiny-qwen3"].replace(n_layers=1), nnx.Rngs(0))
    if lora:
        adapters.add_lora(model, 2, 4.0)
    return model


def setup(reader: str, good: pathlib.Path):
    """The good files (name → bytes, the one mutated first) and the function that reads a case directory."""
    good.mkdir(parents=True, exist_ok=True)
    tok = tokenizer.ByteTokenizer()
    if reader == "jsonl_sft":
        rows = [{"prompt": "1+1=", "completion": "2"}, {"text": "plain text"},
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
        return {"train.jsonl": jsonl(rows)}, lambda d: [data.tokenize(r, tok, "qwen3")
                                                        for r in data.read_rows(d / "train.jsonl")]
    if reader == "jsonl_grpo":
        rows = [{"prompt": "What is 2+2?", "answer": "4"}, {"question": "How many?", "answer": "so #### 7"},
                {"prompt": [{"role": "user", "content": "3*3?"}], "answer": 9}]
        return {"train.jsonl": jsonl(rows)}, lambda d: data.read_rows(d / "train.jsonl", data.prompt_row)
    if reader == "jsonl_dpo":
        rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"chosen": "a b", "rejected": "a c"},
                {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                 "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}]}]
        check = lambda row, where: data.tokenize_pair(data.preference_row(row, where), tok, "qwen3", where)  # noqa
        return {"pairs.jsonl": jsonl(rows)}, lambda d: data.read_rows(d / "pairs.jsonl", check)
    if reader == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([{"prompt": "1+1=", "completion": "2"}, {"prompt": "a", "completion": "b"}]),
                       good / "train.parquet")
        return {"train.parquet": (good / "train.parquet").read_bytes()}, \
            lambda d: [data.tokenize(r, tok) for r in data.read_rows(d / "train.parquet")]
    if reader in ("safetensors", "config"):
        ckpt.save_hf(tiny_model(), good)
        files = {f.name: f.read_bytes() for f in good.iterdir() if f.is_file()}
        first = "model.safetensors" if reader == "safetensors" else "config.json"
        return {first: files.pop(first), **files}, lambda d: ckpt.load_hf(d)
    if reader == "tokenizer":
        from tokenizers import Tokenizer, models, pre_tokenizers
        words = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "a", "b"])}
        t = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        t.save(str(good / "tokenizer.json"))
        config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}
        files = {"tokenizer.json": (good / "tokenizer.json").read_bytes(),
                 "tokenizer_config.json": json.dumps(config).encode()}

        def read(d):
            loaded = tokenizer.load_tokenizer(d)
            return loaded.decode(loaded.encode("hello world a b"))
        return files, read
    if reader == "peft":
        ckpt.save_peft(tiny_model(lora=True), good)
        files = {f.name: f.read_bytes() for f in good.iterdir() if f.is_file()}
        return {"adapter_config.json": files.pop("adapter_config.json"), **files}, \
            lambda d: ckpt.load_peft(tiny_model(), d)
    raise SystemExit(f"unknown reader {reader}")


def main():
    reader, cases, work = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
    files, read = setup(reader, work / "good")
    names = list(files)
    for name, content in files.items():
        (work / "good" / name).write_bytes(content)
    read(work / "good")  # the good files read
    counts, shown = {"cases": cases, "ok": 0, "own_error": 0, "other": 0}, 0

    def too_long(*_):
        raise TimeoutError("more than 20 s")
    signal.signal(signal.SIGALRM, too_long)
    for case in range(cases):
        rng = np.random.default_rng([case, sum(map(ord, reader))])
        d = work / "case"
        d.mkdir(exist_ok=True)
        for f in d.iterdir():
            f.unlink()
        victim = names[0] if len(names) == 1 or rng.random() < 0.7 else names[int(rng.integers(1, len(names)))]
        for name, content in files.items():
            (d / name).write_bytes(mutate(content, rng) if name == victim else content)
        signal.alarm(20)
        try:
            read(d)
            counts["ok"] += 1
        except OWN as e:
            one_line = "\n" not in str(e).strip()
            counts["own_error" if one_line else "other"] += 1
            if not one_line and shown < 5:
                shown += 1
                print(f"case {case} ({victim}): multi-line message {str(e)!r}", file=sys.stderr)
        except BaseException as e:  # noqa: B036 (anything else is what this test is looking for)
            counts["other"] += 1
            if shown < 5:
                shown += 1
                print(f"case {case} ({victim}): {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}",
                      file=sys.stderr)
        finally:
            signal.alarm(0)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
