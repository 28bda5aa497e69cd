"""ppo.py — proximal policy optimisation (PPO) with a learned critic and generalised advantage estimation.

PPO (Schulman et al. 2017, arXiv 1707.06347) as RLHF runs it (Ouyang et al. 2022; TRL's PPOTrainer, Tunix's
PPOLearner, verl's "gae" estimator). GRPO (grpo.py) is this algorithm with the value network taken out: where
GRPO compares a completion's reward with its group's, PPO learns a critic V(q, o_<t), a value head (D → 1) on
its own copy of the policy's trunk, and credits each token with how much better things went than V expected.

For each prompt q the policy samples one completion o (temperature T; π is softmax(logits / T)). Each
token t of o gets a reward: the KL penalty to the frozen starting policy π_ref, plus at the last token the
verifiable score s (the reward functions' weighted sum, minus --missing-eos-penalty if o never ended):

    r_t = −β KL_t + [t = |o| − 1] · s,    KL_t = log π_old/π_ref (k1)  or  π_ref/π_old − log(π_ref/π_old) − 1 (k3)

The critic's values V_t = V(q, o_<t) and GAE (Schulman et al. 2016) turn them into advantages and returns:

    δ_t = r_t + γ V_{t+1} − V_t   (V_|o| = 0),    A_t = Σ_l (γλ)^l δ_{t+l},    R_t = A_t + V_t

A is whitened over the batch's tokens; then --num-ppo-epochs passes, each in --num-mini-batches shuffled
mini-batches, take one optimizer step of each network, the policy on the clipped surrogate and the critic
on the clipped value loss (V_old, π_old: the rollout's, for every pass), each averaged over the
mini-batch's tokens:

    L_π = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε)),   ρ_t = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)
    L_V = ½ max((V_t − R_t)², (clip(V_t, V_old,t − ε_v, V_old,t + ε_v) − R_t)²)

The logged loss is L_π + --vf-coef · L_V (TRL's); the critic has its own AdamW (--critic-lr), so vf_coef
only scales its gradient before clipping. Metrics have TRL's PPO names: objective/kl (Σ_t KL_t, mean over
completions), objective/entropy (Σ_t −log π_old), objective/non_score_reward, objective/rlhf_reward (score
+ non-score), objective/scores, policy/approxkl_avg (½ (log ρ)²), policy/clipfrac_avg, policy/entropy_avg,
loss/policy_avg, loss/value_avg, val/clipfrac_avg, val/ratio, val/num_eos_tokens; and eval/reward.

Where it departs from TRL: the rewards are programs (rl.reward_functions, grpo.py's), not a reward model; the
critic starts from the policy (or --critic-ckpt) with a zero value head and has its own optimizer (Tunix's
critic_optimizer; TRL steps policy and value head together on L_π + vf_coef · L_V); a mini-batch's
--grad-accum micro-batches share one token mean (TRL averages each micro-batch, then the micro-batches).

With no arguments: the built-in task ("123*4=" → "0492") on the tiny Qwen 3; the supervised warm-up grpo.py
runs first (run.warm_up), then PPO raises greedy held-out accuracy (eval/reward; tests/test_ppo.py holds by
how much), a few minutes on a laptop CPU:

    python ppo.py
    python ppo.py --ckpt path/to/qwen3-0.6b --data gsm8k.jsonl --lora --critic-lora --max-completion-len 256 --tpu

Outputs in --out: metrics.jsonl, checkpoints/ (policy and critic, --resume), hf/ (the policy), adapter/.
"""
from __future__ import annotations

import dataclasses
import time
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import adapters
import ckpt
import data
import flags
import model as model_lib
import moe
import rl
import run
import shard


