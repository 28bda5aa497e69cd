"""data.py — text in: datasets (JSONL, Parquet, Hub), tokenized examples, batches, and the learner's rows.

    rows = read_rows("train.jsonl")                       # TRL's formats, each row checked (file:line errors)
    ids, loss_mask = tokenize(row, tok, family)           # the loss on the completion / assistant turns
    batch = next(Batches(examples, 128, 512, seed=0))     # tokens, loss_mask, segment_ids, positions [B, T]
    batch = completion_batch(prompt_ids, completions, pad_id, max_len)   # what a learner scores of a sample

Tokenizers are in tokenizer.py; chat templates are plain functions from [{"role", "content"}, ...] to text
(no jinja), in chat.py; where a completion stops is one rule for every script (stop_ids).
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import NamedTuple

import numpy as np

import tasks
from chat import END_OF_TURN, apply_chat_template


class DataError(ValueError):
    """Bad training data; the message names the file, the line and the problem."""


def read_jsonl(path, check=None) -> list[dict]:
    """Rows of a JSONL file in one of TRL's formats: {"prompt", "completion"}, {"messages"}
    or {"text"}, or those that check(row, "file:line") accepts (it returns the row or raises
    DataError). Every problem is reported with the file and line number."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: bad JSON ({e.msg} at column {e.colno})") from None
            rows.append((check or _check_row)(row, f"{path}:{number}"))
    if not rows:
        raise DataError(f"{path}: empty file (no JSON lines)")
    return rows


def read_rows(source, check=None, split: str = "train") -> list[dict]:
    """Rows of --data / --eval-data: a JSONL file (read_jsonl), a Parquet file, or a Hugging Face dataset
    by name ("openai/gsm8k:main", a config after the colon; a local dataset directory too), its `split`,
    through the `datasets` library (an optional install; HF_DATASETS_OFFLINE=1 reads its cache only).
    Each row passes check(row, where) (default: TRL's formats), which may rename columns."""
    path = pathlib.Path(source)
    if path.suffix in (".jsonl", ".json") or (path.is_file() and path.suffix != ".parquet"):
        return read_jsonl(path, check)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            import pyarrow.parquet
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs `pip install pyarrow`") from None
        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors: not Parquet, truncated, unreadable
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    else:
        rows = hub_dataset(str(source), split)
    if not rows:
        raise DataError(f"{source}: no rows")
    return [(check or _check_row)(row, f"{source}: row {i}") for i, row in enumerate(rows, 1)]


