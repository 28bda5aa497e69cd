"""grpo.py — group relative policy optimisation (GRPO) with verifiable rewards.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) is PPO without a value network: for each
prompt q the policy samples a group of G completions o_1..o_G, programs score them (rewards r_i),
and a completion's advantage is its reward relative to its own group's:

    A_i = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)

μ = --num-iterations updates on each rollout batch maximise PPO's clipped surrogate with a KL
penalty to the frozen starting policy π_ref (the k3 estimator, unbiased and ≥ 0):

    L(θ) = −1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it A_i, clip(ρ_it, 1 − ε, 1 + ε_high) A_i) − β KL_it ]
    ρ_it = π_θ(o_it | q, o_i,<t) / π_old(o_it | q, o_i,<t),   KL_it = π_ref/π_θ − log(π_ref/π_θ) − 1

π is softmax(logits / temperature), the distribution that was sampled. --loss-type only changes
the averaging, as TRL's GRPOTrainer does: grpo (above), bnpo (over each micro-batch's tokens),
dr_grpo (Σ / (completions · max_completion_len)), dapo (Σ / all completion tokens of the batch).

Where it departs from TRL's GRPOTrainer: TRL defaults to loss_type dapo and β = 0 (no reference
model); ours are the paper's grpo averaging and a KL to π_ref, β = 0.02 (DeepSeekMath used 0.04), a
small KL having helped the tiny demo most. μ > 1 updates take π_old from the learner's first update.

The logged loss reads ~0: on the first update of a rollout batch π_old = π_θ, so ρ = 1 and the
loss is −mean(A) + β·KL, and advantages are centred in each group (they sum to zero). Its
gradient is the policy gradient −Σ A ∇log π_θ, not zero: watch reward and eval/reward instead.

With no arguments it runs the built-in verifiable task ("123*4=" → "0492", reward 1 for the
exact answer) on the tiny Qwen 3 on a laptop CPU in under 3 minutes. A random policy never
earns a reward (and a group whose rewards are equal teaches nothing), so a supervised warm-up
runs first, printed and saved to <out>/warmup_sft, stopped once it answers 30% of training
prompts; 800 GRPO steps then raise greedy held-out accuracy (eval/reward) from 0.24 to ~0.63:

    python grpo.py
    python grpo.py --ckpt runs/sft/hf --steps 100                     # from an SFT export
    python grpo.py --ckpt path/to/qwen3-0.6b --data gsm8k.jsonl --eval-data gsm8k_test.jsonl --lora \\
        --max-completion-len 256 --prompts-per-step 16 --lr 1e-5 --beta 0.04 --dtype bfloat16 --tpu

Data: JSONL of {"prompt", "answer"} (GSM8K's "… #### 72" reads 72); a prompt is text or chat messages.
Rewards are plain functions (tasks.accuracy_reward, tasks.format_reward, Arithmetic.rewards), summed with
--reward-weights. Outputs in --out: metrics.jsonl (TRL's names: reward, reward_std, rewards/<function>,
kl, clip_ratio, entropy, frac_reward_zero_std, completions/*, loss; eval/reward: the first reward on
greedy completions of held-out prompts), checkpoints/ (--resume), hf/ (--lora: also adapter/, PEFT's).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import adapters
import data
import flags
import model as model_lib
import run
import sample
import shard
import tasks

LOSS_TYPES, SCALINGS = ("grpo", "bnpo", "dr_grpo", "dapo"), ("group", "batch", "none")


@dataclasses.dataclass
class Config(flags.RunConfig, flags.WarmUpConfig):
    # -- model and data --
    model: str = "tiny-qwen3"  # preset or family alias (ignored when --ckpt is given)
    ckpt: str | None = None  # Hugging Face checkpoint directory to start from (e.g. runs/sft/hf)
    data: str | None = None  # JSONL/Parquet of prompt (or question) + answer, or a Hub dataset (None: the task)
    eval_data: str | None = None  # the same, for eval/reward (held-out task problems; a Hub dataset's test split)
    system_prompt: str | None = None  # before each prompt, a system turn with a chat template
    task: str = "*,3,1"  # built-in task: operator, digits of a, digits of b
    train_examples: int = 50_000  # built-in task: problems that prompts (and warm-up examples) come from
    eval_examples: int = 512  # held-out prompts for eval/reward (greedy decoding)
    # -- sampling --
    num_generations: int = 8  # G, completions sampled per prompt (one group)
    prompts_per_step: int | None = None  # B, prompts per rollout batch, B·G completions
    max_prompt_len: int = 512  # longer prompts keep their last tokens
    max_completion_len: int | None = None  # new tokens per completion, no EOS by then = truncated
    temperature: float | None = None  # sampling temperature, the learner scores logits / temperature too
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # top-k sampling (0: off)
    # -- the GRPO objective --
    beta: float | None = None  # KL coefficient, 0 keeps no reference model at all
    epsilon: float = 0.2  # ratio clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # upper clip (DAPO's clip-higher); None: epsilon
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo: how token terms are averaged (TRL's)
    scale_rewards: str = "group"  # group | batch | none: divide advantages by that reward std
    mask_truncated_completions: bool = False  # completions that never emitted EOS get no loss
    num_iterations: int = 1  # μ, optimizer updates per rollout batch
    grad_accum: int = 1  # micro-batches per update (less memory, same update)
    reward_weights: str = ""  # comma-separated weight per reward function ("": all 1)
    # -- optimisation --
    steps: int = 800  # GRPO steps, each one rollout batch and num_iterations updates
    lr: float | None = None  # peak learning rate
    warmup: float = 0.05  # fraction of updates of linear warmup, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    # -- logging and checkpoints --
    eval_every: int = 50  # steps between evaluations (and at the start and end)
    save_every: int = 100  # steps between train-state checkpoints
    seed: int = 0  # data order, sampling and initialisation
    # -- LoRA --
    lora: bool = False  # train LoRA adapters only; the reference is the base (adapters off)
    lora_rank: int = 8  # LoRA r
    lora_alpha: float = 16.0  # LoRA scale numerator (alpha / r)
    # The defaults of the fields left None above: (a random tiny model, a pretrained checkpoint). Pretrained:
    # TRL's GRPOConfig (learning_rate 1e-6, max_completion_length 256, 8 generations), DeepSeekMath's β 0.04,
    # Tunix's GSM8K GRPO demo (temperature 0.9: varied samples), 16 prompts x 8 = 128 completions a step, no
    # supervised warm-up (it would overwrite what the model knows), GSM8K with the reasoning prompt.
    AUTO: ClassVar[dict] = {"lr": (1e-3, 1e-6), "beta": (0.02, 0.04), "max_completion_len": (6, 256),
                            "temperature": (1.0, 0.9), "prompts_per_step": (64, 16),
                            "data": (None, "openai/gsm8k:main"), "system_prompt": ("", tasks.REASONING_PROMPT)}

    def __post_init__(self):
        flags.fill_defaults(self)  # the fields left None: AUTO's value for this start
        self.epsilon_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        flags.check(flags.positive(self, "prompts_per_step", "max_prompt_len", "max_completion_len", "num_iterations")
                    + [(self.num_generations >= 2, "--num-generations must be >= 2: advantages compare a group's rewards"),
            ((self.prompts_per_step * self.num_generations) % self.grad_accum == 0,
             "--prompts-per-step x --num-generations must be a multiple of --grad-accum"),
            (self.temperature > 0 and self.top_k >= 0 and 0 < self.top_p <= 1,
             "need --temperature > 0, --top-k >= 0 and 0 < --top-p <= 1"),
            (self.beta >= 0 and 0 < self.epsilon < 1 and self.epsilon_high > 0,
             "need --beta >= 0, 0 < --epsilon < 1 and --epsilon-high > 0"),
            (self.loss_type in LOSS_TYPES, f"--loss-type must be one of {', '.join(LOSS_TYPES)}"),
            (self.scale_rewards in SCALINGS, f"--scale-rewards must be one of {', '.join(SCALINGS)}")])
        self.weights = flags.numbers(self.reward_weights, "reward-weights")
        tasks.builtin_task(self.task)  # a bad --task fails here, before anything loads
        reward_weights(self, reward_functions(self))  # one weight per reward function


# ----------------------------------------------------------------------------- rewards

def reward_functions(cfg: Config) -> list:
    """What GRPO rewards, plain functions f(prompts, completions, **columns) → [reward per completion]:
    the built-in task's exact answer and its fixed-width format, or for --data (GSM8K and the like) the
    number in the completion equal to the answer and the <think>/<answer> format. The first is eval/reward."""
    if cfg.data:
        return [tasks.accuracy_reward, tasks.format_reward]
    return tasks.builtin_task(cfg.task).rewards()


def reward_weights(cfg: Config, funcs) -> np.ndarray:
    """--reward-weights, one per reward function (default: all 1); rewards are their weighted sum."""
    weights = np.array(cfg.weights or [1.0] * len(funcs))
    if len(weights) != len(funcs):
        raise ValueError(f"--reward-weights has {len(weights)} weights for {len(funcs)} reward functions "
                         f"({', '.join(f.__name__ for f in funcs)})")
    return weights


def score(funcs, rows, completions) -> np.ndarray:
    """Rewards [N, F] of every function; functions see the rows' other columns as keyword lists."""
    columns = {k: [row[k] for row in rows] for k in rows[0] if k not in ("prompt", "completion")}
    prompts = [row["prompt"] for row in rows]
    return np.array([f(prompts, completions, **columns) for f in funcs], np.float64).T.reshape(len(rows), -1)