@dataclasses.dataclass
class Config(rl.PromptConfig, flags.RunConfig, flags.WarmUpConfig, flags.LoRAConfig):
    # -- sampling --
    prompts_per_step: int | None = None  # B, prompts per rollout batch, one completion each
    # -- the critic --
    critic_ckpt: str | None = None  # Hugging Face checkpoint of the critic's trunk (e.g. a reward model; None: the policy)
    critic_lora: bool = False  # train only the critic's LoRA adapters on the policy's frozen base (with --lora)
    critic_lr: float | None = None  # the critic's peak learning rate (None: --lr)
    # -- rewards and advantages --
    reward_weights: str = ""  # comma-separated weight per reward function ("": all 1)
    kl_coef: float = 0.05  # β, the per-token KL to π_ref in the reward (TRL's; 0: no reference model)
    kl_estimator: str = "k1"  # k1 (log π_old/π_ref, TRL's default) or k3 (≥ 0, lower variance)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a completion that never emitted EOS
    gamma: float = 1.0  # γ, the discount of later tokens' rewards
    lam: float = 0.95  # λ, GAE's trade between the critic's estimate (0) and the sampled return (1)
    whiten_advantages: bool = True  # advantages to mean 0, variance 1 over the batch's tokens
    # -- the PPO update --
    num_ppo_epochs: int = 4  # passes over each rollout batch
    num_mini_batches: int = 1  # optimizer steps per pass, each on a shuffled slice of the batch
    cliprange: float = 0.2  # ε, the policy ratio clipped to [1 - ε, 1 + ε]
    cliprange_value: float = 0.2  # ε_v, the critic's value kept within ε_v of the rollout's
    vf_coef: float = 0.1  # the value loss's weight in the logged loss (and its gradient)
    grad_accum: int = 1  # micro-batches per mini-batch (less memory, same update)
    # -- optimisation --
    steps: int = 300  # PPO steps, each a rollout batch and num_ppo_epochs x num_mini_batches updates
    lr: float | None = None  # the policy's peak learning rate
    warmup: float = 0.05  # fraction of updates of linear warmup, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    # -- logging and checkpoints --
    eval_every: int = 50  # steps between evaluations (and at the start and end)
    save_every: int = 50  # steps between train-state checkpoints
    seed: int = 0  # data order, sampling and initialisation
    # (tiny, pretrained); the prompts' (rl.PromptConfig.AUTO) as grpo.py's
    AUTO: ClassVar[dict] = {"lr": (4e-4, 1e-6), "prompts_per_step": (256, 64),
                            **rl.PromptConfig.AUTO}

    def __post_init__(self):
        self.fill_task()
        flags.fill_defaults(self)  # the fields left None: AUTO's value for this start
        self.critic_lr = self.critic_lr or self.lr
        flags.check(self.check_sampling() + flags.positive(self, "prompts_per_step", "num_ppo_epochs",
                                                           "num_mini_batches") + [
            (self.prompts_per_step % (self.num_mini_batches * self.grad_accum) == 0,
             "--prompts-per-step must be a multiple of --num-mini-batches x --grad-accum"),
            (self.kl_coef >= 0 and 0 < self.cliprange < 1 and self.cliprange_value > 0 and self.vf_coef > 0 and
             self.critic_lr > 0, "need --kl-coef >= 0, 0 < --cliprange < 1, --cliprange-value > 0, --vf-coef > 0 "
             "and --critic-lr > 0"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "need 0 <= --gamma <= 1 and 0 <= --lam <= 1"),
            flags.one_of(self, "kl_estimator", ("k1", "k3")),
            (self.lora or not self.critic_lora, "--critic-lora puts the critic's adapters on the policy's frozen "
             "base: it needs --lora (without it, the critic is a full copy)"),
            (not (self.critic_lora and self.critic_ckpt), "--critic-lora shares the policy's base; --critic-ckpt "
             "gives the critic its own trunk: choose one")])
        funcs = rl.reward_functions(self)  # (a bad --task fails here) the score is their sum, with --reward-weights:
        self.weights = np.array(flags.numbers(self.reward_weights, "reward-weights") or [1.0] * len(funcs))
        flags.check([(len(self.weights) == len(funcs), f"--reward-weights has {len(self.weights)} weights for "
                      f"{len(funcs)} reward functions ({', '.join(f.__name__ for f in funcs)})")])


# ----------------------------------------------------------------------------- rewards and advantages

def token_kl(logp, ref_logp, estimator: str):
    """KL_t of π_old to π_ref at the sampled tokens: k1 = log π_old/π_ref (unbiased, any sign) or k3 (≥ 0;
    http://joschu.net/blog/kl-approx.html), TRL's kl_estimator."""
    log_ratio = ref_logp - logp
    return -log_ratio if estimator == "k1" else jnp.exp(log_ratio) - 1 - log_ratio


def token_rewards(scores, kl, mask, kl_coef: float):
    """r_t [N, C] = −β KL_t on every completion token, plus the score [N] at each completion's last token."""
    last = jnp.arange(mask.shape[-1]) == jnp.sum(mask, -1, keepdims=True) - 1  # [N, C], one True per row
    return (-kl_coef * kl + jnp.where(last, scores[:, None], 0.0)) * mask


