"""evaluate.py — score a checkpoint on prompts with checkable answers: sampled pass@k, maj@n and mean@n, and greedy
accuracy, the numbers RL papers and peers report (verl's mean@N / maj@N, nanochat's pass@k).

Each prompt gets n completions sampled at --temperature (--samples) and one greedy completion. A completion is
correct when the first reward function gives it 1: the number in its answer equal to the reference (GSM8K's
"#### 72" reads 72; --checker math_verify compares with Hugging Face's math-verify, TRL's accuracy_reward's), or the
built-in task's exact answer. With c_p of prompt p's n completions correct, over P prompts:

    pass@k = 1/P Σ_p [1 − C(n − c_p, k) / C(n, k)]     Chen et al. 2021's unbiased estimator, k <= n
    maj@n  = 1/P Σ_p [p's most frequent parsed answer is a correct completion's]
    mean@n = 1/P Σ_p c_p / n

The prompts, chat template, system prompt and rewards are grpo.py's for the same flags (a pretrained model:
GSM8K's test split with tasks.REASONING_PROMPT; a tiny one: the built-in task's held-out problems). --tools: each
completion is a conversation in which the tools run (tools.py), scored on its final answer.

    python evaluate.py --ckpt runs/grpo/hf                      # the built-in task's held-out problems
    python evaluate.py --ckpt runs/grpo/hf --samples 16 --k 1,4,16
    python evaluate.py --ckpt DIR --samples 8 --temperature 0.6 --checker math_verify    # GSM8K's test split
    python evaluate.py --ckpt runs/grpo_tools/hf --tools calculator --task '*,3,3' --max-completion-len 192

Writes <out>/samples.jsonl (one row per sampled completion: prompt index, prompt, completion, parsed answer, each
reward, correct), <out>/results.json (the numbers and the settings) and prints them.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import ClassVar

import numpy as np
from tqdm import tqdm

import data
import flags
import sample
import shard
import tasks
import tokenizer
import tools


@dataclasses.dataclass
class Config(sample.LoadFlags):
    model: str = "tiny-qwen3"  # preset or family alias (ignored with --ckpt)
    # -- prompts --
    data: str | None = None  # JSONL/Parquet of prompt (or question) + answer, or a Hub dataset's test split (None: the task)
    task: str | None = None  # built-in task, "op,a,b" (digits) or sequence; named: the data on any model (None: *,3,1)
    eval_examples: int = 512  # prompts scored (the first ones of the data, or the task's held-out problems)
    system_prompt: str | None = None  # before each prompt, a system turn with a chat template (grpo.py's)
    enable_thinking: bool = True  # Qwen 3's chat template: --no-enable-thinking asks for answers without <think>
    max_prompt_len: int = 512  # longer prompts keep their last tokens
    # -- sampling --
    samples: int = 8  # n, completions sampled per prompt
    k: str = "1,4,8"  # pass@k for each of these k (those <= n)
    temperature: float | None = None  # sampling temperature of the n completions
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # top-k sampling (0: off)
    max_completion_len: int | None = None  # new tokens per completion, no stop token by then = truncated
    batch_size: int = 32  # prompts sampled together, each n times
    rollout_slots: int = 0  # S > 0: decode in S slots refilled as completions end (engine.py); 0: one static batch
    tools: str | None = None  # functions the model may call: calculator or module:fn1,fn2 (tools.load)
    max_tool_calls: int = 4  # most calls in a completion
    seed: int = 0  # the sampling's random stream
    # -- checking and output --
    checker: str = "exact"  # exact (the answer's number, or the task's exact answer) or math_verify (math-verify)
    mesh: str = ""  # device mesh, e.g. data=1,fsdp=-1,tp=1 ("": all devices on fsdp)
    out: str = "runs/evaluate"  # where samples.jsonl and results.json go (an existing results.json is kept)
    # (a tiny model or a demo's export, pretrained): grpo.py's length and data, a usual temperature for reasoning
    AUTO: ClassVar[dict] = {"max_completion_len": (6, 256), "temperature": (1.0, 0.6),
                            "data": (None, "openai/gsm8k:main"), "system_prompt": ("", tasks.REASONING_PROMPT)}

    def __post_init__(self):
        if self.task is not None and self.data is None:  # a named task is the data, a pretrained model's too
            self.data, self.system_prompt = "", self.system_prompt or ""
        self.task = self.task or "*,3,1"
        tiny = self.ckpt and (pathlib.Path(self.ckpt) / tokenizer.BYTE_TOKENIZER_FILE).is_file()  # a demo's export
        pretrained = flags.starts_pretrained({**vars(self), "init": "pretrained"}) and not tiny
        for name, values in self.AUTO.items():
            setattr(self, name, values[pretrained] if getattr(self, name) is None else getattr(self, name))
        self.ks = flags.numbers(self.k, "k") or [1]
        flags.check(flags.positive(self, "eval_examples", "max_prompt_len", "samples", "max_completion_len",
                                   "batch_size") + [
            (all(k >= 1 and k == int(k) for k in self.ks), f"--k takes whole numbers >= 1, got {self.k!r}"),
            (self.temperature > 0 and self.top_k >= 0 and 0 < self.top_p <= 1 and self.rollout_slots >= 0,
             "need --temperature > 0, --top-k >= 0, 0 < --top-p <= 1 and --rollout-slots >= 0"),
            flags.one_of(self, "checker", ("exact", "math_verify")),
            (self.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {self.dtype!r}")])
        self.ks = [int(k) for k in self.ks]
        self.tool_functions = tools.load(self.tools) if self.tools else []
        reward_functions(self)  # a bad --task, or math-verify missing, fails here


def reward_functions(cfg: Config) -> list:
    """grpo.py's rewards for the same flags; the first decides `correct`, and its .answer reads the answer that
    majority votes count: for --data the answer's number (tasks.accuracy_reward, or math_verify_reward with
    --checker math_verify) and the <think>/<answer> format; for the built-in task its exact answer and format;
    with --tools on the task, the final answer's number (a tool writes no zero padding)."""
    if cfg.data or cfg.tools:
        accuracy = tasks.math_verify_reward if cfg.checker == "math_verify" else tasks.accuracy_reward
        if cfg.checker == "math_verify":
            accuracy([""], [""], answer=["0"])  # one line now when math-verify is missing
        return [accuracy, tasks.format_reward] if cfg.data else [accuracy]
    return tasks.builtin_task(cfg.task).rewards()


