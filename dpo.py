"""dpo.py — direct preference optimisation (DPO) and its family, learned from pairs of answers.

DPO (Rafailov et al. 2023, arXiv 2305.18290) trains the policy π_θ on pairs (a prompt x, a chosen
answer y⁺, a rejected answer y⁻) with no reward model: an answer's implicit reward is β times its
log-ratio to a frozen reference policy π_ref, and the loss is the logistic loss of the reward margin:

    ρ± = log π_θ(y±|x) − log π_ref(y±|x)      (log-probs summed over the answer's tokens)
    L  = −log σ(β (ρ⁺ − ρ⁻))                   (--loss-type sigmoid; the mean over pairs)

--loss-type takes a comma list of TRL v1's losses, summed with --loss-weights (pair_losses below, each
formula beside its line): sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot
aot_unpaired apo_zero apo_down discopop sft sigmoid_norm; or one reference-free loss (no π_ref at
all): simpo and cpo (TRL's CPOTrainer), orpo (TRL's ORPOTrainer). Modifiers, as TRL v1:
--f-divergence-type (the scores s± = f'(ρ±) replace ρ±), --ld-alpha (LD-DPO: answer tokens past the
shorter answer's length count α), --use-weighting (WPO), --label-smoothing.

Where the peers differ this file follows TRL v1 (the DPOTrainer of v0.29 on): label smoothing acts
on robust, exo_pair, aot, aot_unpaired, cpo and simpo only. Tunix's and torchtune's DPO (and TRL up
to 0.28) apply it to sigmoid as cDPO, −(1−ε) log σ(βΔ) − ε log σ(−βΔ): that is robust without the
1/(1−2ε). ipo and sigmoid_norm divide each answer's score by its length; orpo's NLL covers prompt
and answer (TRL and Tunix); the losses are means over the pairs of each micro-batch, and a step's
micro-batches are averaged (TRL's, by way of the HF Trainer).

π_ref is the starting policy: a frozen copy of its weights; with --lora the base with the adapters
off (no second copy); with --precompute-ref-log-probs one pass over the data before training, the
sums kept on disk (--ref-cache) under a hash of the reference's weights and the tokenized pairs, so a
rerun or a LoRA sweep skips it. TR-DPO (--sync-ref-model) moves π_ref toward π_θ every few steps.

With no arguments: the built-in task ("123*4=" → "0492"; the rejected answer has one digit changed)
on the tiny Qwen 3, on a laptop CPU in about two minutes. A supervised warm-up (printed, saved to
<out>/warmup_sft) stops at 30% training accuracy, leaving an unsure policy; 500 DPO steps then take
held-out greedy accuracy (eval/accuracy; step 0 is the starting policy) from ~0.27 to ~0.59 and tell
held-out pairs apart (eval/rewards/accuracies ~0.96). The task's loss is apo_zero (D'Oosterlinck et
al. 2024): with sigmoid the pairs are told apart as well (0.94) but greedy accuracy falls (0.27 →
0.07) as the chosen answers' log-prob falls with the rejected ones' (eval/logps/chosen −3.2 → −16.9),
worst for pairs one token apart (Pal et al. 2024, arXiv 2402.13228); apo_zero pushes each answer's
reward on its own.

    python dpo.py
    python dpo.py --ckpt runs/sft/hf --data pairs.jsonl --eval-data pairs_test.jsonl --lr 1e-6 --steps 500
    python dpo.py --ckpt DIR --data pairs.jsonl --lora --quant nf4 --loss-type sigmoid,sft --loss-weights 1,0.2
    python dpo.py --ckpt DIR --data pairs.jsonl --loss-type simpo --beta 2 --cpo-alpha 0 --dtype bfloat16 --tpu

Data: JSONL in TRL's preference formats, {"prompt", "chosen", "rejected"} as text or chat messages,
or {"chosen", "rejected"} whose shared start is the prompt. Outputs in --out: metrics.jsonl (TRL's
names: loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/*, logits/*,
mean_token_accuracy, ...; eval/... on held-out pairs), checkpoints/ (--resume), hf/ (--lora: adapter/).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import ClassVar
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import adapters
import ckpt
import data
import logprobs
import model as model_lib
import run
import sample
import sft
import shard
import tasks

LOSS_NAMES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # TRL v1's DPO losses
REFERENCE_FREE = ("simpo", "cpo", "orpo")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclasses.dataclass
class Config(run.RunConfig):
    # model and data
    model: str = "tiny-qwen3"  # preset or family alias (ignored when --ckpt is given)
    ckpt: str | None = None  # Hugging Face checkpoint directory to start from (e.g. runs/sft/hf)
    data: str | None = None  # preference JSONL (TRL's formats); default: the built-in task's pairs
    eval_data: str | None = None  # the same format, for eval/*; default: held-out task pairs
    task: str = "*,3,1"  # built-in task: operator, digits of a, digits of b
    train_examples: int = 20_000  # built-in task: training pairs (and warm-up examples)
    eval_examples: int = 256  # held-out pairs for eval/*, and prompts for greedy eval/accuracy
    max_len: int = 1024  # prompt + answer tokens kept (keep-start); pairs whose prompt fills it are dropped
    # the loss (TRL v1's names and semantics)
    loss_type: str = ""  # comma list of pair_losses' names, or simpo|cpo|orpo alone (default: sigmoid; task: apo_zero)
    loss_weights: str = ""  # comma-separated weight per --loss-type entry (default: all 1)
    beta: float = 0.1  # β: scale of the implicit reward (ipo: its τ; orpo: λ, the odds-ratio weight)
    label_smoothing: float = 0.0  # ε, the assumed share of flipped labels: robust, exo_pair, aot*, cpo, simpo
    f_divergence_type: str = "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5  # α of alpha_divergence
    ld_alpha: float | None = None  # LD-DPO: weight of answer tokens past the shorter answer's length
    use_weighting: bool = False  # WPO: weight each pair by its answers' length-normalised probabilities
    discopop_tau: float = 0.05  # discopop's temperature τ
    simpo_gamma: float = 0.5  # simpo's target reward margin γ
    cpo_alpha: float = 1.0  # cpo, simpo: weight of the chosen answers' NLL (TRL's default; 0: pure SimPO)
    # the reference policy
    precompute_ref_log_probs: bool = False  # one reference pass before training, cached; no reference after
    ref_cache: str = "~/.cache/nanotune/ref_logps"  # directory of precomputed reference log-probs
    sync_ref_model: bool = False  # TR-DPO: every --ref-model-sync-steps, π_ref ← α π_θ + (1 − α) π_ref
    ref_model_mixup_alpha: float = 0.6  # TR-DPO's α
    ref_model_sync_steps: int = 512  # TR-DPO's steps between syncs
    # optimisation
    steps: int = 500  # optimizer steps
    batch_size: int = 64  # pairs per step (all micro-batches together)
    grad_accum: int = 1  # micro-batches per step
    lr: float | None = None  # peak learning rate (2e-3 for a random tiny model; 1e-6 pretrained, ~1e-5 suits --lora)
    warmup: float = 0.1  # fraction of steps of linear warmup, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    # logging and checkpoints
    eval_every: int = 50  # steps between evaluations (and at the start and end)
    save_every: int = 100  # steps between train-state checkpoints
    out: str = "runs/dpo"  # output directory
    seed: int = 0  # data order, pairs of the built-in task and initialisation
    # supervised warm-up (the built-in task from random weights)
    warmup_sft_steps: int | None = None  # most supervised steps before DPO (500 on the task from scratch, else 0)
    warmup_sft_target: float = 0.3  # the warm-up stops once greedy accuracy on training prompts reaches this
    warmup_sft_lr: float = 3e-3  # warm-up learning rate (constant after a 10-step ramp)
    warmup_sft_batch_size: int = 128  # warm-up sequences per step
    # LoRA / QLoRA
    lora: bool = False  # train LoRA adapters only; the reference is the base (adapters off)
    lora_rank: int = 8  # LoRA r
    lora_alpha: float = 16.0  # LoRA scale numerator (alpha / r)
    quant: str = ""  # QLoRA: store the frozen base as nf4 or int8 ("" keeps float32)

    # The defaults of the fields left None: (a random tiny model, a pretrained checkpoint); pretrained: TRL's
    # DPOConfig learning_rate 1e-6 (its docs suggest ~1e-5 with LoRA: pass --lr 1e-5).
    AUTO: ClassVar[dict] = {"lr": (2e-3, 1e-6), "warmup_sft_steps": (-1, 0)}  # no warm-up over what a model knows

    def __post_init__(self):
        run.fill_defaults(self)  # the fields left None: AUTO's value for this start
        self.loss_type = self.loss_type or ("sigmoid" if self.data else "apo_zero")  # the task's: see the docstring
        self.losses = [t.strip() for t in self.loss_type.split(",")]
        try:
            self.weights = [float(w) for w in self.loss_weights.split(",")] if self.loss_weights else [1.0] * len(
                self.losses)
        except ValueError:
            raise ValueError(f"--loss-weights must be comma-separated numbers, got {self.loss_weights!r}") from None
        unknown = [t for t in self.losses if t not in LOSS_NAMES + REFERENCE_FREE]
        self.reference_free = any(t in REFERENCE_FREE for t in self.losses)
        run.check(run.positive(self, "steps", "batch_size", "grad_accum", "max_len", "eval_every", "save_every", "keep",
                               "log_every", "train_examples", "eval_examples", "warmup_sft_batch_size", "lora_rank",
                               "ref_model_sync_steps") + [
            (not unknown, f"unknown --loss-type {', '.join(unknown)}; choose from {', '.join(LOSS_NAMES)} "
                          f"or one of {', '.join(REFERENCE_FREE)}"),
            (len(self.weights) == len(self.losses),
             f"--loss-weights has {len(self.weights)} weights for {len(self.losses)} loss types"),
            (not self.reference_free or len(self.losses) == 1, "simpo, cpo and orpo are used alone"),
            (self.beta > 0 and 0 <= self.label_smoothing < 0.5, "need --beta > 0 and 0 <= --label-smoothing < 0.5"),
            ("exo_pair" not in self.losses or self.label_smoothing > 0,
             "exo_pair needs --label-smoothing > 0 (1e-3 is usual)"),
            (self.f_divergence_type in F_DIVERGENCES, f"--f-divergence-type must be one of {', '.join(F_DIVERGENCES)}"),
            (self.discopop_tau > 0 and 0 <= self.ref_model_mixup_alpha <= 1 and (self.ld_alpha or 0) >= 0,
             "need --discopop-tau > 0, 0 <= --ref-model-mixup-alpha <= 1 and --ld-alpha >= 0"),
            (self.batch_size % self.grad_accum == 0,
             f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}"),
            (not (self.sync_ref_model and (self.lora or self.precompute_ref_log_probs or self.reference_free)),
             "--sync-ref-model needs a full reference (not --lora, --precompute-ref-log-probs or simpo/cpo/orpo)"),
            (self.lr > 0 and self.warmup_sft_lr > 0 and 0 <= self.warmup < 1 and self.clip > 0 and
             self.weight_decay >= 0 and self.warmup_sft_steps >= -1, "need --lr > 0, --warmup-sft-lr > 0, "
             "0 <= --warmup < 1, --clip > 0, --weight-decay >= 0, --warmup-sft-steps >= -1"),
            (self.quant in ("", *adapters.QUANT_FORMATS), f"--quant must be nf4 or int8, got {self.quant!r}"),
            (not self.quant or self.lora, "--quant stores the frozen base of --lora"),
            (self.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {self.dtype!r}")])
        tasks.builtin_task(self.task)  # a bad --task fails here, before anything loads
        if self.label_smoothing and not {"robust", "exo_pair", "aot", "aot_unpaired", "cpo", "simpo"} & {*self.losses}:
            print(f"warning: --label-smoothing has no effect on {self.loss_type} (TRL v1)", file=sys.stderr)
        if self.warmup_sft_steps == -1:
            self.warmup_sft_steps = 0 if (self.ckpt or self.data) else 500


# ----------------------------------------------------------------------------- the losses

# Per pair [b]: summed answer log-probs under π_θ (chosen, rejected) and π_ref (ref_chosen, ref_rejected; zeros
# without a reference), the answers' lengths, and the NLL term of sft/cpo/simpo/orpo.
Pairs = collections.namedtuple("Pairs", "chosen rejected ref_chosen ref_rejected n_chosen n_rejected nll")


def f_scores(logratio, kind: str, alpha: float):
    """s = f'(π_θ/π_ref) of the f-divergence, constants dropped (TRL v1): reverse KL is DPO's s = ρ."""
    if kind == "forward_kl":
        return -jnp.exp(-logratio)
    if kind == "js_divergence":
        return jax.nn.log_sigmoid(logratio)
    if kind == "alpha_divergence" and abs(alpha - 1) > 1e-6:  # α → 1 is reverse KL
        return jnp.exp(jnp.minimum((alpha - 1) * logratio, 80.0)) / (alpha - 1)
    return logratio


def log1mexp(x):
    """log(1 − eˣ) for x < 0, without cancellation on either side of −ln 2."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def pair_losses(q: Pairs, cfg: Config) -> dict:
    """Every loss, per pair [b], as a function (only the chosen ones run): TRL v1's DPOTrainer._compute_loss,
    CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss. Notation: ρ± log-ratios, s± their scores, Δ = s⁺ − s⁻,
    n± answer lengths, ȳ± = log π_θ(y±)/n±, ε label smoothing, σ the sigmoid."""
    ls, sig, b, e = jax.nn.log_sigmoid, jax.nn.sigmoid, cfg.beta, cfg.label_smoothing
    rho_c, rho_r = q.chosen - q.ref_chosen, q.rejected - q.ref_rejected
    s_c, s_r = (f_scores(r, cfg.f_divergence_type, cfg.f_alpha_divergence_coef) for r in (rho_c, rho_r))
    d = b * (s_c - s_r)  # βΔ
    n_c, n_r = jnp.maximum(q.n_chosen, 1.0), jnp.maximum(q.n_rejected, 1.0)
    smoothed = lambda x: -(1 - e) * ls(x) - e * ls(-x)  # noqa: E731  (−(1−ε) log σ(x) − ε log σ(−x))
    return {
        "sigmoid": lambda: -ls(d),  # −log σ(βΔ)
        "hinge": lambda: jax.nn.relu(1 - d),  # max(0, 1 − βΔ)
        "ipo": lambda: (s_c / n_c - s_r / n_r - 1 / (2 * b)) ** 2,  # (s⁺/n⁺ − s⁻/n⁻ − 1/2β)²
        "exo_pair": lambda: sig(d) * (ls(d) - jnp.log1p(-e)) + sig(-d) * (ls(-d) - jnp.log(e)),  # KL(σ(±βΔ) ‖ 1−ε, ε)
        "nca_pair": lambda: -ls(b * s_c) - 0.5 * ls(-b * s_c) - 0.5 * ls(-b * s_r),
        "robust": lambda: (-(1 - e) * ls(d) + e * ls(-d)) / (1 - 2 * e),  # unbiased under ε flipped labels
        "bco_pair": lambda: -ls(b * s_c) - ls(-b * s_r),
        "sppo_hard": lambda: (s_c - 0.5 / b) ** 2 + (s_r + 0.5 / b) ** 2,
        # AOT: the batch's sorted policy margins against its sorted reference margins (or ρ⁺ against ρ⁻)
        "aot": lambda: smoothed(b * (jnp.sort(q.chosen - q.rejected) - jnp.sort(q.ref_chosen - q.ref_rejected))),
        "aot_unpaired": lambda: smoothed(b * (jnp.sort(rho_c) - jnp.sort(rho_r))),
        "apo_zero": lambda: 1 - sig(b * rho_c) + sig(b * rho_r),  # chosen up, rejected down
        "apo_down": lambda: sig(b * rho_c) + 1 - sig(d),  # both down, rejected more
        "discopop": lambda: (1 - sig(d / cfg.discopop_tau)) * -ls(d) + sig(d / cfg.discopop_tau) * jnp.exp(-d),
        "sft": lambda: q.nll,  # the chosen answers' mean token NLL
        "sigmoid_norm": lambda: -ls(b * (s_c / n_c - s_r / n_r)),  # −log σ(β(s⁺/n⁺ − s⁻/n⁻))
        # reference-free: π_θ alone
        "cpo": lambda: smoothed(b * (q.chosen - q.rejected)) + cfg.cpo_alpha * q.nll,
        "simpo": lambda: smoothed(b * (q.chosen / n_c - q.rejected / n_r) - cfg.simpo_gamma) + cfg.cpo_alpha * q.nll,
        "orpo": lambda: q.nll - b * ls(log_odds(q)),  # NLL(prompt + chosen) − λ log σ(log odds ratio)
    }