# ----------------------------------------------------------------------------- advantages and loss

def group_advantages(rewards: np.ndarray, G: int, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """rewards [N] in groups of G consecutive rows → advantages [N] and each row's reward std
    (unbiased, as torch's): of its group, or of the whole batch with scale "batch"."""
    groups = rewards.reshape(-1, G)
    centred = (groups - groups.mean(1, keepdims=True)).reshape(-1)
    std = np.full_like(rewards, rewards.std(ddof=1)) if scale == "batch" else np.repeat(groups.std(1, ddof=1), G)
    return (centred if scale == "none" else centred / (std + 1e-4)), std


def loss_weights(mask: np.ndarray, loss_type: str, max_completion_len: int) -> np.ndarray:
    """mask [M, b, C] (micro-batches, completions, tokens) → weights such that Σ weight · token_loss
    is the loss, averaged as TRL's GRPOTrainer does (each micro-batch's loss / M, except dapo)."""
    M, b, _ = mask.shape
    if loss_type == "grpo":  # mean over each completion's tokens, then over completions
        w = mask / np.maximum(mask.sum(-1, keepdims=True), 1) / (M * b)
    elif loss_type == "bnpo":  # mean over the tokens of each micro-batch
        w = mask / np.maximum(mask.sum((1, 2), keepdims=True), 1) / M
    elif loss_type == "dr_grpo":  # a constant normaliser: no length bias
        w = mask / (M * b * max_completion_len)
    else:  # dapo: mean over the tokens of the whole rollout batch
        w = mask / max(mask.sum(), 1)
    return w.astype(np.float32)


def policy_logps(model, batch, temperature: float, rows_per_prompt: int = 1):
    """log π(o_t | q, o_<t) [b, C] of the completion tokens under softmax(logits / temperature), and π's
    entropy there. tokens, segment_ids, positions [b, P + C]: the prompt left-padded to P, the completion
    right after it, right-padded to C (padding: segment 0). rows_per_prompt: rows come in runs of that many
    with one prompt (a GRPO group), whose forward pass then runs once (model.next_token_hidden)."""
    return model_lib.token_logps(model, batch, last=batch["mask"].shape[-1], group=rows_per_prompt,
                                 temperature=temperature, entropy=True)


def token_losses(logp, old_logp, ref_logp, advantages, epsilon: float, epsilon_high: float, beta: float):
    """Per-token loss −min(ρA, clip(ρ)A) + β·KL [..., C], the k3 KL, and where the clip is active
    (ρ outside the range on the side that A pushes: those tokens get no gradient)."""
    ratio = jnp.exp(logp - old_logp)  # ρ_it
    adv = advantages[..., None]  # A_i, the same for every token of o_i
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - epsilon, 1 + epsilon_high) * adv)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    # k3 estimator of KL(π_θ ‖ π_ref): unbiased, always >= 0 (http://joschu.net/blog/kl-approx.html)
    kl = jnp.zeros_like(logp) if ref_logp is None else jnp.exp(ref_logp - logp) - (ref_logp - logp) - 1
    return -surrogate + beta * kl, kl, clipped