def completions(model, rows, ids, sampler: tools.Sampler, cfg: Config) -> tuple[list[dict], list[dict]]:
    """The n sampled completions of each prompt (rows, ids), scored, as samples.jsonl rows; and each prompt's greedy
    completion, scored. Batches of --batch-size prompts, each batch seeded by (seed, its first prompt)."""
    sampled, greedy, n = [], [], cfg.samples
    bar = tqdm(total=len(rows), desc="evaluate", unit="prompt", disable=not shard.is_main_process())
    for start in range(0, len(rows), cfg.batch_size):
        batch = range(start, min(start + cfg.batch_size, len(rows)))
        seed = int(np.random.SeedSequence([cfg.seed, start]).generate_state(1)[0])
        outs, per_func = sampler(model, [rows[i] for i in batch for _ in range(n)],
                                 [ids[i] for i in batch for _ in range(n)], seed, cfg.temperature)
        sampled += [record(i, rows[i], o, rewards, sampler) for i, o, rewards in
                    zip((i for i in batch for _ in range(n)), outs, per_func)]
        outs, per_func = sampler(model, [rows[i] for i in batch], [ids[i] for i in batch], 0, 0.0)
        greedy += [record(i, rows[i], o, rewards, sampler) for i, o, rewards in zip(batch, outs, per_func)]
        bar.update(len(batch))
    bar.close()
    return sampled, greedy


