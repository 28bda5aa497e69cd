"""rl.py — what the RL scripts (grpo.py, ppo.py) share; nothing in this file is an algorithm.

Both sample completions of prompts, score them with the same plain reward functions and report the same
greedy held-out accuracy; each script holds its own advantages, loss, step and log. Here, once:

    PromptConfig      the flags of the prompts and of sampling them (model, data, task, lengths, temperature)
    reward_functions  what is rewarded: the built-in task's exact answer and format, or GSM8K-like data's
    prepare           the start of a run: model, tokenizer, prompts, the demo's supervised warm-up, LoRA
                      adapters, the sampler (tools.Sampler: generate, then score)
    policy_logps      what the learner reads of the policy: log π of the sampled tokens, the entropy, a MoE
                      router's load-balancing loss
    evaluate          eval/reward: the first reward of greedy completions of the held-out prompts

Arrows point down: grpo.py and ppo.py import rl; rl imports run, data, tasks, tools, never a script.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

import adapters
import data
import flags
import logprobs
import model as model_lib
import moe
import run
import shard
import tasks
import tools


@dataclasses.dataclass
class PromptConfig:
    """The prompts of an RL run and how they are sampled; a script's Config subclasses it (with its AUTO
    table's max_completion_len and temperature) and calls fill_task() first in its __post_init__."""
    # -- model and data --
    model: str = "tiny-qwen3"  # preset or family alias (ignored when --ckpt is given)
    ckpt: str | None = None  # Hugging Face checkpoint directory to start from (e.g. runs/sft/hf)
    data: str | None = None  # JSONL/Parquet of prompt (or question) + answer, or a Hub dataset (None: the task)
    eval_data: str | None = None  # the same, for eval/reward (held-out task problems; a Hub dataset's test split)
    system_prompt: str | None = None  # before each prompt, a system turn with a chat template
    enable_thinking: bool = True  # Qwen 3's chat template: --no-enable-thinking asks for answers without <think>
    task: str | None = None  # built-in task, "op,a,b" (digits) or sequence; named: the data on any model (None: *,3,1)
    train_examples: int = 50_000  # built-in task: problems that prompts (and warm-up examples) come from
    eval_examples: int = 512  # held-out prompts for eval/reward (greedy decoding)
    # -- sampling --
    max_prompt_len: int = 512  # longer prompts keep their last tokens
    max_completion_len: int | None = None  # new tokens per completion, no EOS by then = truncated
    temperature: float | None = None  # sampling temperature, the learner scores logits / temperature too
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # top-k sampling (0: off)
    rollout_slots: int = 0  # S > 0: decode in S slots refilled as completions end (engine.py); 0: one static batch
    # (tiny, pretrained) for the fields left None, in a script's AUTO: the tiny task's answer length, Tunix's GSM8K
    # demo's temperature, GSM8K and its reasoning prompt for a pretrained model
    AUTO: ClassVar[dict] = {"max_completion_len": (6, 256), "temperature": (1.0, 0.9),
                            "data": (None, "openai/gsm8k:main"), "system_prompt": ("", tasks.REASONING_PROMPT)}

    def fill_task(self) -> None:
        """A named --task is the data (a pretrained model's too, its prompts as they are); else *,3,1."""
        if self.task is not None and self.data is None:
            self.data, self.system_prompt = "", self.system_prompt or ""
        self.task = self.task or "*,3,1"

    def check_sampling(self) -> list[tuple[bool, str]]:
        """The range checks of these fields, for flags.check (after flags.fill_defaults)."""
        return flags.positive(self, "max_prompt_len", "max_completion_len") + [
            (self.temperature > 0 and self.top_k >= 0 and 0 < self.top_p <= 1,
             "need --temperature > 0, --top-k >= 0 and 0 < --top-p <= 1"),
            (self.rollout_slots >= 0, "need --rollout-slots >= 0")]


def reward_functions(cfg) -> list:
    """What is rewarded, plain functions f(prompts, completions, completion_ids, **columns) → [reward per
    completion]: the built-in task's exact answer and its fixed-width format, or for --data (GSM8K and the
    like) the number in the completion equal to the answer and the <think>/<answer> format; grpo's --tools
    on the task: the final answer's number (a tool writes no zero padding; with --tools completions are the
    final answers, see tools.score); with grpo's --soft-punish-cache, DAPO's soft overlong punishment. The
    first is eval/reward."""
    funcs = ([tasks.accuracy_reward, tasks.format_reward] if cfg.data else
             [tasks.accuracy_reward] if getattr(cfg, "tools", None) else tasks.builtin_task(cfg.task).rewards())
    if getattr(cfg, "soft_punish_cache", 0):
        funcs.append(tasks.soft_overlong_punishment(cfg.max_completion_len, cfg.soft_punish_cache))
    return funcs