def log_odds(q: Pairs):
    """ORPO's log odds ratio of the chosen over the rejected answer, on length-averaged log-probs ȳ±:
    log(p⁺/(1−p⁺)) − log(p⁻/(1−p⁻)) = (ȳ⁺ − ȳ⁻) − (log(1 − e^ȳ⁺) − log(1 − e^ȳ⁻))."""
    y_c, y_r = q.chosen / jnp.maximum(q.n_chosen, 1.0), q.rejected / jnp.maximum(q.n_rejected, 1.0)
    return (y_c - y_r) - (log1mexp(jnp.minimum(y_c, -1e-7)) - log1mexp(jnp.minimum(y_r, -1e-7)))


# ----------------------------------------------------------------------------- log-probs of both answers

def answer_stats(model, batch, orpo: bool = False, wpo: bool = False):
    """Per token of each row's answer [2b, C] (rows 2i and 2i + 1: pair i's chosen and rejected answer
    after its prompt, sample.completion_batch's layout): log π(token) in float32, and without gradients
    the mean logit over the vocabulary, whether the top logit is the token, and with `wpo` log Σ_v π(v)².
    A pair's prompt runs once for both answers (next_token_hidden, group 2); orpo scores the prompt's
    tokens too, so its rows run whole ([2b, T − 1]). The head runs a chunk of positions at a time."""
    tokens, C = batch["tokens"], batch["mask"].shape[-1]
    L = tokens.shape[1] - 1 if orpo else C
    x = model_lib.next_token_hidden(model, tokens, batch["positions"], batch["segment_ids"], L, 1 if orpo else 2,
                                    layers=model_lib.unrolled_if_small(model))  # [2b, L, D]

    def per_token(logits, target):  # [c, V], [c]
        lse, z = jax.nn.logsumexp(logits, axis=-1), jax.lax.stop_gradient(logits)
        logp = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0] - lse
        top1 = (jnp.argmax(z, axis=-1) == target).astype(jnp.float32)
        log_sum_sq = jax.nn.logsumexp(2 * z, axis=-1) - 2 * jax.lax.stop_gradient(lse) if wpo else jnp.zeros_like(lse)
        return logp, jnp.mean(z, axis=-1), top1, log_sum_sq
    return logprobs.per_position(per_token, x, model.head(model.cfg.param_dtype), tokens[:, -L:],
                                 cap=model.cfg.final_softcap)


