"""dpo.py — direct preference optimisation (DPO) and its family, learned from pairs of answers.

DPO (Rafailov et al. 2023, arXiv 2305.18290) trains the policy π_θ on pairs (a prompt x, a chosen
answer y⁺, a rejected answer y⁻) with no reward model: an answer's implicit reward is β times its
log-ratio to a frozen reference policy π_ref, and the loss is the logistic loss of the reward margin:

    ρ± = log π_θ(y±|x) − log π_ref(y±|x)      (log-probs summed over the answer's tokens)
    L  = −log σ(β (ρ⁺ − ρ⁻))                   (--loss-type sigmoid; the mean over the step's pairs)
                                               (+ c · a MoE router's aux loss, c = --router-aux-loss-coef)

--loss-type takes a comma list of TRL v1's losses, summed with --loss-weights, or one reference-free loss
(no π_ref at all: simpo, cpo, orpo); each is one line of LOSSES below, its formula beside it. Modifiers,
as TRL v1: --f-divergence-type (scores s± = f'(ρ±) replace ρ±), --ld-alpha (LD-DPO: answer tokens past
the shorter answer's length count α), --use-weighting (WPO), --label-smoothing.

Where the peers differ this file follows TRL v1 (the DPOTrainer of v0.29 on):
- label smoothing acts on robust, exo_pair, aot, aot_unpaired, cpo and simpo only; Tunix's and torchtune's
  DPO (and TRL up to 0.28) apply it to sigmoid as cDPO, which is robust without the 1/(1−2ε);
- ipo and sigmoid_norm divide each answer's score by its length; orpo's NLL covers prompt and answer;
- the losses are means over each micro-batch's pairs, a step's micro-batches averaged (the HF Trainer's).

π_ref is the starting policy: a frozen copy of its weights (--lora: the base, adapters off), or one pass over
the data before training (--precompute-ref-log-probs, cached on disk); TR-DPO (--sync-ref-model) moves it.

With no arguments: the built-in task ("123*4=" → "0492"; the rejected answer has one digit changed) on
the tiny Qwen 3, on a laptop CPU in about two minutes. A supervised warm-up stops at 30% training
accuracy, leaving an unsure policy; DPO then raises held-out greedy accuracy (eval/accuracy) and tells
held-out pairs apart (eval/rewards/accuracies; tests/test_dpo.py holds both). The task's loss is apo_zero
(D'Oosterlinck et al. 2024): with sigmoid the pairs are told apart as well, but greedy accuracy falls as
the chosen answers' log-prob falls with the rejected ones' (Pal et al. 2024, arXiv 2402.13228).

    python dpo.py
    python dpo.py --ckpt runs/sft/hf --data pairs.jsonl --eval-data pairs_test.jsonl --lr 1e-6 --steps 500
    python dpo.py --ckpt DIR --data pairs.jsonl --lora --quant nf4 --loss-type sigmoid,sft --loss-weights 1,0.2
    python dpo.py --ckpt DIR --data pairs.jsonl --loss-type simpo --beta 2 --cpo-alpha 0 --dtype bfloat16 --tpu

Data: TRL's preference formats ({"prompt", "chosen", "rejected"}, text or chat messages; or a shared start
as the prompt). Outputs in --out: metrics.jsonl (TRL's names), checkpoints/, hf/ (--lora: adapter/).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import adapters
import data
import flags
import logprobs
import model as model_lib
import moe
import run
import shard
import tasks

@dataclasses.dataclass
class Config(flags.RunConfig, flags.WarmUpConfig, flags.LoRAConfig):
    # -- model and data --
    model: str = "tiny-qwen3"  # preset or family alias (ignored when --ckpt is given)
    ckpt: str | None = None  # Hugging Face checkpoint directory to start from (e.g. runs/sft/hf)
    data: str | None = None  # preference JSONL (TRL's formats); None: the built-in task's pairs
    eval_data: str | None = None  # the same format, for eval/*; None: held-out task pairs
    task: str = "*,3,1"  # built-in task: operator, digits of a, digits of b
    train_examples: int = 20_000  # built-in task: training pairs (and warm-up examples)
    eval_examples: int = 256  # held-out pairs for eval/*, and prompts for greedy eval/accuracy
    max_len: int = 1024  # prompt + answer tokens kept (keep-start); pairs whose prompt fills it are dropped
    # -- the loss (TRL v1's names and semantics) --
    loss_type: str = ""  # comma list of LOSSES' names, or simpo|cpo|orpo alone ("": sigmoid; the task: apo_zero)
    loss_weights: str = ""  # comma-separated weight per --loss-type entry ("": all 1)
    beta: float = 0.1  # β: scale of the implicit reward (ipo: its τ; orpo: λ, the odds-ratio weight)
    label_smoothing: float = 0.0  # ε, the assumed share of flipped labels: robust, exo_pair, aot*, cpo, simpo
    f_divergence_type: str = "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5  # α of alpha_divergence
    ld_alpha: float | None = None  # LD-DPO: weight of answer tokens past the shorter answer's length
    use_weighting: bool = False  # WPO: weight each pair by its answers' length-normalised probabilities
    discopop_tau: float = 0.05  # discopop's temperature τ
    simpo_gamma: float = 0.5  # simpo's target reward margin γ
    cpo_alpha: float = 1.0  # cpo, simpo: weight of the chosen answers' NLL (TRL's default; 0: pure SimPO)
    # -- the reference policy --
    precompute_ref_log_probs: bool = False  # one reference pass before training, cached; no reference after
    ref_cache: str = "~/.cache/nanotune/ref_logps"  # directory of precomputed reference log-probs
    sync_ref_model: bool = False  # TR-DPO: every --ref-model-sync-steps, π_ref ← α π_θ + (1 − α) π_ref
    ref_model_mixup_alpha: float = 0.6  # TR-DPO's α
    ref_model_sync_steps: int = 512  # TR-DPO's steps between syncs
    # -- optimisation --
    steps: int = 500  # optimizer steps
    batch_size: int = 64  # pairs per step (all micro-batches together)
    grad_accum: int = 1  # micro-batches per step
    lr: float | None = None  # peak learning rate (~1e-5 suits --lora on a pretrained model)
    warmup: float = 0.1  # fraction of steps of linear warmup, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    # -- logging and checkpoints --
    eval_every: int = 50  # steps between evaluations (and at the start and end)
    save_every: int = 100  # steps between train-state checkpoints
    seed: int = 0  # data order, pairs of the built-in task and initialisation
    # -- QLoRA (with --lora) --
    quant: str = ""  # QLoRA: store the frozen base as nf4 or int8 ("" keeps float32)
    AUTO: ClassVar[dict] = {"lr": (2e-3, 1e-6)}  # the fields left None: (a random tiny model, pretrained; TRL's)
    RESUMABLE: ClassVar[frozenset] = flags.RunConfig.RESUMABLE | {"ref_cache"}  # where the cache lives

    def __post_init__(self):
        flags.fill_defaults(self)  # the fields left None: AUTO's value for this start
        self.loss_type = self.loss_type or ("sigmoid" if self.data else "apo_zero")  # the task's: see the docstring
        self.losses = [t.strip() for t in self.loss_type.split(",")]
        self.weights = flags.numbers(self.loss_weights, "loss-weights") or [1.0] * len(self.losses)
        unknown = [t for t in self.losses if t not in LOSSES]
        self.reference_free = any(LOSSES[t].reference_free for t in self.losses if t in LOSSES)
        flags.check(flags.positive(self, "ref_model_sync_steps") + [
            (not unknown, f"unknown --loss-type {', '.join(unknown)}; choose from {', '.join(LOSSES)}"),
            (len(self.weights) == len(self.losses),
             f"--loss-weights has {len(self.weights)} weights for {len(self.losses)} loss types"),
            (not self.reference_free or len(self.losses) == 1, "{}, {} and {} are used alone".format(
                *(name for name, loss in LOSSES.items() if loss.reference_free))),
            (self.beta > 0 and 0 <= self.label_smoothing < 0.5, "need --beta > 0 and 0 <= --label-smoothing < 0.5"),
            ("exo_pair" not in self.losses or self.label_smoothing > 0,
             "exo_pair needs --label-smoothing > 0 (1e-3 is usual)"),
            (self.f_divergence_type in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
             "--f-divergence-type must be one of reverse_kl, forward_kl, js_divergence, alpha_divergence"),
            (self.discopop_tau > 0 and 0 <= self.ref_model_mixup_alpha <= 1 and (self.ld_alpha or 0) >= 0,
             "need --discopop-tau > 0, 0 <= --ref-model-mixup-alpha <= 1 and --ld-alpha >= 0"),
            (not (self.sync_ref_model and (self.lora or self.precompute_ref_log_probs or self.reference_free)),
             "--sync-ref-model needs a full reference (not --lora, --precompute-ref-log-probs or simpo/cpo/orpo)"),
            (self.quant in ("", *adapters.QUANT_FORMATS), f"--quant must be nf4 or int8, got {self.quant!r}"),
            (not self.quant or self.lora, "--quant stores the frozen base of --lora")])
        tasks.builtin_task(self.task)  # a bad --task fails here, before anything loads
        if self.label_smoothing and not any(LOSSES[t].smoothing for t in self.losses):
            print(f"warning: --label-smoothing has no effect on {self.loss_type} (TRL v1)", file=sys.stderr)


# ----------------------------------------------------------------------------- the losses

class Pairs(NamedTuple):
    """Per pair [b], what the losses are written in (the notation of LOSSES' comments; pairs() makes them)."""
    chosen: jax.Array  # log π_θ(y⁺), summed over the chosen answer's tokens
    rejected: jax.Array  # log π_θ(y⁻)
    ref_chosen: jax.Array  # log π_ref(y⁺) (zeros for the reference-free losses)
    ref_rejected: jax.Array  # log π_ref(y⁻)
    n_c: jax.Array  # n⁺, the chosen answer's length in tokens (at least 1)
    n_r: jax.Array  # n⁻
    nll: jax.Array  # the chosen answers' mean token NLL (ORPO: prompt and answer), each pair the batch's
    rho_c: jax.Array  # ρ⁺ = log π_θ(y⁺) − log π_ref(y⁺)
    rho_r: jax.Array  # ρ⁻
    s_c: jax.Array  # s⁺ = f'(ρ⁺), the f-divergence's score (reverse KL: ρ⁺)
    s_r: jax.Array  # s⁻
    d: jax.Array  # βΔ = β(s⁺ − s⁻)


def f_scores(logratio, kind: str, alpha: float):
    """s = f'(π_θ/π_ref) of the f-divergence, constants dropped (TRL v1): reverse KL is DPO's s = ρ."""
    if kind == "forward_kl":
        return -jnp.exp(-logratio)
    if kind == "js_divergence":
        return jax.nn.log_sigmoid(logratio)
    if kind == "alpha_divergence" and abs(alpha - 1) > 1e-6:  # α → 1 is reverse KL
        return jnp.exp(jnp.minimum((alpha - 1) * logratio, 80.0)) / (alpha - 1)
    return logratio


def pairs(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, nll, cfg: Config) -> Pairs:
    rho_c, rho_r = chosen - ref_chosen, rejected - ref_rejected
    s_c, s_r = (f_scores(r, cfg.f_divergence_type, cfg.f_alpha_divergence_coef) for r in (rho_c, rho_r))
    return Pairs(chosen, rejected, ref_chosen, ref_rejected, jnp.maximum(n_chosen, 1.0), jnp.maximum(n_rejected, 1.0),
                 nll, rho_c, rho_r, s_c, s_r, cfg.beta * (s_c - s_r))


def log1mexp(x):
    """log(1 − eˣ) for x < 0, without cancellation on either side of −ln 2."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_odds(q: Pairs):
    """ORPO's log odds ratio of the chosen over the rejected answer, on length-averaged log-probs ȳ±:
    log(p⁺/(1−p⁺)) − log(p⁻/(1−p⁻)) = (ȳ⁺ − ȳ⁻) − (log(1 − e^ȳ⁺) − log(1 − e^ȳ⁻))."""
    y_c, y_r = q.chosen / q.n_c, q.rejected / q.n_r
    return (y_c - y_r) - (log1mexp(jnp.minimum(y_c, -1e-7)) - log1mexp(jnp.minimum(y_r, -1e-7)))


def smoothed(x, e):
    """−(1 − ε) log σ(x) − ε log σ(−x): the logistic loss with ε of the labels assumed flipped."""
    return -(1 - e) * jax.nn.log_sigmoid(x) - e * jax.nn.log_sigmoid(-x)


class Loss(NamedTuple):
    """One loss of the family: its value per pair, and what it needs."""
    per_pair: Callable  # (Pairs, Config) → [b]
    reference_free: bool = False  # π_θ alone (no π_ref is kept); used alone
    smoothing: bool = False  # --label-smoothing ε acts on it (TRL v1)
    nll: str = ""  # the NLL term it adds: "answer" (the chosen answers' tokens), "prompt+answer" (ORPO's)
    logged_reward: str = "ratio"  # rewards/*: β·ρ±; reference-free, β·log π_θ(y±) summed ("sum") or per token ("mean")


ls, sig = jax.nn.log_sigmoid, jax.nn.sigmoid
# TRL v1's DPOTrainer._compute_loss, CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss; the notation is Pairs': ρ±
# log-ratios, s± their scores, Δ = s⁺ − s⁻, n± answer lengths, ȳ± = log π_θ(y±)/n±, ε label smoothing, σ the sigmoid.
LOSSES = {
    "sigmoid": Loss(lambda t, c: -ls(t.d)),  # −log σ(βΔ): DPO
    "hinge": Loss(lambda t, c: jax.nn.relu(1 - t.d)),  # max(0, 1 − βΔ): SLiC
    "ipo": Loss(lambda t, c: (t.s_c / t.n_c - t.s_r / t.n_r - 1 / (2 * c.beta)) ** 2),  # (s⁺/n⁺ − s⁻/n⁻ − 1/2β)²
    "exo_pair": Loss(lambda t, c: sig(t.d) * (ls(t.d) - jnp.log1p(-c.label_smoothing)) +  # KL(σ(±βΔ) ‖ 1−ε, ε)
                     sig(-t.d) * (ls(-t.d) - jnp.log(c.label_smoothing)), smoothing=True),
    "nca_pair": Loss(lambda t, c: -ls(c.beta * t.s_c) - 0.5 * ls(-c.beta * t.s_c)  # −log σ(βs⁺) − ½ log σ(−βs⁺)
                     - 0.5 * ls(-c.beta * t.s_r)),  # − ½ log σ(−βs⁻): NCA, the chosen answer up against both
    "robust": Loss(lambda t, c: (-(1 - c.label_smoothing) * ls(t.d) + c.label_smoothing * ls(-t.d))
                   / (1 - 2 * c.label_smoothing), smoothing=True),  # unbiased under ε flipped labels
    "bco_pair": Loss(lambda t, c: -ls(c.beta * t.s_c) - ls(-c.beta * t.s_r)),  # −log σ(βs⁺) − log σ(−βs⁻)
    "sppo_hard": Loss(lambda t, c: (t.s_c - 0.5 / c.beta) ** 2 + (t.s_r + 0.5 / c.beta) ** 2),  # (s± ∓ 1/2β)²
    # AOT: the batch's sorted policy margins against its sorted reference margins (unpaired: ρ⁺ against ρ⁻)
    "aot": Loss(lambda t, c: smoothed(c.beta * (jnp.sort(t.chosen - t.rejected) -
                                                 jnp.sort(t.ref_chosen - t.ref_rejected)), c.label_smoothing),
                smoothing=True),
    "aot_unpaired": Loss(lambda t, c: smoothed(c.beta * (jnp.sort(t.rho_c) - jnp.sort(t.rho_r)), c.label_smoothing),
                         smoothing=True),
    "apo_zero": Loss(lambda t, c: 1 - sig(c.beta * t.rho_c) + sig(c.beta * t.rho_r)),  # chosen up, rejected down
    "apo_down": Loss(lambda t, c: sig(c.beta * t.rho_c) + 1 - sig(t.d)),  # both down, rejected more
    "discopop": Loss(lambda t, c: (1 - sig(t.d / c.discopop_tau)) * -ls(t.d) + sig(t.d / c.discopop_tau) *
                     jnp.exp(-t.d)),  # (1 − σ(βΔ/τ))·(−log σ(βΔ)) + σ(βΔ/τ)·e^(−βΔ): a logistic-exponential mix
    "sft": Loss(lambda t, c: t.nll, nll="answer"),  # the chosen answers' mean token NLL
    "sigmoid_norm": Loss(lambda t, c: -ls(c.beta * (t.s_c / t.n_c - t.s_r / t.n_r))),  # −log σ(β(s⁺/n⁺ − s⁻/n⁻))
    # reference-free: π_θ alone
    "simpo": Loss(lambda t, c: smoothed(c.beta * (t.chosen / t.n_c - t.rejected / t.n_r) - c.simpo_gamma,
                                        c.label_smoothing) + c.cpo_alpha * t.nll,  # −log σ(β(ȳ⁺ − ȳ⁻) − γ) + α·NLL
                  reference_free=True, smoothing=True, nll="answer", logged_reward="mean"),
    "cpo": Loss(lambda t, c: smoothed(c.beta * (t.chosen - t.rejected), c.label_smoothing) + c.cpo_alpha * t.nll,
                reference_free=True, smoothing=True, nll="answer", logged_reward="sum"),  # −log σ(β(y⁺ − y⁻)) + α·NLL
    "orpo": Loss(lambda t, c: t.nll - c.beta * ls(log_odds(t)),  # NLL(prompt + chosen) − λ log σ(log odds ratio)
                 reference_free=True, nll="prompt+answer", logged_reward="mean"),
}


# ----------------------------------------------------------------------------- log-probs of both answers

def as_pairs(x):
    """Rows 2i, 2i + 1 (pair i's chosen and rejected answer) [2b, ...] → [b, 2, ...]: [:, 0] chosen, [:, 1] rejected."""
    return x.reshape(-1, 2, *x.shape[1:])


def answer_stats(model, batch, orpo: bool = False, wpo: bool = False):
    """Per token of each row's answer [2b, C] (rows 2i, 2i + 1: pair i's chosen and rejected answer after its
    prompt): log π(token) in float32, and without gradients the mean logit, whether the top logit is the
    token, and with `wpo` log Σ_v π(v)². A pair's prompt runs once for both answers (next_token_hidden,
    group 2); orpo scores the prompt's tokens too, so its rows run whole ([2b, T − 1]). → those, and the router's
    load-balancing loss over the rows' tokens (a MoE model's, moe.load_balancing_loss; 0 for a dense one)."""
    tokens, C = batch["tokens"], batch["mask"].shape[-1]
    L = tokens.shape[1] - 1 if orpo else C
    x, taps = model_lib.next_token_hidden(model, tokens, batch["positions"], batch["segment_ids"], L,
                                          1 if orpo else 2, taps=("router",))  # [2b, L, D]

    def per_token(logits, target):  # [c, V], [c]
        lse, z = jax.nn.logsumexp(logits, axis=-1), jax.lax.stop_gradient(logits)
        picked = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
        logp = picked - lse
        top1 = (jax.lax.stop_gradient(picked) == jnp.max(z, axis=-1)).astype(jnp.float32)  # an argmax is a slower pass
        log_sum_sq = jax.nn.logsumexp(2 * z, axis=-1) - 2 * jax.lax.stop_gradient(lse) if wpo else jnp.zeros_like(lse)
        return logp, jnp.mean(z, axis=-1), top1, log_sum_sq
    stats = logprobs.per_position(per_token, x, model.head(model.cfg.param_dtype), tokens[:, -L:],
                                  cap=model.cfg.final_softcap)
    return stats, moe.load_balancing_loss(taps["router"], batch["segment_ids"][:, :-1] > 0, model.cfg)


def sequence_logps(logp, mask, ld_alpha: float | None):
    """Σ_t log π over each answer's tokens, [b, 2, C] → [b, 2]; LD-DPO (ld_alpha): tokens past the shorter
    answer of the pair count ld_alpha, so a long answer's extra tokens cannot carry the margin alone."""
    if ld_alpha is None:
        return jnp.sum(logp * mask, axis=-1)
    shared = jnp.min(jnp.sum(mask, axis=-1), axis=-1)[:, None, None]  # [b, 1, 1]: the shorter answer's length
    return jnp.sum(logp * mask * jnp.where(jnp.cumsum(mask, axis=-1) <= shared, 1.0, ld_alpha), axis=-1)


def nll_term(stats, batch, orpo: bool):
    """The chosen answers' mean token NLL (ORPO: their prompt's tokens too, targets 1..P − 1 whose
    predecessor is a real token) and its token count."""
    mask = as_pairs(batch["mask"])[:, 0]  # [b, C]
    logp = as_pairs(stats[0])[:, 0]  # [b, C], or [b, T − 1] with orpo
    nll, count = -jnp.sum(logp[:, -mask.shape[-1]:] * mask), jnp.sum(mask)
    if orpo:
        seg, P = as_pairs(batch["segment_ids"])[:, 0], batch["tokens"].shape[1] - mask.shape[-1]
        prompt_mask = ((seg[:, 1:P] > 0) & (seg[:, :P - 1] > 0)).astype(jnp.float32)
        nll, count = nll - jnp.sum(logp[:, :P - 1] * prompt_mask), count + jnp.sum(prompt_mask)
    return nll / jnp.maximum(count, 1.0)


def dpo_loss(model, batch, cfg: Config):
    """The loss of a micro-batch of pairs (the weighted losses' means over its pairs) and sums of what is
    logged (summarise turns them into TRL's metrics). batch: answer_stats' rows plus ref_logps [2b], π_ref's
    sums (zeros for the reference-free losses)."""
    orpo, C = LOSSES[cfg.losses[0]].nll == "prompt+answer", batch["mask"].shape[-1]
    stats, aux_loss = answer_stats(model, batch, orpo, cfg.use_weighting)
    logp, mean_logit, top1, log_sum_sq = (as_pairs(a[:, -C:]) for a in stats)  # [b, 2, C]
    mask, ref = as_pairs(batch["mask"]), as_pairs(batch["ref_logps"])  # [b, 2, C], [b, 2]
    sums, n = sequence_logps(logp, mask, cfg.ld_alpha), jnp.sum(mask, axis=-1)  # [b, 2]
    nll = nll_term(stats, batch, orpo) if any(LOSSES[name].nll for name in cfg.losses) else jnp.float32(0)
    q = pairs(sums[:, 0], sums[:, 1], ref[:, 0], ref[:, 1], n[:, 0], n[:, 1], jnp.full(sums.shape[:1], nll), cfg)
    # WPO: each pair weighed by exp of the mean over each answer of log π(y_t) − log Σ_v π(v)², both answers
    w = jnp.exp(jax.lax.stop_gradient(jnp.sum((logp - log_sum_sq) * mask, axis=-1) / jnp.maximum(n, 1.0)))
    weight = w[:, 0] * w[:, 1] if cfg.use_weighting else 1.0
    loss = sum(w_k * jnp.mean(LOSSES[name].per_pair(q, cfg) * weight) for name, w_k in zip(cfg.losses, cfg.weights))
    aux_loss_coef = moe.aux_loss_coef(cfg.router_aux_loss_coef, model.cfg)  # a MoE model's c (None: dense)
    loss = loss + (aux_loss_coef or 0.0) * aux_loss
    logged = LOSSES[cfg.losses[0]].logged_reward  # TRL's rewards: β·ρ±, or β times the policy's own log-probs
    rewards = cfg.beta * (sums - ref if logged == "ratio" else sums / (jnp.maximum(n, 1.0) if logged == "mean" else 1))
    per_answer = lambda x: jnp.sum(jnp.sum(x * mask, axis=-1), axis=0)  # noqa: E731 ([b, 2, C] → [2]: Σ per side)
    aux = {"pairs": jnp.float32(sums.shape[0]), "rewards/chosen": jnp.sum(rewards[:, 0]),
           "rewards/rejected": jnp.sum(rewards[:, 1]), "rewards/accuracies": jnp.sum(rewards[:, 0] > rewards[:, 1]),
           "rewards/margins": jnp.sum(rewards[:, 0] - rewards[:, 1]),
           "logps/chosen": jnp.sum(sums[:, 0]), "logps/rejected": jnp.sum(sums[:, 1]),
           "logps/chosen_per_token": per_answer(logp)[0], "logps/rejected_per_token": per_answer(logp)[1],
           "logits/chosen": per_answer(mean_logit)[0], "logits/rejected": per_answer(mean_logit)[1],
           "mean_token_accuracy": per_answer(top1)[0], "chosen_tokens": per_answer(1.0)[0],
           "rejected_tokens": per_answer(1.0)[1], "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)}
    if any(LOSSES[name].nll for name in cfg.losses):
        aux["nll_loss"] = nll * aux["pairs"]
    if aux_loss_coef is not None:
        aux["aux_loss"] = aux_loss * aux["pairs"]
    if orpo:
        odds = log_odds(q)
        aux.update({"log_odds_ratio": jnp.sum(jax.nn.log_sigmoid(odds)), "log_odds_chosen": jnp.sum(odds)})
    return loss, aux


def summarise(aux, prefix: str = "") -> dict:
    """dpo_loss's sums (one micro-batch, or stacked [M]/[n]) → TRL's metrics: per-pair means, per-token means."""
    s = {k: float(np.sum(v)) for k, v in aux.items()}
    per_token = {**dict.fromkeys(("logits/chosen", "mean_token_accuracy", "logps/chosen_per_token"), "chosen_tokens"),
                 **dict.fromkeys(("logits/rejected", "logps/rejected_per_token"), "rejected_tokens")}
    return {prefix + k: v / max(s[per_token.get(k, "pairs")], 1.0) for k, v in s.items()
            if k not in ("pairs", "chosen_tokens", "rejected_tokens", "tokens")}


# ----------------------------------------------------------------------------- the train step

def make_train_step(graphdef, tx, cfg: Config):
    """step(params, opt_state, frozen, batch [grad_accum, 2b, ...]) → params, opt_state, metrics, aux [M]:
    the micro-batches' mean losses averaged (each pair of the step counts the same)."""
    def loss_fn(params, frozen, micro_batch, key):
        loss, aux = dpo_loss(nnx.merge(graphdef, params, frozen), micro_batch, cfg)
        return loss / cfg.grad_accum, aux  # L: the mean over the step's pairs
    update = run.make_update(loss_fn, tx)  # sums the micro-batches' losses and gradients
    return lambda params, opt_state, frozen, batch: update(params, opt_state, frozen, batch, None)


def reference_logps(graphdef, cfg: Config):
    """jit: π_ref's answer log-prob sums [M, 2b] of a batch of micro-batches, one micro-batch at a time."""
    def one(ref_params, frozen, micro_batch):
        logp = answer_stats(nnx.merge(graphdef, ref_params, frozen), micro_batch)[0][0]
        return sequence_logps(as_pairs(logp), as_pairs(micro_batch["mask"]), cfg.ld_alpha).reshape(-1)
    return jax.jit(lambda ref_params, frozen, batch: jax.lax.map(lambda mb: one(ref_params, frozen, mb), batch))


# ----------------------------------------------------------------------------- pairs in, batches out

def pair_batch(pairs, ref_sums, pad_id: int, grad_accum: int = 1, mesh=None) -> dict:
    """data.pair_batch's rows (2i, 2i + 1: pair i's chosen, rejected) as micro-batches [M, 2b, ...] on the mesh."""
    return shard.micro_batches(data.pair_batch(pairs, ref_sums, pad_id), mesh, grad_accum)


class Reference(NamedTuple):
    """π_ref as the run keeps it: none (simpo/cpo/orpo), precomputed sums, or live weights."""
    fn: Callable  # jit (ref_params, frozen, batch) → π_ref's sums [M, 2b]
    params: object  # live: a copy of the starting weights (LoRA: the adapters zeroed), moved by TR-DPO; else None
    sums: dict  # precomputed: {"train", "eval"} [n, 2]; else {"train": None, "eval": None}


def reference(cfg: Config, graphdef, params, frozen, param_sh, splits: dict, pad_id: int) -> Reference:
    """π_ref at step 0. Precomputed: one pass of the starting policy over each split's pairs, kept in --ref-cache
    under a hash of what makes the numbers: a rerun, a resumed run or a LoRA sweep reads them back."""
    fn, sums = reference_logps(graphdef, cfg), {"train": None, "eval": None}
    live = not cfg.reference_free and not cfg.precompute_ref_log_probs
    ref_params = jax.jit(lambda p: jax.tree.map(jnp.zeros_like if cfg.lora else jnp.copy, p),
                         out_shardings=param_sh)(params) if live else None
    if cfg.precompute_ref_log_probs and not cfg.reference_free:
        def compute():
            return {split: np.concatenate([np.asarray(shard.gather(fn(params, frozen, pair_batch(
                pairs[i:i + cfg.batch_size], None, pad_id)))) for i in range(0, len(pairs), cfg.batch_size)]
                + [np.zeros((1, 0), np.float32)], axis=1).reshape(-1, 2) for split, pairs in splits.items()}
        tokens = [np.array([len(ids) for p in pairs for ids in p] + [t for p in pairs for ids in p for t in ids])
                  for pairs in splits.values()]  # every split's pairs, their lengths and ids
        key = ["dpo reference log-probs v1", cfg.dtype, cfg.ld_alpha, *splits, *tokens,
               *map(np.asarray, jax.tree.leaves(shard.gather((params, frozen))))]
        with flags.user_errors():
            sums = run.cached_arrays(cfg.ref_cache, key, compute, "reference log-probs")
    return Reference(fn, ref_params, sums)


# ----------------------------------------------------------------------------- eval

class Evaluation(NamedTuple):
    """What eval/* is measured with: the jitted loss, held-out pairs, the task's rows for greedy eval/accuracy."""
    step: Callable  # jit (params, frozen, batch [M, 2b, ...]) → dpo_loss of each micro-batch
    pairs: list
    rows: list[dict]
    tok: object


def evaluate(ev: Evaluation, graphdef, params, frozen, ref: Reference, cfg: Config) -> dict:
    """eval/<metric> on held-out pairs (micro-batches of the training size) and, on the built-in task,
    eval/accuracy: greedy completions equal to the answer."""
    record, b, totals, loss = {}, cfg.batch_size // cfg.grad_accum, [], 0.0
    for i in range(0, len(ev.pairs), b):
        sums = None if ref.sums["eval"] is None else ref.sums["eval"][i:i + b]
        batch = pair_batch(ev.pairs[i:i + b], sums, data.pad_id(ev.tok))
        if ref.params is not None:
            batch["ref_logps"] = ref.fn(ref.params, frozen, batch)
        batch_loss, aux = ev.step(params, frozen, batch)
        totals.append(jax.device_get(aux))
        loss += float(batch_loss[0]) * len(ev.pairs[i:i + b])
    if totals:
        record = {"eval/loss": loss / len(ev.pairs),
                  **summarise(jax.tree.map(lambda *a: np.stack(a), *totals), "eval/")}
    return {**record, **run.evaluate_completions(nnx.merge(graphdef, params, frozen), ev.rows, ev.tok, None)}


# ----------------------------------------------------------------------------- main

class Start(NamedTuple):
    """What a DPO run starts from (prepare)."""
    loaded: run.Loaded
    model: object  # π at step 0: the checkpoint, warmed up, with LoRA adapters (B = 0) when asked
    train: list  # (prompt, chosen, rejected) ids
    evals: list  # held-out pairs
    eval_rows: list[dict]  # the task's held-out {"prompt", "completion"} rows (greedy eval/accuracy)
    first_record: dict  # what step 0 logs besides the evaluation: pairs dropped, the warm-up's numbers
    mesh: object
    manager: object  # the orbax checkpoint manager of <out>/checkpoints


def prepare(cfg: Config) -> Start:
    """The model, tokenizer and pairs of a run: pairs read and cut to --max-len (drops printed), the demo's
    supervised warm-up on the chosen answers (run.warm_up: a random policy prefers nothing), LoRA adapters."""
    with flags.user_errors():
        loaded = run.load(cfg)
        train, evals, eval_rows = data.preference_data(loaded.tokenizer, loaded.family, cfg.data, cfg.eval_data,
                                                       cfg.task, cfg.train_examples, cfg.eval_examples, cfg.seed)
        (train, dropped), (evals, eval_dropped) = (data.truncate_pairs(train, cfg.max_len),
                                                   data.truncate_pairs(evals[:cfg.eval_examples], cfg.max_len))
        if not train:
            raise data.DataError(f"no training pairs left after --max-len {cfg.max_len}: {dropped}")
        manager, mesh = run.checkpoints(cfg, loaded.model), shard.make_mesh(cfg.mesh)
    print(f"pairs: {len(train)} training, {len(evals)} held-out; dropped {dropped} (held-out: {eval_dropped})",
          file=sys.stderr)
    model, first_record = shard.shard_model(loaded.model, mesh), {f"data/dropped_{k}": v for k, v in dropped.items()}
    if cfg.warmup_sft_steps:
        tok = loaded.tokenizer
        rows = [{"prompt": tok.decode(p), "completion": tok.decode(c)} for p, c, _ in train[:cfg.eval_examples]]
        model, warmed = run.warm_up(cfg, loaded, model, [(p + c, [0] * len(p) + [1] * len(c)) for p, c, _ in train],
                                    rows, mesh, cfg.max_len)
        first_record.update(warmed)
    if cfg.lora:  # adapters on the (warmed-up) base, B = 0: the model starts unchanged; then QLoRA's base
        adapters.add_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        if cfg.quant:
            adapters.quantize_model(model, cfg.quant)
        model = shard.shard_model(model, mesh)
    return Start(loaded, model, train, evals, eval_rows, first_record, mesh, manager)


def pair_tokens(pairs, picked) -> int:  # TRL's num_tokens: the tokens the model reads (each prompt twice)
    return sum(2 * len(pairs[i][0]) + len(pairs[i][1] + pairs[i][2]) for i in picked)


def main(argv=None):
    cfg = flags.parse(Config, argv)
    start_time, s = time.perf_counter(), prepare(cfg)
    tok, train, pad_id = s.loaded.tokenizer, s.train, data.pad_id(s.loaded.tokenizer)
    # π_θ: the trained parameters (all, or the adapters) | the frozen rest of the model
    graphdef, params, frozen = nnx.split(s.model, adapters.LoRA if cfg.lora else nnx.Param, ...)
    tx, schedule = run.adamw(cfg, cfg.steps)
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, s.mesh)
    train_step = jax.jit(make_train_step(graphdef, tx, cfg), donate_argnums=(0, 1),
                         out_shardings=(param_sh, opt_sh, None, None))
    ref = reference(cfg, graphdef, params, frozen, param_sh, {"train": train, "eval": s.evals}, pad_id)
    state, shardings = {"params": params, "opt_state": opt_state}, {"params": param_sh, "opt_state": opt_sh}
    if cfg.sync_ref_model:  # TR-DPO's reference moves, so it is part of the train state
        state["ref_params"], shardings["ref_params"] = ref.params, param_sh
    step, state, position = run.resume(cfg, s.manager, state, shardings)
    params, opt_state = state["params"], state["opt_state"]
    ref = ref._replace(params=state.get("ref_params", ref.params))
    alpha = cfg.ref_model_mixup_alpha  # TR-DPO (Gorbatovski et al. 2024): π_ref ← α π_θ + (1 − α) π_ref
    sync = jax.jit(lambda p, r: jax.tree.map(lambda a, b: alpha * a + (1 - alpha) * b, p, r), donate_argnums=1,
                   out_shardings=param_sh)
    run.announce(s.loaded, params, s.mesh, f"{len(train)} pairs, {cfg.batch_size} per step, loss {cfg.loss_type}", cfg)
    eval_step = jax.jit(lambda p, f, b: jax.lax.map(lambda mb: dpo_loss(nnx.merge(graphdef, p, f), mb, cfg), b))
    ev = Evaluation(eval_step, s.evals, s.eval_rows, tok)
    tokens_seen = pair_tokens(train, data.stream(len(train), cfg.seed, 0, position))  # num_tokens: TRL's running total

    with run.MetricsLog(cfg.out, cfg) as log:
        if step == 0:
            log.write({"step": 0, **s.first_record, **evaluate(ev, graphdef, params, frozen, ref, cfg)})
        progress = run.Progress(cfg, step, s.manager)
        while step < cfg.steps:
            picked = data.stream(len(train), cfg.seed, position, cfg.batch_size)
            position, tokens_seen = position + cfg.batch_size, tokens_seen + pair_tokens(train, picked)
            sums = None if ref.sums["train"] is None else ref.sums["train"][picked]
            batch = pair_batch([train[i] for i in picked], sums, pad_id, cfg.grad_accum, s.mesh)
            if ref.params is not None:  # π_ref's sums, live
                batch["ref_logps"] = ref.fn(ref.params, frozen, batch)
            params, opt_state, metrics, aux = train_step(params, opt_state, frozen, batch)
            step += 1
            if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
                ref = ref._replace(params=sync(params, ref.params))
            if progress.due(step, cfg.log_every):
                record = {**progress.record(step, metrics, schedule(step - 1)), **summarise(jax.device_get(aux)),
                          "num_tokens": tokens_seen}
                if progress.due(step, cfg.eval_every):
                    record.update(evaluate(ev, graphdef, params, frozen, ref, cfg))
                progress.write(log, record, loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                               eval=record.get("eval/accuracy", ""))
            # PLUMBING (keep): the checkpoint (and the NaN stop before it), the bar, SIGTERM's early end
            if progress.save_due(step, metrics):
                run.save(cfg, s.manager, step, {"params": params, "opt_state": opt_state,
                                                **({"ref_params": ref.params} if cfg.sync_ref_model else {})}, position)
            progress.bar.update(1)
            if progress.stopping(step):
                break
        progress.close(step)
    run.export_policy(nnx.merge(graphdef, params, frozen), cfg.out, s.loaded, cfg.lora,
                      time.perf_counter() - start_time)


if __name__ == "__main__":
    main()
