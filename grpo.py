"""grpo.py — group relative policy optimisation (GRPO) with verifiable rewards, and the variants people run.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) is PPO without a value network: for each prompt q the policy
samples a group of G completions o_1..o_G, programs score them (rewards r_i), and a completion's advantage is its
reward relative to its own group's:

    A_i = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)

μ = --num-iterations passes over each rollout batch, in --steps-per-generation optimizer steps each,
maximise PPO's clipped surrogate with a KL penalty to the frozen starting policy π_ref (the k3
estimator, unbiased and ≥ 0); π_old is the policy that sampled the batch, for every one of them:

    L(θ) = −1/G Σ_i 1/|o_i| Σ_t [ w_i · min(ρ_it A_i, clip(ρ_it, 1 − ε, 1 + ε_high) A_i) − β KL_it ]
    ρ_it = π_θ(o_it | q, o_i,<t) / π_old(o_it | q, o_i,<t),   KL_it = π_ref/π_θ − log(π_ref/π_θ) − 1

π is softmax(logits / temperature), the distribution that was sampled. w_i corrects for the sampler and
the learner being different programs (in bfloat16 the KV-cache decode and the training forward disagree):
π_old/π_sampler of the sequence, 0 outside [--importance-sampling-min, -max] (TRL's default mode); it
weighs the policy term only, never the KL. The variants, with TRL's knobs (LOSS_TYPES, ADVANTAGES below):

- --loss-type: the averaging and the policy term: grpo (above), bnpo (over each micro-batch's tokens),
  dr_grpo (Σ / (completions · max_completion_len)), dapo (Σ / the step's tokens); cispo (MiniMax-M1),
  sapo (a soft gate); --importance-sampling-level sequence (GSPO, Zheng et al. 2025), sequence_token
  (GSPO-token); --delta (two-sided clip); --top-entropy-quantile (Wang et al. 2025: the policy term on
  the highest-entropy tokens); --off-policy-mask-threshold (DeepSeek-V3.2's sequence mask);
- --advantage-estimator rloo | reinforce_plus_plus_baseline; --multi-objective-aggregation
  normalize_then_sum (GDPO: each reward normalised in its group, then summed);
- DAPO (Yu et al. 2025): --epsilon-high 0.28, --loss-type dapo, --dynamic-sampling (groups whose rewards
  are all equal teach nothing: dropped, more prompts drawn) and --soft-punish-cache (an overlong penalty);
- --tools: a completion is a conversation in which the policy calls Python functions (tools.py); their results'
  tokens are context, scored by the learner but with no loss (mask 0), and the rewards read the final answer.

Where it departs from TRL's GRPOTrainer: TRL defaults to loss_type dapo and β = 0 (no reference model); ours are the
paper's grpo averaging and a KL to π_ref, β = 0.02 (DeepSeekMath used 0.04), a small KL having helped the tiny demo
most. dapo averages over each optimizer step's own tokens (TRL divides each of --steps-per-generation steps by the
whole generation batch's count).

The logged loss reads ~0 (on a batch's first update ρ = 1, and advantages sum to zero in each group), its gradient
−Σ A ∇log π_θ does not: watch reward and eval/reward instead.

With no arguments: the built-in task ("123*4=" → "0492", reward 1 for the exact answer) on the tiny Qwen 3,
about 3 minutes on a laptop CPU; a supervised warm-up first (run.warm_up: a random policy never earns a
reward), then GRPO raises greedy held-out accuracy (eval/reward; tests/test_grpo.py holds by how much).
--tools calculator: 3-digit products, which the tiny model cannot learn, computed by a calculator it learns to call:

    python grpo.py
    python grpo.py --tools calculator                                                 # 4 minutes
    python grpo.py --importance-sampling-level sequence                               # GSPO
    python grpo.py --loss-type dapo --epsilon-high 0.28 --dynamic-sampling --soft-punish-cache 1  # DAPO
    python grpo.py --ckpt path/to/qwen3-0.6b --data gsm8k.jsonl --lora --max-completion-len 256 --tpu

Data: JSONL of {"prompt", "answer"} (GSM8K's "… #### 72" reads 72; a prompt: text or chat messages), or --task
sequence, one a pretrained model can partly do (README, "Real models": the real Gemma 3 270M learns it on a CPU).
Outputs in --out: metrics.jsonl (TRL's names), completions.jsonl, checkpoints/ (--resume), hf/, adapter/.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import adapters
import data
import flags
import moe
import rl
import run
import shard
import tools

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclasses.dataclass
class Config(rl.PromptConfig, flags.RunConfig, flags.WarmUpConfig, flags.LoRAConfig):
    # (the prompts, their model and how they are sampled: rl.PromptConfig, the same in ppo.py)
    # -- sampling --
    num_generations: int = 8  # G, completions sampled per prompt (one group)
    prompts_per_step: int | None = None  # B, prompts per rollout batch, B·G completions
    tools: str | None = None  # functions the policy may call: calculator (the demo) or module:fn1,fn2 (tools.load)
    max_tool_calls: int = 4  # most calls in a completion; their results count in --max-completion-len
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, draw prompts until B are kept
    max_num_gen_batches: int = 10  # dynamic sampling: most prompt batches drawn for one step (then: what was kept)
    # -- rewards and advantages --
    reward_weights: str = ""  # comma-separated weight per reward function ("": all 1)
    soft_punish_cache: int = 0  # DAPO's soft overlong punishment over the last L tokens (a reward; 0: off)
    multi_objective_aggregation: str = "sum_then_normalize"  # or normalize_then_sum (GDPO: each reward first)
    advantage_estimator: str = "grpo"  # grpo | rloo | reinforce_plus_plus_baseline (ADVANTAGES)
    scale_rewards: str = "group"  # grpo: divide advantages by the reward std of the group, the batch, or none
    mask_truncated_completions: bool = False  # completions that never emitted EOS get no loss
    # -- the policy loss --
    beta: float | None = None  # KL coefficient, 0 keeps no reference model at all
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo | cispo | sapo (LOSS_TYPES: averaging and policy term)
    epsilon: float = 0.2  # ratio clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # upper clip (DAPO's clip-higher; None: epsilon); cispo's cap (None: 5.0)
    importance_sampling_level: str = "token"  # token | sequence (GSPO) | sequence_token (GSPO-token)
    delta: float | None = None  # two-sided clip: the ratio of a negative advantage capped at delta (> 1 + epsilon)
    sapo_temperature_pos: float = 1.0  # sapo's τ for tokens of positive advantage
    sapo_temperature_neg: float = 1.05  # sapo's τ for the others
    top_entropy_quantile: float = 1.0  # the policy term on this fraction of tokens, the highest-entropy ones
    num_iterations: int = 1  # μ, passes over each rollout batch
    steps_per_generation: int = 1  # optimizer steps per pass, each on a shuffled slice of whole groups
    grad_accum: int = 1  # micro-batches per optimizer step (less memory, same update)
    # -- the rollout–learner correction --
    importance_sampling_correction: bool = True  # weigh the policy term by π_old/π_sampler (w above)
    importance_sampling_mode: str = "sequence_mask"  # token_truncate | token_mask | sequence_truncate | sequence_mask
    importance_sampling_min: float | None = None  # w's lower bound (None: none)
    importance_sampling_max: float = 3.0  # w's upper bound
    off_policy_mask_threshold: float | None = None  # drop A < 0 sequences whose mean log(π_sampler/π_θ) exceeds it
    # -- optimisation --
    steps: int | None = None  # GRPO steps, each a rollout batch and μ x steps_per_generation updates (None: 800)
    lr: float | None = None  # peak learning rate
    warmup: float = 0.05  # fraction of updates of linear warmup, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    # -- logging and checkpoints --
    eval_every: int = 50  # steps between evaluations (and at the start and end)
    eval_samples: int = 1  # n > 1: eval/pass@k (k = 1, 2, 4 .. n), maj@n and mean@n of n samples per prompt too
    save_every: int = 100  # steps between train-state checkpoints
    log_completions_every: int = 50  # steps between <out>/completions.jsonl records (0: never)
    num_completions_to_print: int = 8  # completions of each record (whole groups, the first ones)
    seed: int = 0  # data order, sampling and initialisation
    # (tiny, pretrained): TRL's GRPOConfig lr and length, DeepSeekMath's β, Tunix's GSM8K demo's temperature
    AUTO: ClassVar[dict] = {"lr": (1e-3, 1e-6), "beta": (0.02, 0.04), "prompts_per_step": (64, 16),
                            **rl.PromptConfig.AUTO}  # max_completion_len, temperature, data, system_prompt
    TOOL_DEMO: ClassVar[dict] = {"task": "*,3,3", "steps": 60, "prompts_per_step": 8, "max_completion_len": 192,
                                 "warmup_sft_batch_size": 32}  # --tools calculator: 3-digit products, to be computed
    RESUMABLE: ClassVar[frozenset] = flags.RunConfig.RESUMABLE | {"log_completions_every", "num_completions_to_print"}

    def __post_init__(self):
        demo = self.tools == "calculator" and self.data is None and self.task is None  # the tool demo
        for name, value in (self.TOOL_DEMO if demo else {"steps": 800}).items():  # the defaults of what is None
            setattr(self, name, value if getattr(self, name) is None else getattr(self, name))
        self.fill_task()  # a named task is the data, a pretrained model's too
        flags.fill_defaults(self)  # the fields left None: AUTO's value for this start
        if self.epsilon_high is None:
            self.epsilon_high = 5.0 if self.loss_type == "cispo" else self.epsilon
        B, G, k = self.prompts_per_step, self.num_generations, self.steps_per_generation
        flags.check(self.check_sampling() + flags.positive(
                self, "prompts_per_step", "num_iterations", "steps_per_generation", "max_num_gen_batches",
                "num_completions_to_print", "eval_samples") + [
            (G >= 2, "--num-generations must be >= 2: advantages compare a group's rewards"),
            (B % k == 0, "--prompts-per-step must be a multiple of --steps-per-generation (whole groups a step)"),
            ((B * G // k) % self.grad_accum == 0, "a step's completions (--prompts-per-step x --num-generations / "
             "--steps-per-generation) must be a multiple of --grad-accum"),
            (self.beta >= 0 and 0 < self.epsilon < 1 and self.epsilon_high > 0 and (self.delta or 2) > 1 and
             0 < self.top_entropy_quantile <= 1 and self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0,
             "need --beta >= 0, 0 < --epsilon < 1, --epsilon-high > 0, --delta > 1, 0 < --top-entropy-quantile <= 1 "
             "and --sapo-temperature-* > 0"),
            flags.one_of(self, "loss_type", LOSS_TYPES), flags.one_of(self, "scale_rewards", ("group", "batch", "none")),
            flags.one_of(self, "importance_sampling_level", ("token", "sequence", "sequence_token")),
            flags.one_of(self, "importance_sampling_mode", IS_MODES), flags.one_of(self, "advantage_estimator", ADVANTAGES),
            flags.one_of(self, "multi_objective_aggregation", ("sum_then_normalize", "normalize_then_sum")),
            (self.multi_objective_aggregation == "sum_then_normalize" or self.advantage_estimator == "grpo",
             "normalize_then_sum (GDPO) is grpo's advantage"),
            (0 <= self.soft_punish_cache < self.max_completion_len and self.log_completions_every >= 0 and
             self.max_tool_calls >= 0, "need 0 <= --soft-punish-cache < --max-completion-len, "
             "--log-completions-every >= 0 and --max-tool-calls >= 0")])
        self.tool_functions = tools.load(self.tools) if self.tools else []
        funcs = rl.reward_functions(self)  # (a bad --task fails here) rewards are their sum, with --reward-weights:
        self.weights = np.array(flags.numbers(self.reward_weights, "reward-weights") or [1.0] * len(funcs))
        flags.check([(len(self.weights) == len(funcs), f"--reward-weights has {len(self.weights)} weights for "
                      f"{len(funcs)} reward functions ({', '.join(f.__name__ for f in funcs)})")])


# ----------------------------------------------------------------------------- advantages

def group_advantages(rewards: np.ndarray, G: int, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """GRPO's: rewards [N] in groups of G consecutive rows → advantages [N] and each row's reward std
    (unbiased, as torch's): of its group, or of the whole batch with scale "batch"."""
    groups = rewards.reshape(-1, G)
    centred = (groups - groups.mean(1, keepdims=True)).reshape(-1)
    std = np.full_like(rewards, rewards.std(ddof=1)) if scale == "batch" else np.repeat(groups.std(1, ddof=1), G)
    return (centred if scale == "none" else centred / (std + 1e-4)), std


def leave_one_out(rewards: np.ndarray, G: int, lengths) -> np.ndarray:
    """RLOO (Ahmadian et al. 2024): r_i − the mean of the group's other G − 1 rewards (TRL's RLOOTrainer, verl)."""
    groups = rewards.reshape(-1, G)
    return (groups - (groups.sum(1, keepdims=True) - groups) / (G - 1)).reshape(-1)


def reinforce_plus_plus_baseline(rewards: np.ndarray, G: int, lengths) -> np.ndarray:
    """REINFORCE++-baseline (Hu et al. 2025), verl's: r_i − its group's mean, then whitened over the batch's
    completion tokens (each completion counted |o_i| times; unbiased variance)."""
    d = rewards - np.repeat(rewards.reshape(-1, G).mean(1), G)
    n = np.asarray(lengths, np.float64)
    mean = np.sum(d * n) / n.sum()
    var = np.sum((d - mean) ** 2 * n) / n.sum() * n.sum() / max(n.sum() - 1, 1)
    return (d - mean) / np.sqrt(var + 1e-8)


ADVANTAGES = {"grpo": None, "rloo": leave_one_out, "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline}


def advantages(per_func: np.ndarray, weights: np.ndarray, lengths, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Rewards [N, F] of B groups of G → advantages [N] and each row's group reward std (for the log and for
    dynamic sampling). sum_then_normalize: the weighted sum, then --advantage-estimator; normalize_then_sum
    (GDPO, TRL's): each function's rewards normalised in their group, summed with the weights, the sum
    normalised over the batch."""
    G, rewards = cfg.num_generations, per_func @ weights
    std = np.repeat(rewards.reshape(-1, G).std(1, ddof=1), G)
    if cfg.multi_objective_aggregation == "normalize_then_sum":
        groups = per_func.reshape(-1, G, per_func.shape[1])
        normal = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
        total = normal.reshape(per_func.shape) @ weights
        return (total - total.mean()) / (total.std(ddof=1) + 1e-4), std
    if cfg.advantage_estimator == "grpo":
        adv, scaled_std = group_advantages(rewards, G, cfg.scale_rewards)
        return adv, (scaled_std if cfg.scale_rewards == "batch" else std)
    return ADVANTAGES[cfg.advantage_estimator](rewards, G, lengths), std


# ----------------------------------------------------------------------------- the policy loss

def loss_weights(mask: np.ndarray, loss_type: str, max_completion_len: int) -> np.ndarray:
    """mask [M, b, C] (one optimizer step's micro-batches, completions, tokens) → weights such that Σ weight ·
    token_loss is the step's loss, averaged as TRL's GRPOTrainer does (each micro-batch's loss / M, but dapo's)."""
    (M, b, _), averaging = mask.shape, LOSS_TYPES[loss_type][1]
    if averaging == "grpo":  # mean over each completion's tokens, then over completions
        w = mask / np.maximum(mask.sum(-1, keepdims=True), 1) / (M * b)
    elif averaging == "bnpo":  # mean over the tokens of each micro-batch
        w = mask / np.maximum(mask.sum((1, 2), keepdims=True), 1) / M
    elif averaging == "dr_grpo":  # a constant normaliser: no length bias
        w = mask / (M * b * max_completion_len)
    else:  # dapo: mean over the tokens of the whole step
        w = mask / max(mask.sum(), 1)
    return w.astype(np.float32)


def clipped(ratio, adv, logp, cfg: Config):
    """PPO's −min(min(ρ, δ)·A, clip(ρ, 1 − ε, 1 + ε_high)·A); δ (TRL's two-sided clip) caps ρ for A < 0."""
    capped = ratio if cfg.delta is None else jnp.minimum(ratio, cfg.delta)
    return -jnp.minimum(capped * adv, jnp.clip(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon_high) * adv)


def cispo(ratio, adv, logp, cfg: Config):
    """CISPO (MiniMax-M1): −sg(min(ρ, ε_high))·A·log π, REINFORCE weighted by the capped ratio, no token's
    gradient dropped (TRL's: ε_high is the cap itself, ScaleRL's 5.0)."""
    return -jax.lax.stop_gradient(jnp.minimum(ratio, cfg.epsilon_high)) * adv * logp


def sapo(ratio, adv, logp, cfg: Config):
    """SAPO (Gao et al. 2025): −(4/τ)·σ(τ(ρ − 1))·A, a soft gate for a clip; τ = τ_pos if A > 0, else τ_neg."""
    tau = jnp.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
    return -4 / tau * jax.nn.sigmoid(tau * (ratio - 1)) * adv


LOSS_TYPES = {  # --loss-type: (its per-token policy term, how token terms are averaged: loss_weights)
    "grpo": (clipped, "grpo"), "bnpo": (clipped, "bnpo"), "dr_grpo": (clipped, "dr_grpo"), "dapo": (clipped, "dapo"),
    "cispo": (cispo, "dapo"), "sapo": (sapo, "grpo")}


def importance_ratio(logp, old_logp, mask, level: str):
    """ρ = π_θ/π_old per token [..., C]; GSPO (sequence): exp of o_i's mean log-ratio [..., 1]; GSPO-token
    (sequence_token): that value, each token carrying its own gradient."""
    log_ratio = logp - old_logp
    if level == "token":
        return jnp.exp(log_ratio)
    mean = jnp.sum(log_ratio * mask, -1, keepdims=True) / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
    if level == "sequence":
        return jnp.exp(mean)
    return jnp.exp(logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(mean))


def sampler_weights(old_logp, sampler_logp, mask, cfg: Config):
    """w = π_old/π_sampler [..., C] or [..., 1] (TRL's vllm_importance_sampling_*): per token, or of the whole
    sequence (exp of the summed difference); *_truncate clamps it to [min, max], *_mask zeroes it outside."""
    diff = (old_logp - sampler_logp) * mask
    w = jnp.exp(jnp.sum(diff, -1, keepdims=True) if cfg.importance_sampling_mode.startswith("sequence") else diff)
    low = -jnp.inf if cfg.importance_sampling_min is None else cfg.importance_sampling_min
    if cfg.importance_sampling_mode.endswith("truncate"):
        return jnp.clip(w, low, cfg.importance_sampling_max)
    return jnp.where((w < low) | (w > cfg.importance_sampling_max), 0.0, w)


def token_losses(logp, old_logp, sampler_logp, ref_logp, advantages, mask, entropy, cfg: Config):
    """The per-token loss [..., C] (before its averaging weights) and what is logged of it. logp: log π_θ
    (with gradient); old_logp: π_old; sampler_logp: the sampler's; ref_logp: π_ref's (None: β = 0);
    advantages [...]; entropy: π_θ's per token (the entropy mask's)."""
    adv = advantages[..., None]  # A_i, the same for every token of o_i
    ratio = importance_ratio(logp, old_logp, mask, cfg.importance_sampling_level)  # ρ
    policy = LOSS_TYPES[cfg.loss_type][0](ratio, adv, logp, cfg)
    high = cfg.epsilon_high if cfg.loss_type == "cispo" else 1 + cfg.epsilon_high  # where the clip leaves no gradient
    clipped_ = ((ratio < 1 - cfg.epsilon) & (adv < 0) & (cfg.loss_type != "cispo")) | ((ratio > high) & (adv > 0))
    if cfg.top_entropy_quantile < 1:  # the policy term where entropy is in the top ρ of this micro-batch's tokens
        h = jax.lax.stop_gradient(entropy)
        policy = policy * (h >= jnp.nanquantile(jnp.where(mask > 0, h, jnp.nan), 1 - cfg.top_entropy_quantile))
    if cfg.off_policy_mask_threshold is not None:  # DeepSeek-V3.2: keep A ≥ 0, or a sequence close to the sampler
        drift = jnp.sum((sampler_logp - jax.lax.stop_gradient(logp)) * mask, -1, keepdims=True) / jnp.maximum(
            jnp.sum(mask, -1, keepdims=True), 1.0)
        policy = policy * ((adv >= 0) | (drift <= cfg.off_policy_mask_threshold))
    w = sampler_weights(old_logp, sampler_logp, mask, cfg) if cfg.importance_sampling_correction else None
    # k3 estimator of KL(π_θ ‖ π_ref): unbiased, always >= 0 (http://joschu.net/blog/kl-approx.html)
    kl = jnp.zeros_like(logp) if ref_logp is None else jnp.exp(ref_logp - logp) - (ref_logp - logp) - 1
    loss = (policy if w is None else policy * w) + cfg.beta * kl  # the correction weighs the policy term only
    return loss, {"kl": kl, "clip_ratio": jnp.broadcast_to(clipped_, logp.shape), "is_weight": w}


# ----------------------------------------------------------------------------- train step

def make_train_step(graphdef, tx, cfg: Config, group: int = 1):
    """step(params, opt_state, frozen, batch [grad_accum, b, ...]) → params, opt_state, metrics, π_θ's log-probs
    [grad_accum, b, C] before the update. π_old is batch["old_logp"] when given; else the step runs at the
    sampling parameters (the first update of a rollout batch), so π_old = π_θ (ratio exactly 1)."""
    def loss_fn(params, frozen, mb, key):
        model = nnx.merge(graphdef, params, frozen)
        logp, entropy, aux_loss = rl.policy_logps(model, mb, cfg.temperature, group)
        c = moe.aux_loss_coef(cfg.router_aux_loss_coef, model.cfg)  # the weight of a MoE router's aux loss (None: dense)
        old_logp = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
        loss, terms = token_losses(logp, old_logp, mb["sampler_logp"], mb.get("ref_logp"), mb["advantages"],
                                   mb["mask"], entropy, cfg)
        m, w = mb["mask"], terms["is_weight"]
        aux = {"kl": jnp.sum(terms["kl"] * m), "clip_ratio": jnp.sum(terms["clip_ratio"] * m),
               "entropy": jnp.sum(entropy * m), "tokens": jnp.sum(m),
               "sampling/logp_difference": jnp.sum(jnp.abs(old_logp - mb["sampler_logp"]) * m)}
        if w is not None:  # over the tokens (token modes) or the completions (sequence modes) it weighs
            ok = (m if w.shape[-1] > 1 else jnp.max(m, -1, keepdims=True)) > 0
            aux |= {"is/min": jnp.min(jnp.where(ok, w, jnp.inf)), "is/max": jnp.max(jnp.where(ok, w, 0.0)),
                    "is/sum": jnp.sum(w * ok), "is/zero": jnp.sum((w == 0) & ok), "is/n": jnp.sum(ok)}
        aux |= {} if c is None else {"aux_loss": aux_loss}
        # L: the weights hold --loss-type's averaging over the whole step (loss_weights); + c · the aux loss' mean
        return jnp.sum(loss * mb["weights"]) + (c or 0.0) / cfg.grad_accum * aux_loss, {**aux, "logp": jax.lax.stop_gradient(logp)}
    update = run.make_update(loss_fn, tx)  # sums the micro-batches' losses and gradients

    def train_step(params, opt_state, frozen, batch):
        params, opt_state, metrics, aux = update(params, opt_state, frozen, batch, None)
        tokens = jnp.maximum(jnp.sum(aux["tokens"]), 1.0)
        means = ("kl", "clip_ratio", "entropy", "sampling/logp_difference")  # per completion token
        metrics.update({k: jnp.sum(aux[k]) / tokens for k in means} | {k: jnp.mean(aux[k]) for k in aux if k == "aux_loss"})
        if "is/n" in aux:
            n = jnp.maximum(jnp.sum(aux["is/n"]), 1.0)
            metrics.update({"sampling/importance_sampling_ratio/min": jnp.min(aux["is/min"]),
                            "sampling/importance_sampling_ratio/mean": jnp.sum(aux["is/sum"]) / n,
                            "sampling/importance_sampling_ratio/max": jnp.max(aux["is/max"]),
                            "sampling/importance_sampling_masked": jnp.sum(aux["is/zero"]) / n})
        return params, opt_state, metrics, aux["logp"]
    return train_step


# ----------------------------------------------------------------------------- one GRPO step, phase by phase

class Rollout(NamedTuple):
    """A rollout batch: B prompts, each G times (a group's rows adjacent), what was sampled and how it scored."""
    rows: list[dict]  # [N] the data rows (prompt, answer, ...)
    prompt_ids: list[list[int]]  # [N] ragged
    completions: list[list[int]]  # [N] ragged, each ending at a stop id or at max_completion_len
    sampler_logps: list[list[float]]  # [N] ragged: log-prob of each sampled token under the sampler's softmax
    loss_masks: list[list[int]]  # [N] ragged: 1 on sampled tokens, 0 on tool results (context, no loss)
    tool_calls: np.ndarray  # [N, 2] each completion's tool calls, and of those the failed ones
    per_func: np.ndarray  # [N, F] each reward function's reward
    rewards: np.ndarray  # [N] their weighted sum
    advantages: np.ndarray  # [N]
    std: np.ndarray  # [N] the reward std of each row's group


def draw(train, train_ids, policy, sample: tools.Sampler, cfg: Config, step: int, position: int):
    """1. Sample B prompts' groups (seeded by (seed, step): a resumed run draws the same), 2. score them, 3. their
    advantages. With --dynamic-sampling (DAPO) groups whose rewards are all equal (nothing to learn) are dropped
    and more batches of B prompts drawn, up to --max-num-gen-batches, the kept cut to B (still short: whole
    slices of them). → the rollout, the data position after it, what was drawn (for the log)."""
    B, G, weights = cfg.prompts_per_step, cfg.num_generations, cfg.weights
    kept, drawn = [], 0  # kept: each group's (rows, prompt ids, tools.ToolRollouts, rewards [G, F])
    while drawn < (cfg.max_num_gen_batches if cfg.dynamic_sampling else 1) and len(kept) < B:
        picked = data.stream(len(train), cfg.seed, position, B)
        position, drawn = position + B, drawn + 1
        rows, ids = [train[i] for i in picked for _ in range(G)], [train_ids[i] for i in picked for _ in range(G)]
        seed = int(np.random.SeedSequence([cfg.seed, step] + [drawn - 1] * (drawn > 1)).generate_state(1)[0])
        outs, per_func = sample(policy, rows, ids, seed, cfg.temperature)  # 1. sample, 2. score
        std = (per_func @ weights).reshape(B, G).std(1)
        kept += [tuple(x[g * G:(g + 1) * G] for x in (rows, ids, outs, per_func)) for g in range(B)
                 if std[g] > 0 or not cfg.dynamic_sampling]
    unit = cfg.steps_per_generation * cfg.grad_accum * jax.process_count()  # groups a step must divide into
    kept = kept[:B] if len(kept) >= B else kept[:len(kept) // unit * unit]
    rows, ids, outs = ([x for group in kept for x in group[i]] for i in range(3))
    per_func = np.concatenate([group[3] for group in kept]) if kept else np.zeros((0, len(sample.funcs)))
    adv, std = advantages(per_func, weights, [len(o.completion) for o in outs], cfg) if kept else (per_func[:, 0],) * 2
    return (Rollout(rows, ids, [o.completion for o in outs], [o.logprobs for o in outs], [o.loss_mask for o in outs],
                    tools.calls(outs), per_func, per_func @ weights, adv, std), position,
            {"num_gen_batches": drawn, "kept_groups": len(kept)} if cfg.dynamic_sampling else {})


def step_batches(r: Rollout, eos_ids, pad_id: int, cfg: Config, mesh, step: int) -> list[dict]:
    """The rollout as the learner reads it: --steps-per-generation slices of whole groups (shuffled, seeded by
    the step), each data.completion_batch's rows plus sampler_logp, the advantages and each token's loss weight
    over the step's micro-batches; this host's share of each as [grad_accum, b, ...] on the mesh. With
    mask_truncated_completions, completions that never emitted a stop id get no loss."""
    N, G, k, M, H = len(r.completions), cfg.num_generations, cfg.steps_per_generation, cfg.grad_accum, jax.process_count()
    batch = data.completion_batch(r.prompt_ids, r.completions, pad_id, cfg.max_completion_len)
    C = batch["mask"].shape[1]
    batch["sampler_logp"] = np.array([lp + [0.0] * (C - len(lp)) for lp in r.sampler_logps], np.float32)
    batch["mask"] *= np.array([m + [0] * (C - len(m)) for m in r.loss_masks], np.float32)  # tool results: no loss
    if cfg.mask_truncated_completions:
        batch["mask"] *= np.array([[c[-1] in eos_ids] for c in r.completions], np.float32)
    batch["advantages"] = r.advantages.astype(np.float32)
    order = np.arange(N) if k == 1 else (np.random.default_rng([cfg.seed, step, 2]).permutation(N // G)[:, None] * G
                                         + np.arange(G)).reshape(-1)
    steps, h = [], jax.process_index()
    for rows in order.reshape(k, -1):
        part = {name: v[rows].reshape(M, -1, *v.shape[1:]) for name, v in batch.items()}  # [M, b, ...]
        part["weights"] = loss_weights(part["mask"], cfg.loss_type, cfg.max_completion_len)  # the whole step's
        b = part["mask"].shape[1] // H  # each host feeds its share of every micro-batch: one host's micro-batches
        steps.append({name: shard.global_batch(v[:, h * b:(h + 1) * b], mesh, axis=1) for name, v in part.items()})
    return steps


def policy_updates(train_step, old_logps, params, opt_state, frozen, steps: list[dict], cfg: Config):
    """4. μ passes of the step batches' optimizer steps; π_old is the sampling policy's for all of them: with one
    step per pass, the first update's own log-probs (it runs at the sampling parameters); with several, one pass
    of old_logps over every slice first (the later slices are not seen before the first update)."""
    steps, metrics = [dict(s) for s in steps], []
    for s in steps if len(steps) > 1 else ():
        s["old_logp"] = old_logps(params, frozen, s)
    for _ in range(cfg.num_iterations):
        for s in steps:
            params, opt_state, m, logp = train_step(params, opt_state, frozen, s)
            s.setdefault("old_logp", logp)  # π_old stays the sampling policy's for every later update
            metrics.append(m)
    return params, opt_state, metrics


def step_record(r: Rollout, funcs, update_metrics, drew: dict, eos_ids, cfg: Config) -> dict:
    """5. Log: TRL's metric names; loss, kl and clip_ratio are means over the updates (grad_norm: the last's)."""
    mean = {k: float(np.mean([float(m[k]) for m in update_metrics])) for k in ("loss", "kl", "clip_ratio")}
    return {"loss": mean["loss"], "reward": float(r.rewards.mean()), "reward_std": float(r.std.mean()),
            **{f"rewards/{f.__name__}": float(x) for f, x in zip(funcs, r.per_func.mean(0))},
            "frac_reward_zero_std": float(np.mean(np.isclose(r.std, 0.0))),
            **({"kl": mean["kl"]} if cfg.beta else {}), "clip_ratio": mean["clip_ratio"],
            "completions/mean_length": float(np.mean([len(c) for c in r.completions])),
            "completions/clipped_ratio": float(np.mean([c[-1] not in eos_ids for c in r.completions])), **drew,
            **{k: float(v) for k, v in update_metrics[0].items() if k in ("entropy", "aux_loss") or k.startswith("sampling/")},
            **(tools.metrics(r.tool_calls) if cfg.tools else {})}


def completion_records(step: int, r: Rollout, funcs, tok, cfg: Config) -> list[dict]:
    """What <out>/completions.jsonl gets: a step's first completions (whole groups), each reward, the advantage."""
    return [{"step": step, "prompt": r.rows[i]["prompt"], "completion": tok.decode(r.completions[i]),
             **{f.__name__: float(x) for f, x in zip(funcs, r.per_func[i])}, "reward": float(r.rewards[i]),
             "advantage": float(r.advantages[i])} for i in range(min(cfg.num_completions_to_print, len(r.rows)))]


# ----------------------------------------------------------------------------- main

def learner(graphdef, tx, cfg: Config, mesh, param_sh, opt_sh) -> tuple[Callable, Callable]:
    """The jitted update (make_train_step) and the log-probs [M, b, C] of a step batch's micro-batches at given
    parameters (π_ref's, and π_old's over several slices); a group's prompt runs once per forward pass in both."""
    rows = cfg.prompts_per_step * cfg.num_generations // (jax.process_count() * cfg.grad_accum * cfg.steps_per_generation)
    group = cfg.num_generations if rows % cfg.num_generations == 0 else 1  # whole groups in a micro-batch: prompt once
    jit_train_step = jax.jit(make_train_step(graphdef, tx, cfg, group), donate_argnums=(0, 1),
                             out_shardings=(param_sh, opt_sh, None, shard.batch_sharding(mesh, 3, axis=1)))
    logps = jax.jit(lambda params, frozen, batch: jax.lax.map(
        lambda mb: rl.policy_logps(nnx.merge(graphdef, params, frozen), mb, cfg.temperature, group)[0], batch))
    return jit_train_step, logps


def main(argv=None):
    cfg = flags.parse(Config, argv)
    start_time = time.perf_counter()
    loaded, prompts, model, first_record, sampler, mesh, manager = rl.prepare(cfg)
    (funcs, tok, *_), eos_ids, pad_id = sampler, sampler.stop_ids, data.pad_id(loaded.tokenizer)
    # π_θ: the trained parameters (all, or the adapters) | the frozen rest of the model
    graphdef, params, frozen = nnx.split(model, adapters.LoRA if cfg.lora else nnx.Param, ...)
    tx, schedule = run.adamw(cfg, cfg.steps * cfg.num_iterations * cfg.steps_per_generation)
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, mesh)
    # π_ref (beta > 0): the starting parameters, or with LoRA the base (adapters zeroed: no second copy)
    ref_params = None if not cfg.beta else jax.jit(
        lambda p: jax.tree.map(jnp.zeros_like if cfg.lora else jnp.copy, p), out_shardings=param_sh)(params)
    train_step, logps = learner(graphdef, tx, cfg, mesh, param_sh, opt_sh)
    step, state, position = run.resume(cfg, manager, {"params": params, "opt_state": opt_state},
                                       {"params": param_sh, "opt_state": opt_sh})
    params, opt_state = state["params"], state["opt_state"]
    run.announce(loaded, params, mesh, f"{len(prompts.train)} prompts, {cfg.prompts_per_step} x "
                                       f"{cfg.num_generations} completions per step", cfg)

    with run.MetricsLog(cfg.out, cfg) as log:
        if step == 0:
            log.write({"step": 0, **first_record, **rl.evaluate(nnx.merge(graphdef, params, frozen), prompts, sampler, cfg)})
        progress = run.Progress(cfg, step, manager)
        while step < cfg.steps:
            with progress.timed("rollout"):  # 1. sample, 2. score, 3. advantages
                r, position, drew = draw(prompts.train, prompts.train_ids, nnx.merge(graphdef, params, frozen),
                                         sampler, cfg, step, position)
            steps = step_batches(r, eos_ids, pad_id, cfg, mesh, step) if r.completions else []
            with progress.timed("update"):  # π_ref's log-probs for the KL, then 4. the updates (waited for)
                for s in steps if cfg.beta else ():
                    s["ref_logp"] = logps(ref_params, frozen, s)
                params, opt_state, update_metrics = jax.block_until_ready(policy_updates(
                    train_step, logps, params, opt_state, frozen, steps, cfg))
            step += 1
            if progress.due(step, cfg.log_every) and update_metrics:  # 5. log
                record = {**progress.record(step, update_metrics[-1], schedule(cfg.num_iterations * cfg.steps_per_generation * step - 1)),
                          **step_record(r, funcs, update_metrics, drew, eos_ids, cfg)}
                if progress.due(step, cfg.eval_every):
                    record.update(rl.evaluate(nnx.merge(graphdef, params, frozen), prompts, sampler, cfg))
                progress.write(log, record, reward=f"{record['reward']:.3f}", kl=f"{record.get('kl', 0):.4f}",
                               eval=record.get("eval/reward", ""))
            if cfg.log_completions_every and progress.due(step, cfg.log_completions_every):
                run.append_jsonl(pathlib.Path(cfg.out) / "completions.jsonl", completion_records(step, r, funcs, tok, cfg))
            # PLUMBING (keep): the checkpoint (and the NaN stop before it), the bar, SIGTERM's early end
            if progress.save_due(step, update_metrics[-1] if update_metrics else {}):
                run.save(cfg, manager, step, {"params": params, "opt_state": opt_state}, position)
            progress.bar.update(1)
            if progress.stopping(step):
                break
        progress.close(step)
    run.export_policy(nnx.merge(graphdef, params, frozen), cfg.out, loaded, cfg.lora,  # 6. export
                      time.perf_counter() - start_time)


if __name__ == "__main__":
    main()