def record(index: int, row: dict, out: tools.ToolRollout, rewards, sampler: tools.Sampler) -> dict:
    """One completion as samples.jsonl holds it: the answer parsed from what the rewards read (with tools, the final
    answer), each reward, correct (the first reward is 1), its length and whether it stopped."""
    answer = tools.final_answer(out) if sampler.fns else sampler.tok.decode(out.completion)
    return {"prompt_index": index, "prompt": row["prompt"], "completion": sampler.tok.decode(out.completion),
            "answer": sampler.funcs[0].answer(answer), **{f.__name__: float(r) for f, r in zip(sampler.funcs, rewards)},
            "correct": bool(rewards[0] >= 1.0), "tokens": len(out.completion),
            "stopped": bool(out.completion) and out.completion[-1] in sampler.stop_ids, "tool_calls": out.tool_calls,
            "failed_calls": out.failed_calls}


def results(sampled: list[dict], greedy: list[dict], funcs, cfg: Config) -> dict:
    """The numbers: pass@k, maj@n, mean@n (tasks.sampled_metrics), greedy accuracy, each reward's mean over the
    samples (the format rate among them), mean completion length, truncation rate, and with tools the calls."""
    n = cfg.samples
    correct = np.array([r["correct"] for r in sampled]).reshape(-1, n)  # [P, n]: a prompt's samples are adjacent
    answers = [[r["answer"] for r in sampled[p * n:(p + 1) * n]] for p in range(len(correct))]
    out = {**tasks.sampled_metrics(correct, answers, cfg.ks), "greedy": float(np.mean([r["correct"] for r in greedy])),
           **{f"rewards/{f.__name__}": float(np.mean([r[f.__name__] for r in sampled])) for f in funcs},
           "completions/mean_length": float(np.mean([r["tokens"] for r in sampled])),
           "completions/truncated": float(np.mean([not r["stopped"] for r in sampled])), "prompts": len(correct)}
    if cfg.tools:
        out |= tools.metrics(np.array([[r["tool_calls"], r["failed_calls"]] for r in sampled]))
    return out


def write(out_dir: pathlib.Path, sampled: list[dict], summary: dict) -> None:
    """samples.jsonl, then results.json, each written whole to a temporary name and renamed (never half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sampled)),
                       ("results.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")):
        (out_dir / f".{name}.tmp").write_text(text)
        (out_dir / f".{name}.tmp").replace(out_dir / name)


def main(argv=None):
    cfg = flags.parse(Config, argv)
    out_dir = pathlib.Path(cfg.out)
    if (out_dir / "results.json").exists():
        flags.fail(f"{out_dir} already holds results.json: pass another --out, or remove it")
    start_time, funcs = time.perf_counter(), reward_functions(cfg)
    with flags.user_errors():
        loaded = sample.load(cfg)
        family = loaded.model.cfg.family
        prompts = data.prompt_data(loaded.tok, family, cfg.data, cfg.data, cfg.task, 0, cfg.eval_examples, cfg.seed,
                                   cfg.max_prompt_len, cfg.system_prompt, loaded.chat_template, cfg.enable_thinking,
                                   cfg.tool_functions)
        mesh = shard.make_mesh(cfg.mesh)
    if not prompts.evals:
        flags.fail(f"{cfg.data}: no prompts to evaluate")
    model = shard.shard_model(loaded.model, mesh)
    print(f"evaluating {loaded.source} on {len(prompts.evals)} prompts x {cfg.samples} samples at temperature "
          f"{cfg.temperature} (and greedy); prompt 0 as the model sees it: {loaded.tok.decode(prompts.eval_ids[0])!r}",
          file=sys.stderr)
    sampler = tools.Sampler(funcs, loaded.tok, loaded.eos_ids, family, cfg.tool_functions, cfg.max_completion_len,
                            cfg.max_tool_calls, cfg.rollout_slots, cfg.top_k, cfg.top_p, cfg.enable_thinking)
    with flags.user_errors():
        sampled, greedy = completions(model, prompts.evals, prompts.eval_ids, sampler, cfg)
    summary = results(sampled, greedy, funcs, cfg)
    summary |= {"seconds": round(time.perf_counter() - start_time, 1), "model": loaded.source,
                "settings": dataclasses.asdict(cfg)}
    if shard.is_main_process():
        write(out_dir, sampled, summary)
        width = max(map(len, summary))
        for name, value in summary.items():
            if name != "settings":
                print(f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
        print(f"samples in {out_dir / 'samples.jsonl'}, results in {out_dir / 'results.json'}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