@jax.jit  # one compiled scan per batch shape (called eagerly, the scan would be traced again every step)
def gae(rewards, values, mask, gamma: float, lam: float):
    """Advantages and returns [N, C] from rewards and values [N, C], scanned from the last token back. A masked
    position (padding after the end, a tool's result inside a conversation) is skipped as verl skips it: it
    carries the next value and the next advantage through unchanged, and gets that advantage."""
    def back(carry, column):  # carry: (V_{t+1}, A_{t+1}) of the next unmasked token; column: r_t, V_t, m_t [N]
        next_value, next_adv = carry
        r, v, m = column
        adv = r + gamma * next_value - v + gamma * lam * next_adv  # δ_t + γλ A_{t+1}
        carry = (m * v + (1 - m) * next_value, m * adv + (1 - m) * next_adv)
        return carry, carry[1]
    rewards, values, mask = (jnp.asarray(x, jnp.float32) for x in (rewards, values, mask))
    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, adv = jax.lax.scan(back, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    adv = adv.T  # [C, N] → [N, C]
    return adv, adv + values


def whiten(x, mask):
    """(x − mean) / std over the masked entries (the unbiased variance, as TRL's and verl's masked_whiten)."""
    n = jnp.sum(mask)
    mean = jnp.sum(x * mask) / n
    var = jnp.sum((x - mean) ** 2 * mask) / n * n / jnp.maximum(n - 1, 1)
    return (x - mean) * jax.lax.rsqrt(var + 1e-8)


# ----------------------------------------------------------------------------- the losses

def policy_loss(logp, old_logp, advantages, cliprange: float):
    """PPO's clipped surrogate per token [..., C], with the ratio ρ and where the clip took the gradient away
    (TRL's clipfrac). grpo.py's, with an advantage per token instead of one per completion."""
    ratio = jnp.exp(logp - old_logp)
    unclipped, clipped = -advantages * ratio, -advantages * jnp.clip(ratio, 1 - cliprange, 1 + cliprange)
    return jnp.maximum(unclipped, clipped), ratio, clipped > unclipped


def value_loss(values, old_values, returns, cliprange_value: float):
    """½ max((V − R)², (clip(V, V_old ± ε_v) − R)²) per token [..., C], and where the clipped term won."""
    kept = old_values + jnp.clip(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (kept - returns) ** 2
    return 0.5 * jnp.maximum(unclipped, clipped), clipped > unclipped


# ----------------------------------------------------------------------------- the critic

def critic_values(graphdef, critic, frozen, batch):
    """V(q, o_<t) [b, C] at each completion token: the critic trunk's final hidden state where the policy reads
    the logits of o_t, times the value head, in float32. batch: data.completion_batch's rows."""
    trunk = nnx.merge(graphdef, critic["trunk"], frozen)
    x = model_lib.next_token_hidden(trunk, batch["tokens"], batch["positions"], batch["segment_ids"],
                                    batch["mask"].shape[-1])  # [b, C, D]
    return jnp.einsum("bcd,d->bc", x.astype(jnp.float32), critic["v_head"]["w"]) + critic["v_head"]["b"]


def make_critic(model, cfg: Config, mesh):
    """The critic → its graphdef, what trains {"trunk", "v_head"} and its frozen rest. The trunk is a copy of
    the policy (--critic-ckpt: that checkpoint's model), all of it trained; with --critic-lora, only its own
    adapters, on the policy's frozen base (no second copy of the weights). The value head starts at 0."""
    trunk = model
    if cfg.critic_ckpt:
        with flags.user_errors():
            trunk = ckpt.load_hf(cfg.critic_ckpt, dtype=cfg.dtype, param_dtype="float32", remat=cfg.remat)
            if trunk.cfg.vocab_size != model.cfg.vocab_size:
                raise ValueError(f"--critic-ckpt {cfg.critic_ckpt}: a vocabulary of {trunk.cfg.vocab_size} tokens, the "
                                 f"policy's has {model.cfg.vocab_size}: the critic must read the policy's tokens")
        trunk = shard.shard_model(trunk, mesh)
    graphdef, params, frozen = nnx.split(trunk, adapters.LoRA if cfg.critic_lora else nnx.Param, ...)
    D = trunk.cfg.dim
    critic = {"trunk": jax.tree.map(jnp.copy, params),  # its own buffers: the policy's are donated each update
              "v_head": {"w": jnp.zeros((D,), jnp.float32), "b": jnp.zeros((), jnp.float32)}}
    return graphdef, shard.shard_tree(critic, mesh), frozen


# ----------------------------------------------------------------------------- the learner

def make_scorer(graphdef, critic_graphdef, cfg: Config):
    """score(params, ref_params, critic, frozen, critic_frozen, batch [K, b, ...]) → log π_old, log π_ref (0
    without a reference) and V_old [K, b, C] of a rollout batch, a micro-batch at a time (lax.map)."""
    def one(params, ref_params, critic, frozen, critic_frozen, mb):
        def logp(p):
            return rl.policy_logps(nnx.merge(graphdef, p, frozen), mb, cfg.temperature)[0]
        old = logp(params)
        ref = jnp.zeros_like(old) if ref_params is None else logp(ref_params)
        return old, ref, critic_values(critic_graphdef, critic, critic_frozen, mb)
    return jax.jit(lambda params, ref_params, critic, frozen, critic_frozen, batch: jax.lax.map(
        lambda mb: one(params, ref_params, critic, frozen, critic_frozen, mb), batch))


def make_train_step(graphdef, critic_graphdef, tx, critic_tx, cfg: Config):
    """step(state, frozen, critic_frozen, batch [grad_accum, b, ...]) → state, metrics: one optimizer step of
    each network on a mini-batch, the policy on L_π and the critic on vf_coef · L_V, each with its own AdamW.
    state: {params, opt_state, critic, critic_opt_state}; batch["weights"]: the mask / the mini-batch's tokens."""
    def policy_fn(params, frozen, mb, key):
        model = nnx.merge(graphdef, params, frozen)
        logp, entropy, aux_loss = rl.policy_logps(model, mb, cfg.temperature)
        c = moe.aux_loss_coef(cfg.router_aux_loss_coef, model.cfg)  # a MoE router's aux loss weight (None: dense)
        loss, ratio, clipped = policy_loss(logp, mb["old_logp"], mb["advantages"], cfg.cliprange)
        w = mb["weights"]  # Σ w · x: the mean of x over the mini-batch's completion tokens
        # approx_kl: http://joschu.net/blog/kl-approx.html (k2, as TRL logs it)
        return jnp.sum(loss * w) + (c or 0.0) / cfg.grad_accum * aux_loss, {"policy/approxkl_avg": jnp.sum(0.5 * (logp - mb["old_logp"]) ** 2 * w),
                                   "policy/clipfrac_avg": jnp.sum(clipped * w),
                                   "policy/entropy_avg": jnp.sum(entropy * w), "val/ratio": jnp.sum(ratio * w)}

    def value_fn(critic, frozen, mb, key):
        values = critic_values(critic_graphdef, critic, frozen, mb)
        loss, clipped = value_loss(values, mb["old_values"], mb["returns"], cfg.cliprange_value)
        value = jnp.sum(loss * mb["weights"])
        return cfg.vf_coef * value, {"loss/value_avg": value, "val/clipfrac_avg": jnp.sum(clipped * mb["weights"])}
    update_policy, update_critic = run.make_update(policy_fn, tx), run.make_update(value_fn, critic_tx)

    def train_step(state, frozen, critic_frozen, batch):
        params, opt_state, pm, paux = update_policy(state["params"], state["opt_state"], frozen, batch, None)
        critic, critic_opt_state, vm, vaux = update_critic(state["critic"], state["critic_opt_state"], critic_frozen,
                                                           batch, None)
        metrics = {"loss": pm["loss"] + vm["loss"], "grad_norm": pm["grad_norm"], "loss/policy_avg": pm["loss"],
                   "val/grad_norm": vm["grad_norm"], **{k: jnp.sum(v) for k, v in {**paux, **vaux}.items()}}
        return {"params": params, "opt_state": opt_state, "critic": critic,
                "critic_opt_state": critic_opt_state}, metrics
    return train_step


# ----------------------------------------------------------------------------- one PPO step, phase by phase

class Rollout(NamedTuple):
    """A rollout batch: B prompts, one completion each, and how they scored."""
    rows: list[dict]  # [N] the data rows (prompt, answer, ...)
    prompt_ids: list[list[int]]  # [N] ragged
    completions: list[list[int]]  # [N] ragged, each ending at a stop id or at max_completion_len
    per_func: np.ndarray  # [N, F] each reward function's reward
    ended: np.ndarray  # [N] whether the completion emitted a stop id
    scores: np.ndarray  # [N] s: the weighted sum of the rewards, less the missing-EOS penalty


def draw(prompts: data.Prompts, policy, sampler, cfg: Config, step: int, position: int) -> tuple[Rollout, int]:
    """1. Sample a completion of each of B prompts (seeded by (seed, step): a resumed run draws the same),
    2. score them. → the rollout and the data position after it."""
    picked = data.stream(len(prompts.train), cfg.seed, position, cfg.prompts_per_step)
    rows, ids = [prompts.train[i] for i in picked], [prompts.train_ids[i] for i in picked]
    seed = int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0])
    outs, per_func = sampler(policy, rows, ids, seed, cfg.temperature)
    completions = [o.completion for o in outs]
    ended = np.array([len(c) > 0 and c[-1] in sampler.stop_ids for c in completions])
    scores = per_func @ cfg.weights - cfg.missing_eos_penalty * ~ended
    return Rollout(rows, ids, completions, per_func, ended, scores.astype(np.float32)), position + len(picked)