def sequence_logps(logp, mask, ld_alpha: float | None):
    """Σ_t log π over each answer's tokens [2b]; LD-DPO (ld_alpha): tokens past the shorter answer of the
    pair count ld_alpha, so a long answer's extra tokens cannot carry the margin alone."""
    if ld_alpha is None:
        return jnp.sum(logp * mask, axis=-1)
    n = jnp.sum(mask, axis=-1)
    shared = jnp.repeat(jnp.minimum(n[0::2], n[1::2]), 2)[:, None]  # [2b, 1]
    return jnp.sum(logp * mask * jnp.where(jnp.cumsum(mask, axis=-1) <= shared, 1.0, ld_alpha), axis=-1)


def dpo_loss(model, batch, cfg: Config):
    """The loss of a micro-batch of pairs (the weighted losses' means over its pairs) and sums of what is
    logged (summarise turns them into TRL's metrics). batch: answer_stats' rows plus ref_logps [2b], π_ref's
    sums (zeros for the reference-free losses)."""
    orpo, mask = cfg.losses == ["orpo"], batch["mask"]
    C, pairs = mask.shape[-1], mask.shape[0] // 2
    stats = answer_stats(model, batch, orpo, cfg.use_weighting)
    logp, mean_logit, top1, log_sum_sq = (a[:, -C:] for a in stats)  # [2b, C]
    sums, n = sequence_logps(logp, mask, cfg.ld_alpha), jnp.sum(mask, axis=-1)
    chosen_logp, chosen_count = jnp.sum(logp[0::2] * mask[0::2]), jnp.sum(mask[0::2])
    nll, nll_count = -chosen_logp, chosen_count
    if orpo:  # the chosen rows' prompt tokens too (targets 1..P-1 whose predecessor is a real token)
        seg, P = batch["segment_ids"], batch["tokens"].shape[1] - C
        prompt_mask = ((seg[0::2, 1:P] > 0) & (seg[0::2, :P - 1] > 0)).astype(jnp.float32)
        nll, nll_count = nll - jnp.sum(stats[0][0::2, :P - 1] * prompt_mask), nll_count + jnp.sum(prompt_mask)
    ref = batch["ref_logps"]
    q = Pairs(sums[0::2], sums[1::2], ref[0::2], ref[1::2], n[0::2], n[1::2],
              jnp.full((pairs,), nll / jnp.maximum(nll_count, 1.0)))
    table, weight = pair_losses(q, cfg), 1.0
    if cfg.use_weighting:  # WPO: exp of the mean over the answer of log π(y_t) − log Σ_v π(v)², both answers
        w = jnp.exp(jax.lax.stop_gradient(jnp.sum((logp - log_sum_sq) * mask, axis=-1) / jnp.maximum(n, 1.0)))
        weight = w[0::2] * w[1::2]
    loss = sum(w_k * jnp.mean(table[name]() * weight) for name, w_k in zip(cfg.losses, cfg.weights))
    if cfg.reference_free:  # TRL logs β times the policy's own (length-averaged for simpo, orpo) log-probs
        scale = 1.0 if cfg.losses == ["cpo"] else 1.0 / jnp.maximum(n, 1.0)
        rewards = cfg.beta * sums * scale
    else:
        rewards = cfg.beta * (sums - ref)
    r_c, r_r = rewards[0::2], rewards[1::2]
    aux = {"pairs": jnp.float32(pairs), "rewards/chosen": jnp.sum(r_c), "rewards/rejected": jnp.sum(r_r),
           "rewards/accuracies": jnp.sum(r_c > r_r), "rewards/margins": jnp.sum(r_c - r_r),
           "logps/chosen": jnp.sum(sums[0::2]), "logps/rejected": jnp.sum(sums[1::2]),
           "logps/chosen_per_token": chosen_logp, "logps/rejected_per_token": jnp.sum(logp[1::2] * mask[1::2]),
           "logits/chosen": jnp.sum(mean_logit[0::2] * mask[0::2]),
           "logits/rejected": jnp.sum(mean_logit[1::2] * mask[1::2]),
           "mean_token_accuracy": jnp.sum(top1[0::2] * mask[0::2]),
           "chosen_tokens": chosen_count, "rejected_tokens": jnp.sum(mask[1::2]),
           "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)}
    if {"sft", "cpo", "simpo", "orpo"} & set(cfg.losses):
        aux["nll_loss"] = q.nll[0] * pairs
    if orpo:
        odds = log_odds(q)
        aux.update({"log_odds_ratio": jnp.sum(jax.nn.log_sigmoid(odds)), "log_odds_chosen": jnp.sum(odds)})
    return loss, aux


def summarise(aux, prefix: str = "") -> dict:
    """dpo_loss's sums (one micro-batch, or stacked [A]/[n]) → TRL's metrics: per-pair means, per-token means."""
    s = {k: float(np.sum(v)) for k, v in aux.items()}
    per_token = {"logits/chosen": "chosen_tokens", "mean_token_accuracy": "chosen_tokens",
                 "logps/chosen_per_token": "chosen_tokens", "logits/rejected": "rejected_tokens",
                 "logps/rejected_per_token": "rejected_tokens"}
    skip = ("pairs", "chosen_tokens", "rejected_tokens", "tokens", "nll_loss")
    out = {prefix + k: v / max(s[per_token.get(k, "pairs")], 1.0) for k, v in s.items() if k not in skip}
    if "nll_loss" in s:
        out[prefix + "nll_loss"] = s["nll_loss"] / max(s["pairs"], 1.0)
    return out


# ----------------------------------------------------------------------------- the train step

def make_train_step(graphdef, tx, cfg: Config):
    """step(params, opt_state, frozen, batch [grad_accum, 2b, ...]) → params, opt_state, metrics, aux [A]:
    the micro-batches' mean losses averaged (each pair of the step counts the same)."""
    def loss_fn(params, frozen, micro_batch, key):
        loss, aux = dpo_loss(nnx.merge(graphdef, params, frozen), micro_batch, cfg)
        return loss / cfg.grad_accum, aux
    update = run.make_update(loss_fn, tx, normalise=False)
    return lambda params, opt_state, frozen, batch: update(params, opt_state, frozen, batch, None)


def reference_logps(graphdef, cfg: Config):
    """jit: π_ref's answer log-prob sums [A, 2b] of a batch of micro-batches, one micro-batch at a time."""
    def one(ref_params, frozen, micro_batch):
        logp = answer_stats(nnx.merge(graphdef, ref_params, frozen), micro_batch)[0]
        return sequence_logps(logp, micro_batch["mask"], cfg.ld_alpha)
    return jax.jit(lambda ref_params, frozen, batch: jax.lax.map(lambda mb: one(ref_params, frozen, mb), batch))


# ----------------------------------------------------------------------------- pairs in, batches out

def fit(pairs, max_len: int):
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


def pair_batch(pairs, ref_logps, pad_id: int, grad_accum: int, mesh) -> dict:
    """Pairs (and π_ref's sums [n, 2], or None) → this host's rows as micro-batches [A, 2b, ...] on the mesh
    (mesh None: one micro-batch, unsharded, for evaluation's ragged last batch), in completion_batch's layout:
    rows 2i and 2i + 1 are pair i's chosen and rejected answer after its prompt (left-padded to P, answers
    right-padded to C)."""
    prompts = [prompt for prompt, _, _ in pairs for _ in range(2)]
    batch = sample.completion_batch(prompts, [a for _, c, r in pairs for a in (c, r)], pad_id, 1 << 30)
    batch["ref_logps"] = np.zeros(2 * len(pairs), np.float32) if ref_logps is None else \
        np.asarray(ref_logps, np.float32).reshape(-1)
    return shard.micro_batches(batch, mesh, grad_accum)


def precomputed_reference(ref_fn, params, frozen, splits: dict, cfg: Config, pad_id: int) -> dict:
    """π_ref's sums [n, 2] for every pair of each split, from one pass of the starting policy (params at
    step 0), kept in --ref-cache under a hash of the weights, the tokenized pairs and what shapes the
    numbers (dtype, ld_alpha): a rerun, a resumed run or a LoRA sweep over the same base reads them back."""
    def compute():
        out = {}
        for split, pairs in splits.items():
            sums = [np.asarray(ref_fn(params, frozen, pair_batch(pairs[i:i + cfg.batch_size], None, pad_id, 1, None)))
                    for i in range(0, len(pairs), cfg.batch_size)]
            out[split] = np.concatenate(sums, axis=1).reshape(-1, 2) if sums else np.zeros((0, 2), np.float32)
        return out
    weights = [np.asarray(x) for x in jax.tree.leaves((params, frozen))]
    tokens = [np.array([len(ids) for pair in pairs for ids in pair] + [t for p in pairs for ids in p for t in ids])
              for pairs in splits.values()]
    key = ["dpo reference log-probs v1", cfg.dtype, cfg.ld_alpha, *splits, *weights, *tokens]
    return run.cached_arrays(cfg.ref_cache, key, compute, "reference log-probs")


# ----------------------------------------------------------------------------- eval and warm-up

def evaluate(eval_step, ref_fn, params, frozen, ref_params, evals, eval_ref, eval_rows, tok, pad_id, cfg,
             policy) -> dict:
    """eval/<metric> on held-out pairs (micro-batches of the training size) and, on the built-in task,
    eval/accuracy: greedy completions equal to the answer."""
    record, b, totals, loss = {}, cfg.batch_size // cfg.grad_accum, [], 0.0
    for i in range(0, len(evals), b):
        ref = None if eval_ref is None else eval_ref[i:i + b]
        batch = pair_batch(evals[i:i + b], ref, pad_id, 1, None)
        if ref_params is not None:
            batch["ref_logps"] = ref_fn(ref_params, frozen, batch)
        batch_loss, aux = eval_step(params, frozen, batch)
        totals.append(jax.device_get(aux))
        loss += float(batch_loss[0]) * len(evals[i:i + b])
    if totals:
        record = {"eval/loss": loss / len(evals), **summarise(jax.tree.map(lambda *a: np.stack(a), *totals), "eval/")}
    return {**record, **run.evaluate_completions(policy(), eval_rows, tok, None)}


def warm_up(model, cfg: Config, loaded, train, mesh, warm: pathlib.Path):
    """sft.warm_up on the chosen answers, stopped once greedy accuracy on --eval-examples training prompts
    reaches --warmup-sft-target: a random policy prefers nothing, and a policy caught mid-learning still
    has unsure answers for DPO to sort out. Saved to `warm` (π_ref, reloaded on --resume)."""
    print(f"warm-up: supervised steps until greedy accuracy on training prompts reaches {cfg.warmup_sft_target} "
          f"(at most {cfg.warmup_sft_steps})", file=sys.stderr)
    tok, some = loaded.tokenizer, train[:cfg.eval_examples]
    rows = [{"prompt": tok.decode(p), "completion": tok.decode(c)} for p, c, _ in some]
    return sft.warm_up(model, [(p + c, [0] * len(p) + [1] * len(c)) for p, c, _ in train], mesh,
                       steps=cfg.warmup_sft_steps, lr=cfg.warmup_sft_lr, batch_size=cfg.warmup_sft_batch_size,
                       max_len=cfg.max_len, clip=cfg.clip, weight_decay=cfg.weight_decay, seed=cfg.seed,
                       pad_id=tok.pad_id, target=cfg.warmup_sft_target, save_to=warm, loaded=loaded,
                       accuracy=lambda m: run.evaluate_completions(m, rows, tok, None)["eval/accuracy"])


# ----------------------------------------------------------------------------- main

def prepare(cfg: Config):
    """The model, tokenizer and pairs of a run: pairs read and cut to --max-len (drops printed), the warm-up
    run (or, on --resume, reloaded), LoRA adapters added. → loaded, model (sharded), train, evals, eval_rows,
    the step-0 record, mesh, manager."""
    with run.user_errors():
        loaded = run.load(cfg)
        train, evals, eval_rows = data.preference_data(loaded.tokenizer, loaded.family, cfg.data, cfg.eval_data,
                                                       cfg.task, cfg.train_examples, cfg.eval_examples, cfg.seed)
        (train, dropped), (evals, eval_dropped) = fit(train, cfg.max_len), fit(evals[:cfg.eval_examples], cfg.max_len)
        if not train:
            raise data.DataError(f"no training pairs left after --max-len {cfg.max_len}: {dropped}")
        manager, mesh = run.checkpoints(cfg), shard.make_mesh(cfg.mesh)
        warm = pathlib.Path(cfg.out) / "warmup_sft"  # the warm-up's result: π_ref, reloaded on --resume
        reuse_warmup = cfg.warmup_sft_steps > 0 and cfg.resume and (warm / "config.json").is_file()
        model = ckpt.load_hf(warm, dtype=cfg.dtype, param_dtype="float32", remat=cfg.remat) if reuse_warmup \
            else loaded.model
    print(f"pairs: {len(train)} training, {len(evals)} held-out; dropped {dropped} (held-out: {eval_dropped})",
          file=sys.stderr)
    model, first_record = shard.shard_model(model, mesh), {f"data/dropped_{k}": v for k, v in dropped.items()}
    if cfg.warmup_sft_steps and not reuse_warmup:
        model, warmed = warm_up(model, cfg, loaded, train, mesh, warm)
        first_record.update(warmed)
    if cfg.lora:  # adapters on the (warmed-up) base, B = 0: the model starts unchanged; then QLoRA's base
        adapters.add_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        if cfg.quant:
            adapters.quantize_model(model, cfg.quant)
        model = shard.shard_model(model, mesh)
    return loaded, model, train, evals, eval_rows, first_record, mesh, manager


def main(argv=None):
    cfg = run.parse_flags(Config, argv)
    out, start = pathlib.Path(cfg.out), time.perf_counter()
    loaded, model, train, evals, eval_rows, first_record, mesh, manager = prepare(cfg)
    tok = loaded.tokenizer
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_ids[0]
    # π_θ: the trained parameters (all, or the adapters) | the frozen rest of the model
    graphdef, params, frozen = nnx.split(model, adapters.LoRA if cfg.lora else nnx.Param, ...)
    tx, schedule = run.adamw(cfg, cfg.steps)
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, mesh)
    train_step = jax.jit(make_train_step(graphdef, tx, cfg), donate_argnums=(0, 1),
                         out_shardings=(param_sh, opt_sh, None, None))
    eval_step = jax.jit(lambda p, f, batch: jax.lax.map(lambda mb: dpo_loss(nnx.merge(graphdef, p, f), mb, cfg), batch))
    ref_fn = reference_logps(graphdef, cfg)
    # π_ref: none (simpo/cpo/orpo); precomputed sums; or live: a copy of the starting weights (LoRA: the base,
    # the adapters zeroed, no second copy of the weights), moved toward π_θ by TR-DPO
    live = not cfg.reference_free and not cfg.precompute_ref_log_probs
    ref_params = jax.jit(lambda p: jax.tree.map(jnp.zeros_like if cfg.lora else jnp.copy, p),
                         out_shardings=param_sh)(params) if live else None
    table = {"train": None, "eval": None}
    if cfg.precompute_ref_log_probs and not cfg.reference_free:
        with run.user_errors():
            table = precomputed_reference(ref_fn, params, frozen, {"train": train, "eval": evals}, cfg, pad_id)
    state, shardings = {"params": params, "opt_state": opt_state}, {"params": param_sh, "opt_state": opt_sh}
    if cfg.sync_ref_model:  # TR-DPO's reference moves, so it is part of the train state
        state["ref_params"], shardings["ref_params"] = ref_params, param_sh
    step, state, position = run.resume(cfg, manager, state, shardings)
    params, opt_state, ref_params = state["params"], state["opt_state"], state.get("ref_params", ref_params)
    mix = jax.jit(lambda p, r: jax.tree.map(lambda a, b: cfg.ref_model_mixup_alpha * a + (1 - cfg.ref_model_mixup_alpha)
                                            * b, p, r), donate_argnums=1, out_shardings=param_sh)
    run.announce(loaded, params, mesh, f"{len(train)} pairs, {cfg.batch_size} per step, loss {cfg.loss_type}", cfg)
    policy = lambda: nnx.merge(graphdef, params, frozen)  # noqa: E731 (π_θ at the current params)
    evaluate_now = lambda: evaluate(eval_step, ref_fn, params, frozen, ref_params, evals, table["eval"],  # noqa: E731
                                    eval_rows, tok, pad_id, cfg, policy)
    pair_tokens = lambda idx: sum(2 * len(train[i][0]) + len(train[i][1] + train[i][2]) for i in idx)  # noqa: E731
    tokens_seen = pair_tokens(data.stream(len(train), cfg.seed, 0, position))  # num_tokens: TRL's running total

    with run.MetricsLog(out, cfg) as log:
        if step == 0:
            record = evaluate_now()
            log.write({"step": 0, **first_record, **record})
            if "eval/accuracy" in record:
                print(f"eval/accuracy at DPO step 0: {record['eval/accuracy']:.3f}", file=sys.stderr)
        progress = run.Progress(cfg, step, manager)
        while step < cfg.steps:
            picked = data.stream(len(train), cfg.seed, position, cfg.batch_size)
            position, tokens_seen = position + cfg.batch_size, tokens_seen + pair_tokens(picked)
            batch = pair_batch([train[i] for i in picked], None if table["train"] is None else table["train"][picked],
                               pad_id, cfg.grad_accum, mesh)
            if live:
                batch["ref_logps"] = ref_fn(ref_params, frozen, batch)
            params, opt_state, metrics, aux = train_step(params, opt_state, frozen, batch)
            step += 1
            if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
                ref_params = mix(params, ref_params)
            if progress.due(step, cfg.log_every):
                record = {**progress.record(step, metrics, schedule(step - 1)), **summarise(jax.device_get(aux)),
                          "num_tokens": tokens_seen}
                if progress.due(step, cfg.eval_every):
                    record.update(evaluate_now())
                progress.write(log, record, loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                               eval=record.get("eval/accuracy", ""))
            if progress.save_due(step, metrics):
                run.save(cfg, manager, step, {"params": params, "opt_state": opt_state,
                                              **({"ref_params": ref_params} if cfg.sync_ref_model else {})}, position)
            progress.bar.update(1)
            if progress.stopping(step):
                break
        progress.close(step)

    if shard.is_main_process():
        run.export_policy(policy(), out, loaded, cfg.lora, time.perf_counter() - start)


if __name__ == "__main__":
    main()