def policy_logps(model, batch, temperature: float, rows_per_prompt: int = 1):
    """log π(o_t | q, o_<t) [b, C] of the completion tokens under softmax(logits / temperature), π's entropy there,
    a MoE router's load-balancing loss over the rows' tokens (moe.load_balancing_loss; 0 for a dense model);
    batch: data.completion_batch's rows, in runs of rows_per_prompt with one prompt (forward pass run once)."""
    tokens, C = batch["tokens"], batch["mask"].shape[-1]
    x, taps = model_lib.next_token_hidden(model, tokens, batch["positions"], batch["segment_ids"], C, rows_per_prompt,
                                          taps=("router",))  # [b, C, D]
    logp, entropy = logprobs.token_logps(x, model.head(model.cfg.param_dtype), tokens[:, -C:], entropy=True,
                                         cap=model.cfg.final_softcap, temperature=temperature)
    return logp, entropy, moe.load_balancing_loss(taps["router"], batch["segment_ids"][:, :-1] > 0, model.cfg)


def evaluate(model, prompts: data.Prompts, sample: tools.Sampler, cfg) -> dict:
    """eval/reward: the first reward function (accuracy) of greedy completions of the held-out prompts (with
    --tools, greedy conversations: the tools run); eval/rewards/<name>: each; eval/tools/*: the calls. With
    --eval-samples n > 1, also n sampled at --temperature: eval/pass@k, eval/maj@n, eval/mean@n (evaluate.py's)."""
    if not prompts.evals:
        return {}
    outs, per_func = sample(model, prompts.evals, prompts.eval_ids, 0, 0.0)
    rewards, n, with_tools = per_func.mean(0), getattr(cfg, "eval_samples", 1), bool(getattr(cfg, "tools", None))
    return {"eval/reward": float(rewards[0]), **{f"eval/rewards/{f.__name__}": x for f, x in zip(sample.funcs, rewards)},
            **(tools.metrics(tools.calls(outs), "eval/") if with_tools else {}),
            **(tasks.sampled_eval(sample, model, prompts.evals, prompts.eval_ids, n, 1, cfg.temperature) if n > 1 else {})}


def prepare(cfg):
    """The model, tokenizer and prompts of a run; the supervised warm-up of the demo (run.warm_up: an RL
    algorithm learns only from rewards that differ, and a random policy never earns one); LoRA adapters on
    top. → run.Loaded, data.Prompts, π at step 0, the warm-up's record, tools.Sampler, mesh, checkpoint manager."""
    fns = getattr(cfg, "tool_functions", [])  # grpo's --tools ([]: one turn each)
    with flags.user_errors():
        loaded = run.load(cfg)
        prompts = data.prompt_data(loaded.tokenizer, loaded.family, cfg.data, cfg.eval_data, cfg.task,
                                   cfg.train_examples, cfg.eval_examples, cfg.seed, cfg.max_prompt_len,
                                   cfg.system_prompt, data.has_chat_template(loaded.directory), cfg.enable_thinking, fns)
        manager, mesh = run.checkpoints(cfg, loaded.model), shard.make_mesh(cfg.mesh)
    print(f"prompt 0 as the model sees it: {loaded.tokenizer.decode(prompts.train_ids[0])!r}", file=sys.stderr)
    model, first_record, tok = shard.shard_model(loaded.model, mesh), {}, loaded.tokenizer
    sampler = tools.Sampler(reward_functions(cfg), tok, data.stop_ids(tok, model.cfg), loaded.family or model.cfg.family,
                            fns, cfg.max_completion_len, getattr(cfg, "max_tool_calls", 0), cfg.rollout_slots,
                            cfg.top_k, cfg.top_p, cfg.enable_thinking)
    if cfg.warmup_sft_steps:
        rows = [{"prompt": r["prompt"], "completion": str(r["answer"])} for r in prompts.train]
        examples, accuracy = [data.tokenize(r, tok) for r in rows], None
        if getattr(cfg, "tools", None) == "calculator" and not cfg.data:  # grpo's tool demo: conversations
            examples = tasks.calculator_conversations(prompts.train, prompts.train_ids, tok, sampler.family,
                                                      cfg.max_completion_len, cfg.enable_thinking)
            train = prompts._replace(evals=prompts.train[:128], eval_ids=prompts.train_ids[:128])  # its stopping test
            accuracy = lambda m: evaluate(m, train, sampler, cfg)["eval/reward"]  # noqa: E731
        model, first_record = run.warm_up(cfg, loaded, model, examples, rows, mesh,
                                          cfg.max_prompt_len + cfg.max_completion_len, accuracy)
    if cfg.lora:  # adapters on the (warmed-up) base; B = 0, so the model starts unchanged
        model = shard.shard_model(adapters.add_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed), mesh)
    return loaded, prompts, model, first_record, sampler, mesh, manager