# ----------------------------------------------------------------------------- train step

def rows_per_prompt(cfg: Config) -> int:
    """G when each host's micro-batches hold whole groups (a group's prompt then runs once), else 1."""
    rows = cfg.prompts_per_step * cfg.num_generations // (jax.process_count() * cfg.grad_accum)
    return cfg.num_generations if rows % cfg.num_generations == 0 else 1


def make_train_step(graphdef, tx, cfg: Config, group: int = 1):
    """step(params, opt_state, frozen, batch [grad_accum, B·G / grad_accum, ...]) → params, opt_state,
    metrics, π_θ's log-probs [grad_accum, b, C] before the update. π_old is batch["old_logp"] when given
    (updates 2..μ); the first update has none and runs at the sampling parameters, so π_old = π_θ
    (ratio exactly 1). Its returned log-probs are π_old for the later updates."""
    def loss_fn(params, frozen, mb, key):
        logp, entropy = policy_logps(nnx.merge(graphdef, params, frozen), mb, cfg.temperature, group)
        old_logp = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
        loss, kl, clipped = token_losses(logp, old_logp, mb.get("ref_logp"), mb["advantages"], cfg.epsilon,
                                         cfg.epsilon_high, cfg.beta)
        mask = mb["mask"]
        sums = {"kl": jnp.sum(kl * mask), "clip_ratio": jnp.sum(clipped * mask), "entropy": jnp.sum(entropy * mask),
                "sampling/logp_difference": jnp.sum(jnp.abs(logp - mb["sampler_logp"]) * mask),
                "tokens": jnp.sum(mask)}
        # L: the weights hold --loss-type's averaging, over the whole rollout batch (loss_weights)
        return jnp.sum(loss * mb["weights"]), {**sums, "logp": jax.lax.stop_gradient(logp)}
    update = run.make_update(loss_fn, tx)  # sums the micro-batches' losses and gradients

    def train_step(params, opt_state, frozen, batch):
        params, opt_state, metrics, aux = update(params, opt_state, frozen, batch, None)
        tokens = jnp.maximum(jnp.sum(aux["tokens"]), 1.0)
        means = ("kl", "clip_ratio", "entropy", "sampling/logp_difference")  # per completion token
        metrics.update({k: jnp.sum(aux[k]) / tokens for k in means})
        return params, opt_state, metrics, aux["logp"]
    return train_step