def advantages(r: Rollout, batch: dict, old_logp, ref_logp, old_values, cfg: Config) -> tuple[dict, dict]:
    """3. The per-token rewards, GAE's advantages (whitened) and returns [N, C] → the learner's batch (with the
    rollout's log-probs and values) and TRL's objective/* metrics of the rollout."""
    mask = jnp.asarray(batch["mask"])
    kl = token_kl(old_logp, ref_logp, cfg.kl_estimator) * mask if cfg.kl_coef else jnp.zeros_like(mask)
    rewards = token_rewards(jnp.asarray(r.scores), kl, mask, cfg.kl_coef)
    adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    adv = whiten(adv, mask) if cfg.whiten_advantages else adv
    non_score = float(jnp.mean(jnp.sum(-cfg.kl_coef * kl, -1)))
    stats = {"objective/kl": float(jnp.mean(jnp.sum(kl, -1))),
             "objective/entropy": float(jnp.mean(jnp.sum(-old_logp * mask, -1))),
             "objective/non_score_reward": non_score, "objective/rlhf_reward": float(r.scores.mean()) + non_score,
             "objective/scores": float(r.scores.mean()), "val/num_eos_tokens": int(r.ended.sum())}
    learner = {**batch, "old_logp": old_logp, "old_values": old_values, "advantages": adv * mask, "returns": returns}
    return {k: np.asarray(v) for k, v in learner.items()}, stats