def hub_dataset(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: no such file; a Hugging Face dataset needs `pip install datasets`") from None
    repo, _, config = name.partition(":")
    try:
        return list(datasets.load_dataset(repo, config or None, split=split))
    except Exception as e:  # no such dataset or split, no network, not cached
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise DataError(f"{name}: no such file, and no Hugging Face dataset could be had ({type(e).__name__}"
                        f"{': ' + why if why else ''})") from None


def _check_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be {{\"role\": str, \"content\": str}}")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{i}] has unknown role {m['role']!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant turn to learn from")
        return row
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                raise DataError(f"{where}: missing key '{key}'")
            if not isinstance(row[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
        return row
    if "text" in row:
        if not isinstance(row["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(row['text']).__name__}")
        return row
    raise DataError(f"{where}: expected keys 'prompt'+'completion', 'messages' or 'text'; got {sorted(row)}")


def prompt_row(row, where: str) -> dict:
    """A row of --data / --eval-data: {"prompt": str | messages, "answer": ...} ("completion" serves too;
    GSM8K's own columns, "question" and "answer" ending in "#### 72", as they are)."""
    if isinstance(row, dict) and "prompt" not in row and isinstance(row.get("question"), str):
        row = {"prompt": row["question"], **row}
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)):
        raise DataError(f"{where}: expected an object with a 'prompt' (a string or chat messages)")
    if "answer" not in row and not isinstance(row.get("completion"), str):
        raise DataError(f"{where}: missing key 'answer' (the reference the reward checks)")
    return {**row, "answer": row.get("answer", row.get("completion"))}


def encode_prompt(prompt, tok, family, max_len: int, enable_thinking: bool = True, tools=None) -> list[int]:
    """A prompt's ids, its last max_len kept: text (with BOS), or chat messages in the family's template (which
    lists tools, functions the model may call, where the family's lists them)."""
    if isinstance(prompt, list):  # chat messages: the family's template, up to the assistant's turn
        if family is None:
            raise DataError("chat prompts need a checkpoint of a known family (--ckpt)")
        switch = {} if enable_thinking or family != "qwen3" else {"enable_thinking": False}
        return tok.encode(apply_chat_template(prompt, family, tools=tools or None, **switch), add_bos=False)[-max_len:]
    return tok.encode(prompt)[-max_len:]


def tokenize(row: dict, tok, family: str | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask): the loss covers the completion (+ EOS), the assistant turns of a
    conversation (+ their end-of-turn token), or all of a plain text."""
    eos = tok.eos_ids[0]
    if "messages" in row:
        if family is None:
            raise DataError("conversations need a chat template: load a checkpoint of a known family")
        messages, end = row["messages"], END_OF_TURN[family]
        full = apply_chat_template(messages, family, add_generation_prompt=False)
        spans = []  # each assistant turn: from after its header to its end-of-turn token, inclusive
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prefix = apply_chat_template(messages[:i], family, add_generation_prompt=True)
                start = len(prefix)
                stop = full.find(end, start)
                if not full.startswith(prefix) or stop < 0:
                    raise DataError(f"cannot locate assistant turn {i} in the {family} chat template's text")
                spans.append((start, stop + len(end)))
        ids, mask, done = [], [], 0
        for start, stop in spans:
            for text, learn in ((full[done:start], 0), (full[start:stop], 1)):
                piece = tok.encode(text, add_bos=False)
                ids, mask = ids + piece, mask + [learn] * len(piece)
            done = stop
        piece = tok.encode(full[done:], add_bos=False)
        return ids + piece, mask + [0] * len(piece)
    if "text" in row:
        ids = tok.encode(row["text"]) + [eos]
        return ids, [0] + [1] * (len(ids) - 1)
    prompt, completion = tok.encode(row["prompt"]), tok.encode(row["completion"], add_bos=False) + [eos]
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


# ----------------------------------------------------------------------------- preference pairs (dpo.py)

def preference_row(row, where: str) -> dict:
    """A row of TRL's preference formats: {"prompt", "chosen", "rejected"}, all text or all chat messages,
    or {"chosen", "rejected"} whose shared start is the prompt (TRL's extract_prompt: whole messages, or
    characters up to the first difference, a space before it going with the answers)."""
    if not isinstance(row, dict) or not {"chosen", "rejected"} <= set(row):
        raise DataError(f"{where}: expected keys 'chosen' and 'rejected' (and 'prompt', or a shared start)")
    if "prompt" not in row and type(row["chosen"]) is type(row["rejected"]) and isinstance(row["chosen"], (str, list)):
        c, r = row["chosen"], row["rejected"]
        i = next((i for i in range(min(len(c), len(r))) if c[i] != r[i]), min(len(c), len(r)))
        i -= isinstance(c, str) and i > 0 and c[i - 1] == " "
        row = {"prompt": c[:i], "chosen": c[i:], "rejected": r[i:]}
    kinds = {type(row.get(k)) for k in ("prompt", "chosen", "rejected")}
    if kinds not in ({str}, {list}):
        raise DataError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be text or all chat messages")
    for answer in ("chosen", "rejected") if kinds == {list} else ():
        _check_row({"messages": row["prompt"] + row[answer]}, f"{where} (prompt + {answer})")
    return row


def tokenize_pair(row: dict, tok, family: str | None, where: str = "") -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids as TRL tokenizes a pair: prompt + answer as one text (chat: the
    family's template; text: BOS … + EOS), cut where the prompt's own tokens end. A prompt whose tokens are
    not a prefix of prompt + answer's is an error naming the row (TRL only warns, and trains on the shift)."""
    if isinstance(row["prompt"], list):
        if family is None:
            raise DataError(f"{where}: chat pairs need a checkpoint of a known family (--ckpt)")
        try:
            prompt, *answers = [tok.encode(apply_chat_template(row["prompt"] + extra, family, not extra), add_bos=False)
                                for extra in ([], row["chosen"], row["rejected"])]
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
    else:
        prompt = tok.encode(row["prompt"])
        answers = [tok.encode(row["prompt"] + row[k]) + [tok.eos_ids[0]] for k in ("chosen", "rejected")]
    for name, ids in zip(("chosen", "rejected"), answers):
        if ids[:len(prompt)] != prompt:
            raise DataError(f"{where}: the prompt's tokens are not a prefix of prompt + {name}'s (the tokenizer "
                            "or chat template joins them differently); fix the row or its template")
    return prompt, answers[0][len(prompt):], answers[1][len(prompt):]


def preference_data(tok, family, path, eval_path, task: str, n_train: int, n_eval: int, seed: int):
    """Preference pairs (dpo.py) as (prompt, chosen, rejected) ids for training and held-out evaluation:
    from JSONL files in TRL's formats, else the built-in task (chosen: the answer; rejected: the answer
    with one digit changed). Also the held-out task rows {"prompt", "completion"} for greedy eval/accuracy."""
    def read(p, split="train"):  # a file, or a Hub dataset's split (read_rows)
        return read_rows(p, lambda row, where: tokenize_pair(preference_row(row, where), tok, family, where), split)
    arithmetic, rng = tasks.builtin_task(task), np.random.default_rng([seed, 7])

    def task_pairs(rows):
        return [tokenize_pair({"prompt": r["prompt"], "chosen": r["completion"],
                               "rejected": arithmetic.wrong_answer(r["prompt"], rng)}, tok, None) for r in rows]
    rows = [] if path else arithmetic.examples("eval", n_eval, seed)
    train = read(path) if path else task_pairs(arithmetic.examples("train", n_train, seed))
    evals = read(eval_path, "test") if eval_path else read(path, "test") if path and is_hub_dataset(path) else \
        task_pairs(rows)
    return train, evals, rows


def truncate_pairs(pairs, max_len: int):
    """TRL v1's truncation: prompt + answer cut to max_len from the start; pairs whose prompt fills it are
    dropped, then pairs whose answers are the same tokens. → kept pairs, the dropped counts."""
    kept, dropped = [], {"prompt_too_long": 0, "identical": 0}
    for prompt, chosen, rejected in pairs:
        chosen, rejected = chosen[:max_len - len(prompt)], rejected[:max_len - len(prompt)]
        reason = "prompt_too_long" if len(prompt) >= max_len else "identical" if chosen == rejected else None
        if reason:
            dropped[reason] += 1
        else:
            kept.append((prompt, chosen, rejected))
    return kept, dropped


def pair_batch(pairs, ref_sums, pad_id: int) -> dict[str, np.ndarray]:
    """Pairs (and π_ref's sums [n, 2], or None: zeros) → completion_batch's rows: 2i and 2i + 1 are pair i's
    chosen and rejected answer after its prompt (left-padded to P, answers right-padded to C), and ref_logps [2n]."""
    prompts = [prompt for prompt, _, _ in pairs for _ in range(2)]
    batch = completion_batch(prompts, [a for _, c, r in pairs for a in (c, r)], pad_id, 1 << 30)
    batch["ref_logps"] = np.zeros(2 * len(pairs), np.float32) if ref_sums is None else \
        np.asarray(ref_sums, np.float32).reshape(-1)
    return batch


def prompt_of(example) -> list[int]:
    """A tokenized example's prompt: its ids before the first target token."""
    ids, mask = example
    return ids[:next((i for i, m in enumerate(mask) if m), len(ids))]


def as_rows(examples, tok) -> list[dict]:
    """Tokenized examples back as {"prompt", "completion"} text rows (greedy accuracy on training prompts)."""
    return [{"prompt": tok.decode(prompt_of(ex)), "completion": tok.decode(ex[0][len(prompt_of(ex)):])}
            for ex in examples]


# ----------------------------------------------------------------------------- the scripts' datasets

def completion_data(tok, family, path, eval_path, task: str, n_train: int, n_eval: int, seed: int):
    """Supervised data (sft.py, lora.py): tokenized training examples from `path` (TRL's formats), else
    the built-in task's training split; eval rows {"prompt", "completion"} from `eval_path`, else the
    task's held-out split (none for a training file without an eval file)."""
    if path:
        train = [tokenize(row, tok, family) for row in read_rows(path)]
    else:
        train = [tokenize(row, tok) for row in tasks.builtin_task(task).examples("train", n_train, seed)]
    if eval_path:
        evals = read_rows(eval_path, split="test")
        if any("prompt" not in row for row in evals):
            raise DataError(f"{eval_path}: eval rows need 'prompt' and 'completion'")
    else:
        evals = [] if path else tasks.builtin_task(task).examples("eval", n_eval, seed)
    return train, evals


class Prompts(NamedTuple):
    """RL prompts (grpo.py): rows {"prompt", "answer", ...} and their prompt ids, for training and evaluation."""
    train: list[dict]
    evals: list[dict]
    train_ids: list[list[int]]
    eval_ids: list[list[int]]


def prompt_data(tok, family, path, eval_path, task: str, n_train: int, n_eval: int, seed: int, max_prompt_len: int,
                system_prompt: str = "", chat: bool = False, enable_thinking: bool = True, tools=None) -> Prompts:
    """RL data: training and eval rows {"prompt", "answer", ...} (from files or a Hub dataset, whose test
    split is the eval rows unless eval_path says otherwise; or the built-in task's splits) and their prompt
    ids (the last max_prompt_len tokens). system_prompt: put before each prompt, as a system turn of the
    family's chat template when `chat` (an instruct checkpoint), else as text and a blank line. enable_thinking
    False: Qwen 3's template opens the answer with an empty <think></think> (the other families have no switch).
    tools: listed in chat prompts (encode_prompt)."""
    if path:
        train = read_rows(path, prompt_row)
    else:
        train = [{"prompt": r["prompt"], "answer": r["completion"]}
                 for r in tasks.builtin_task(task).examples("train", n_train, seed)]
    if eval_path or (path and is_hub_dataset(path)):
        evals = read_rows(eval_path or path, prompt_row, split="test")[:n_eval]
    else:
        evals = [] if path else [{"prompt": r["prompt"], "answer": r["completion"]}
                                 for r in tasks.builtin_task(task).examples("eval", n_eval, seed)]
    if system_prompt or (chat and tools):  # a chat model's tools are listed in its template: text becomes a turn
        def with_system(prompt):
            if chat or isinstance(prompt, list):
                turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                return [{"role": "system", "content": system_prompt}] * bool(system_prompt) + turns
            return f"{system_prompt}\n\n{prompt}\n"
        train, evals = ([{**r, "prompt": with_system(r["prompt"])} for r in rows] for rows in (train, evals))
    ids = [[encode_prompt(r["prompt"], tok, family, max_prompt_len, enable_thinking, tools) for r in rows]
           for rows in (train, evals)]
    return Prompts(train, evals, ids[0], ids[1])


def is_hub_dataset(source: str) -> bool:
    """A --data value that names a Hugging Face dataset rather than a local file."""
    return not pathlib.Path(source).is_file() and pathlib.Path(source).suffix not in (".jsonl", ".json", ".parquet")


def has_chat_template(directory) -> bool:
    """Whether a checkpoint ships a chat template (an instruct model): its prompts go through the family's."""
    d = pathlib.Path(directory) if directory else None
    if d is None or (d / "chat_template.jinja").is_file():
        return d is not None
    try:
        return "chat_template" in json.loads((d / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- batches

def bucket_length(n: int, max_len: int, smallest: int = 16) -> int:
    """Pad lengths to powers of two (16, 32, ...) so a run compiles a handful of shapes."""
    length = smallest
    while length < n:
        length *= 2
    return min(length, max_len)


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def stream(n: int, seed: int, position: int, count: int) -> list[int]:
    """Items position .. position + count − 1 of an endless stream over n items, each epoch a permutation
    drawn from (seed, epoch): the position is all the state a resumed run needs to continue exactly."""
    return [int(_epoch_order(n, seed, k // n)[k % n]) for k in range(position, position + count)]


class Batches:
    """An endless, deterministic stream of fixed-shape batches over tokenized examples.

    Each epoch visits the examples in a permutation drawn from (seed, epoch). `position`
    (examples consumed so far) is all the state there is: a checkpoint stores it and
    `Batches(..., position=p)` continues exactly where the run stopped. With `pack`, rows
    hold several examples back to back, told apart by segment ids so attention never
    crosses them; otherwise one example per row, right-padded to a length bucket.
    """

    def __init__(self, examples: list[tuple[list[int], list[int]]], batch_size: int, max_len: int,
                 seed: int = 0, pack: bool = False, position: int = 0, pad_id: int = 0):
        if not examples:
            raise DataError("no examples to train on")
        self.examples = [(ids[:max_len], mask[:max_len]) for ids, mask in examples]
        self.batch_size, self.max_len, self.seed, self.pack = batch_size, max_len, seed, pack
        self.position, self.pad_id = position, pad_id

    def _example(self, k: int):
        return self.examples[stream(len(self.examples), self.seed, k, 1)[0]]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self.batch_size:
            row = [self._example(self.position)]
            self.position += 1
            while self.pack and sum(len(ids) for ids, _ in row) + len(self._example(self.position)[0]) <= self.max_len:
                row.append(self._example(self.position))
                self.position += 1
            rows.append(row)
        length = self.max_len if self.pack else bucket_length(max(len(r[0][0]) for r in rows), self.max_len)
        return collate(rows, length, self.pad_id)


def collate(rows: list[list[tuple[list[int], list[int]]]], length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Rows of (ids, loss_mask) examples → tokens, loss_mask, segment_ids, positions [B, length].
    loss_mask[t] says whether tokens[t] is a target, i.e. predicted from tokens[:t]."""
    B = len(rows)
    out = {"tokens": np.full((B, length), pad_id, np.int32), "loss_mask": np.zeros((B, length), np.float32),
           "segment_ids": np.zeros((B, length), np.int32), "positions": np.zeros((B, length), np.int32)}
    for r, examples in enumerate(rows):
        t = 0
        for segment, (ids, mask) in enumerate(examples, 1):
            n = len(ids)
            out["tokens"][r, t:t + n] = ids
            out["loss_mask"][r, t:t + n] = mask
            out["segment_ids"][r, t:t + n] = segment
            out["positions"][r, t:t + n] = np.arange(n)
            t += n
    return out


# ----------------------------------------------------------------------------- the learner's rows of sampled text

MIN_PROMPT_BUCKET = 8  # prompt lengths round up to a power of two >= this: few shapes, few compiles


def left_pad(prompts: list[list[int]], bucket: int = MIN_PROMPT_BUCKET):
    """Ragged prompts → tokens, segment_ids, positions [B, P], P the next power of two >= bucket."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = bucket
    while P < max(map(len, prompts)):
        P *= 2
    tokens = np.zeros((len(prompts), P), np.int32)
    segment_ids = np.zeros((len(prompts), P), np.int32)
    positions = np.zeros((len(prompts), P), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, P - len(p):] = p
        segment_ids[row, P - len(p):] = 1
        positions[row, P - len(p):] = np.arange(len(p))
    return tokens, segment_ids, positions


def completion_batch(prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int, max_len: int):
    """Prompts left-padded to P (left_pad) + completions right-padded to C (a power of two >= 8, at most
    max_len) → tokens, segment_ids, positions [N, P + C] and mask [N, C] (1 on completion tokens): the
    layout in which a learner scores what was sampled (model.token_logps(..., last=C)); positions count
    from each prompt's first real token, as when sampling."""
    tokens, segment_ids, positions = left_pad(prompt_ids)
    N, C = len(completions), bucket_length(max(map(len, completions)), max_len, smallest=8)
    out = {"tokens": np.full((N, C), pad_id, np.int32), "segment_ids": np.zeros((N, C), np.int32),
           "positions": np.zeros((N, C), np.int32), "mask": np.zeros((N, C), np.float32)}
    for r, (p, c) in enumerate(zip(prompt_ids, completions)):
        out["tokens"][r, :len(c)], out["segment_ids"][r, :len(c)], out["mask"][r, :len(c)] = c, 1, 1.0
        out["positions"][r, :len(c)] = len(p) + np.arange(len(c))
    for name, prefix in (("tokens", tokens), ("segment_ids", segment_ids), ("positions", positions)):
        out[name] = np.concatenate([prefix, out[name]], axis=1)
    return out


def stop_ids(tok, model_cfg) -> tuple[int, ...]:
    """Where a completion ends, the one rule of sampling, evaluation, the server, grpo and distill: the
    tokenizer's EOS, the checkpoint's (config.json, generation_config.json), and the chat template's end of
    turn (Gemma's <end_of_turn>, Llama 3's <|eot_id|>, Qwen's <|im_end|>) where the tokenizer has it."""
    end_of_turn = END_OF_TURN.get(model_cfg.family)
    ids = (*tok.eos_ids, *model_cfg.eos_ids, tok.token_id(end_of_turn) if end_of_turn else None)
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def pad_id(tok) -> int:
    """The id that pads rows: the tokenizer's pad token, else its first EOS."""
    return tok.pad_id if tok.pad_id is not None else tok.eos_ids[0]