# ----------------------------------------------------------------------------- one GRPO step, phase by phase

class Rollout(NamedTuple):
    """A rollout batch: B prompts, each G times (a group's rows adjacent), what was sampled and how it scored."""
    rows: list[dict]  # [N] the data rows (prompt, answer, ...)
    prompt_ids: list[list[int]]  # [N] ragged
    completions: list[list[int]]  # [N] ragged, each ending at a stop id or at max_completion_len
    sampler_logps: list[list[float]]  # [N] ragged: log-prob of each sampled token under the sampler's softmax
    per_func: np.ndarray  # [N, F] each reward function's reward
    rewards: np.ndarray  # [N] their weighted sum
    advantages: np.ndarray  # [N]
    std: np.ndarray  # [N] the reward std each advantage was divided by


def rollout(policy, prompt_ids, cfg: Config, step: int, eos_ids):
    """1. Sample: completions and the sampler's log-probs; randomness from (seed, step) only, so a
    resumed run draws the same samples."""
    seed = int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0])
    return sample.generate(policy, prompt_ids, max_new_tokens=cfg.max_completion_len, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, seed=seed, eos_ids=eos_ids, return_logprobs=True)


def rollout_batch(prompt_ids, completions, sampler_logps, eos_ids, pad_id: int, cfg: Config) -> dict[str, np.ndarray]:
    """The rollout as the learner reads it: data.completion_batch's rows (tokens, segment_ids, positions
    [N, P + C]; mask [N, C]) plus sampler_logp [N, C], what the sampler's softmax gave each token. With
    mask_truncated_completions, completions that never emitted a stop id get no loss."""
    batch = data.completion_batch(prompt_ids, completions, pad_id, cfg.max_completion_len)
    C = batch["mask"].shape[1]
    batch["sampler_logp"] = np.array([lp + [0.0] * (C - len(lp)) for lp in sampler_logps], np.float32)
    if cfg.mask_truncated_completions:
        batch["mask"] *= np.array([[c[-1] in eos_ids] for c in completions], np.float32)
    return batch