def ppo_updates(train_step, state, frozen, critic_frozen, batch: dict, cfg: Config, mesh, step: int):
    """4. --num-ppo-epochs passes over the batch, each in --num-mini-batches shuffled slices (seeded by the step
    and pass), one update of both networks per slice; π_old and V_old stay the rollout's throughout."""
    N, metrics = batch["mask"].shape[0], []
    for epoch in range(cfg.num_ppo_epochs):
        order = np.random.default_rng([cfg.seed, step, epoch]).permutation(N)
        for rows in order.reshape(cfg.num_mini_batches, -1):
            part = {name: v[rows] for name, v in batch.items()}
            part["weights"] = (part["mask"] / max(part["mask"].sum(), 1.0)).astype(np.float32)
            state, m = train_step(state, frozen, critic_frozen, shard.micro_batches(part, mesh, cfg.grad_accum))
            metrics.append(m)
    return state, metrics


def step_record(r: Rollout, funcs, stats: dict, update_metrics, cfg: Config) -> dict:
    """5. Log: TRL's PPO names; the update metrics are means over the step's updates (grad_norm: the last's)."""
    names = [k for k in update_metrics[0] if k not in ("grad_norm", "val/grad_norm")]
    return {**{k: float(np.mean([float(m[k]) for m in update_metrics])) for k in names},
            "val/grad_norm": float(update_metrics[-1]["val/grad_norm"]), **stats,
            "reward": float((r.per_func @ cfg.weights).mean()),
            **{f"rewards/{f.__name__}": float(x) for f, x in zip(funcs, r.per_func.mean(0))},
            "completions/mean_length": float(np.mean([len(c) for c in r.completions]))}


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg = flags.parse(Config, argv)
    start_time = time.perf_counter()
    loaded, prompts, model, first_record, sampler, mesh, manager = rl.prepare(cfg)
    funcs, pad_id = sampler.funcs, data.pad_id(loaded.tokenizer)
    # π_θ: the trained parameters (all, or the adapters) | the frozen rest; the critic: its trunk and value head
    graphdef, params, frozen = nnx.split(model, adapters.LoRA if cfg.lora else nnx.Param, ...)
    critic_graphdef, critic, critic_frozen = make_critic(model, cfg, mesh)
    updates = cfg.steps * cfg.num_ppo_epochs * cfg.num_mini_batches
    (tx, schedule), (critic_tx, _) = run.adamw(cfg, updates), run.adamw(dataclasses.replace(cfg, lr=cfg.critic_lr), updates)
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, mesh)
    critic_opt_state, critic_sh, critic_opt_sh = run.init_optimizer(critic_tx, critic, mesh)
    # π_ref (kl_coef > 0): the starting parameters, or with LoRA the base (adapters zeroed: no second copy)
    ref_params = None if not cfg.kl_coef else jax.jit(
        lambda p: jax.tree.map(jnp.zeros_like if cfg.lora else jnp.copy, p), out_shardings=param_sh)(params)
    state_sh = {"params": param_sh, "opt_state": opt_sh, "critic": critic_sh, "critic_opt_state": critic_opt_sh}
    train_step = jax.jit(make_train_step(graphdef, critic_graphdef, tx, critic_tx, cfg), donate_argnums=(0,),
                         out_shardings=(state_sh, None))
    score = make_scorer(graphdef, critic_graphdef, cfg)
    step, state, position = run.resume(cfg, manager, {"params": params, "opt_state": opt_state, "critic": critic,
                                                      "critic_opt_state": critic_opt_state}, state_sh)
    run.announce(loaded, state["params"], mesh, f"{len(prompts.train)} prompts, {cfg.prompts_per_step} completions "
                                                f"per step; the critic trains on its own", cfg)

    with run.MetricsLog(cfg.out, cfg) as log:
        if step == 0:
            log.write({"step": 0, **first_record,
                       **rl.evaluate(nnx.merge(graphdef, state["params"], frozen), prompts, sampler, cfg)})
        progress = run.Progress(cfg, step, manager)
        while step < cfg.steps:
            with progress.timed("rollout"):  # 1. sample, 2. score
                r, position = draw(prompts, nnx.merge(graphdef, state["params"], frozen), sampler, cfg, step, position)
            with progress.timed("update"):  # π_old, π_ref and V_old; 3. advantages; 4. the updates (waited for)
                batch = data.completion_batch(r.prompt_ids, r.completions, pad_id, cfg.max_completion_len)
                K = cfg.num_mini_batches * cfg.grad_accum
                scored = score(state["params"], ref_params, state["critic"], frozen, critic_frozen,
                               shard.micro_batches(batch, mesh, K))
                old_logp, ref_logp, old_values = (np.asarray(x).reshape(batch["mask"].shape)
                                                  for x in jax.device_get(shard.gather(scored)))
                learner_batch, stats = advantages(r, batch, old_logp, ref_logp, old_values, cfg)
                state, update_metrics = jax.block_until_ready(ppo_updates(
                    train_step, state, frozen, critic_frozen, learner_batch, cfg, mesh, step))
            step += 1
            if progress.due(step, cfg.log_every):  # 5. log
                updates_done = cfg.num_ppo_epochs * cfg.num_mini_batches * step
                record = {**progress.record(step, update_metrics[-1], schedule(updates_done - 1)),
                          **step_record(r, funcs, stats, update_metrics, cfg)}
                if progress.due(step, cfg.eval_every):
                    record.update(rl.evaluate(nnx.merge(graphdef, state["params"], frozen), prompts, sampler, cfg))
                progress.write(log, record, reward=f"{record['reward']:.3f}", kl=f"{record['objective/kl']:.4f}",
                               eval=record.get("eval/reward", ""))
            # PLUMBING (keep): the checkpoint (and the NaN stop before it), the bar, SIGTERM's early end
            if progress.save_due(step, update_metrics[-1]):
                run.save(cfg, manager, step, state, position)
            progress.bar.update(1)
            if progress.stopping(step):
                break
        progress.close(step)
    run.export_policy(nnx.merge(graphdef, state["params"], frozen), cfg.out, loaded, cfg.lora,  # 6. export
                      time.perf_counter() - start_time)


if __name__ == "__main__":
    main()