def learner_batch(r: Rollout, eos_ids, pad_id: int, cfg: Config, mesh) -> dict:
    """rollout_batch with the advantages and each token's loss weight; this host's rows as [grad_accum, b, ...]
    micro-batches, assembled into global arrays on the mesh."""
    batch = rollout_batch(r.prompt_ids, r.completions, r.sampler_logps, eos_ids, pad_id, cfg)
    batch["advantages"] = r.advantages.astype(np.float32)
    rows = shard.host_rows(len(r.completions))  # each host feeds its slice of the global batch
    batch = {k: v[rows].reshape(cfg.grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}
    batch["weights"] = loss_weights(batch["mask"], cfg.loss_type, cfg.max_completion_len)
    return {k: shard.global_batch(v, mesh, axis=1) for k, v in batch.items()}


def policy_updates(train_step, params, opt_state, frozen, batch, cfg: Config):
    """4. μ updates on one rollout batch; the first one's log-probs are π_old for the others."""
    batch, metrics = dict(batch), []
    for _ in range(cfg.num_iterations):
        params, opt_state, m, logp = train_step(params, opt_state, frozen, batch)
        batch["old_logp"] = logp
        metrics.append(m)
    return params, opt_state, metrics


def step_record(r: Rollout, funcs, update_metrics, eos_ids, cfg: Config) -> dict:
    """5. Log: TRL's metric names; loss, kl and clip_ratio are means over the μ updates (grad_norm: the last's)."""
    mean = {k: float(np.mean([float(m[k]) for m in update_metrics])) for k in ("loss", "kl", "clip_ratio")}
    return {"loss": mean["loss"], "reward": float(r.rewards.mean()), "reward_std": float(r.std.mean()),
            **{f"rewards/{f.__name__}": float(x) for f, x in zip(funcs, r.per_func.mean(0))},
            "frac_reward_zero_std": float(np.mean(np.isclose(r.std, 0.0))),
            **({"kl": mean["kl"]} if cfg.beta else {}), "clip_ratio": mean["clip_ratio"],
            "entropy": float(update_metrics[0]["entropy"]),
            "completions/mean_length": float(np.mean([len(c) for c in r.completions])),
            "completions/clipped_ratio": float(np.mean([c[-1] not in eos_ids for c in r.completions])),
            "sampling/logp_difference": float(update_metrics[0]["sampling/logp_difference"])}


class Evaluation(NamedTuple):
    """What eval/reward is measured on: held-out rows and their prompt ids, the rewards, the stop rule."""
    rows: list[dict]
    ids: list[list[int]]
    funcs: list
    eos_ids: tuple[int, ...]
    tok: object


def evaluate(model, ev: Evaluation, cfg: Config) -> dict:
    """eval/reward: the first reward function (accuracy) of greedy completions; eval/rewards/<name>: each."""
    if not ev.rows:
        return {}
    outs = sample.generate(model, ev.ids, max_new_tokens=cfg.max_completion_len, eos_ids=ev.eos_ids)
    rewards = score(ev.funcs, ev.rows, [ev.tok.decode(o) for o in outs]).mean(0)
    return {"eval/reward": float(rewards[0]),
            **{f"eval/rewards/{f.__name__}": float(x) for f, x in zip(ev.funcs, rewards)}}


# ----------------------------------------------------------------------------- main

class Start(NamedTuple):
    """What a GRPO run starts from (prepare)."""
    loaded: run.Loaded
    prompts: data.Prompts  # training and held-out rows and their prompt ids
    model: object  # π at step 0: the checkpoint, warmed up, with LoRA adapters (B = 0) when asked
    first_record: dict  # the warm-up's numbers, logged at step 0
    mesh: object
    manager: object  # the orbax checkpoint manager of <out>/checkpoints


def prepare(cfg: Config) -> Start:
    """The model, tokenizer and prompts of a run; the supervised warm-up of the demo (run.warm_up: GRPO
    learns only where a group's rewards differ, and a random policy never earns one); LoRA adapters on top."""
    with flags.user_errors():
        loaded = run.load(cfg)
        prompts = data.prompt_data(loaded.tokenizer, loaded.family, cfg.data, cfg.eval_data, cfg.task,
                                   cfg.train_examples, cfg.eval_examples, cfg.seed, cfg.max_prompt_len,
                                   cfg.system_prompt, data.has_chat_template(loaded.directory))
        manager, mesh = run.checkpoints(cfg), shard.make_mesh(cfg.mesh)
    print(f"prompt 0 as the model sees it: {loaded.tokenizer.decode(prompts.train_ids[0])!r}", file=sys.stderr)
    model, first_record = shard.shard_model(loaded.model, mesh), {}
    if cfg.warmup_sft_steps:
        rows = [{"prompt": r["prompt"], "completion": str(r["answer"])} for r in prompts.train]
        model, first_record = run.warm_up(cfg, loaded, model, [data.tokenize(r, loaded.tokenizer) for r in rows], rows,
                                          mesh, cfg.max_prompt_len + cfg.max_completion_len)
    if cfg.lora:  # adapters on the (warmed-up) base; B = 0, so the model starts unchanged
        model = shard.shard_model(adapters.add_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed), mesh)
    return Start(loaded, prompts, model, first_record, mesh, manager)


def learner(graphdef, tx, cfg: Config, mesh, param_sh, opt_sh):
    """The jitted update (make_train_step) and π_ref's log-probs [M, b, C] of a batch of micro-batches;
    a group's prompt runs once per forward pass in both."""
    group = rows_per_prompt(cfg)
    jit_train_step = jax.jit(make_train_step(graphdef, tx, cfg, group), donate_argnums=(0, 1),
                             out_shardings=(param_sh, opt_sh, None, shard.batch_sharding(mesh, 3, axis=1)))
    ref_logps = jax.jit(lambda ref_params, frozen, batch: jax.lax.map(
        lambda mb: policy_logps(nnx.merge(graphdef, ref_params, frozen), mb, cfg.temperature, group)[0], batch))
    return jit_train_step, ref_logps


def main(argv=None):
    cfg = flags.parse(Config, argv)
    start_time, funcs = time.perf_counter(), reward_functions(cfg)
    loaded, prompts, model, first_record, mesh, manager = prepare(cfg)
    tok, train, train_ids, B, G = loaded.tokenizer, prompts.train, prompts.train_ids, cfg.prompts_per_step, \
        cfg.num_generations
    eos_ids, pad_id, weights = data.stop_ids(tok, model.cfg), data.pad_id(tok), reward_weights(cfg, funcs)
    # π_θ: the trained parameters (all, or the adapters) | the frozen rest of the model
    graphdef, params, frozen = nnx.split(model, adapters.LoRA if cfg.lora else nnx.Param, ...)
    tx, schedule = run.adamw(cfg, cfg.steps * cfg.num_iterations)
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, mesh)
    # π_ref (beta > 0): the starting parameters, or with LoRA the base (adapters zeroed: no second copy)
    ref_params = None if not cfg.beta else jax.jit(
        lambda p: jax.tree.map(jnp.zeros_like if cfg.lora else jnp.copy, p), out_shardings=param_sh)(params)
    train_step, ref_logps = learner(graphdef, tx, cfg, mesh, param_sh, opt_sh)
    step, state, position = run.resume(cfg, manager, {"params": params, "opt_state": opt_state},
                                       {"params": param_sh, "opt_state": opt_sh})
    params, opt_state = state["params"], state["opt_state"]
    run.announce(loaded, params, mesh, f"{len(train)} prompts, {B} x {G} completions per step", cfg)
    ev = Evaluation(prompts.evals, prompts.eval_ids, funcs, eos_ids, tok)

    with run.MetricsLog(cfg.out, cfg) as log:
        if step == 0:
            log.write({"step": 0, **first_record, **evaluate(nnx.merge(graphdef, params, frozen), ev, cfg)})
        progress = run.Progress(cfg, step, manager)
        while step < cfg.steps:
            picked = data.stream(len(train), cfg.seed, position, B)
            position += B
            rows, ids = [train[i] for i in picked for _ in range(G)], [train_ids[i] for i in picked for _ in range(G)]
            completions, sampler_logps = rollout(nnx.merge(graphdef, params, frozen), ids, cfg, step, eos_ids)  # 1.
            per_func = score(funcs, rows, [tok.decode(c) for c in completions])  # 2. score [N, F]
            rewards = per_func @ weights
            advantages, std = group_advantages(rewards, G, cfg.scale_rewards)  # 3. group advantages
            r = Rollout(rows, ids, completions, sampler_logps, per_func, rewards, advantages, std)
            batch = learner_batch(r, eos_ids, pad_id, cfg, mesh)
            if cfg.beta:  # π_ref, for the KL
                batch["ref_logp"] = ref_logps(ref_params, frozen, batch)
            params, opt_state, update_metrics = policy_updates(train_step, params, opt_state, frozen, batch, cfg)  # 4.
            step += 1
            if progress.due(step, cfg.log_every):  # 5. log
                record = {**progress.record(step, update_metrics[-1], schedule(step * cfg.num_iterations - 1)),
                          **step_record(r, funcs, update_metrics, eos_ids, cfg)}
                if progress.due(step, cfg.eval_every):
                    record.update(evaluate(nnx.merge(graphdef, params, frozen), ev, cfg))
                progress.write(log, record, reward=f"{record['reward']:.3f}", kl=f"{record.get('kl', 0):.4f}",
                               eval=record.get("eval/reward", ""))
            # PLUMBING (keep): the checkpoint (and the NaN stop before it), the bar, SIGTERM's early end
            if progress.save_due(step, update_metrics[-1]):
                run.save(cfg, manager, step, {"params": params, "opt_state": opt_state}, position)
            progress.bar.update(1)
            if progress.stopping(step):
                break
        progress.close(step)
    if shard.is_main_process():  # 6. export
        run.export_policy(nnx.merge(graphdef, params, frozen), cfg.out, loaded, cfg.lora,
                          time.perf_counter() - start_time)


if __name__ == "__main__":
    main()
