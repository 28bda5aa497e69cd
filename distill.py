"""distill.py — knowledge distillation: a student learns the teacher's next-token distributions.

At every completion token the student's distribution p_S is pulled toward the teacher's p_T by a
divergence D, both softmax(logits / τ) (--temperature), in float32 whatever the models' dtype:

    L(θ) = Σ_t m_t [ kd_ratio · D(p_T, p_S) + (1 − kd_ratio) · (−log p_S(x_t)) ]  /  Σ_t m_t

m: the completion tokens of the whole accumulated batch (the NLL at temperature 1, as is usual); a MoE
student adds c · its router's aux loss (c = --router-aux-loss-coef, moe.load_balancing_loss).
--loss picks D, one line each in DIVERGENCES below: jsd, GKD's generalized Jensen-Shannon divergence
(Agarwal et al. 2024, arXiv 2306.13649) as TRL computes it; symmetric_kl; tv; DistiLLM's skew KLs (Ko
et al. 2024); sampled_reverse_kl, the on-policy estimator from the sampled token alone.

Where the peers differ this file follows TRL: --temperature scales the loss's logits (GKDTrainer samples
with it: here --sampling-temperature); no τ² unless --tau-squared (Hinton's, Tunix's LogitStrategy).
torchtune's SymmetricKLLoss(sym_kd_ratio=r) is symmetric_kl with β = 1 − r and kd_ratio 0.5 by default
(here 1.0, as TRL); Tunix averages over every position, padding included (here completion tokens).

Intermediate layers (Tunix's strategies, per completion token): --hidden-layers S:T pulls the student's
residual stream after S blocks to the teacher's after T (MSE through a learned projection, or 1 − cos);
--attention-layers S:T pulls layer S's head-averaged attention map to layer T's (layer_terms).

Data, off- and on-policy (GKD): each step, with probability --lmbda the student samples the completions
and the teacher scores them; else, with --seq-kd, the teacher generates them; else the dataset's are
used. The teacher runs without gradients, may be kept in bf16 (--teacher-dtype), and with --teacher-topk
K is replaced by its top-K log-probs of the data, made once and cached. Teacher and student may differ in
size and family when their tokenizers agree. Both heads run a chunk of positions at a time, each chunk's
logits made once and the student's gradient taken there: no [B, T, V] float32 pair, nothing recomputed.

With no arguments: the built-in task ("123*4=" → "0492"). The teacher, tiny-qwen3 (0.43M parameters), is
trained on it first (saved to <out>/teacher; or runs/sft/hf when `python sft.py` has run); the student,
tiny-qwen3-small (0.11M), learns from scratch by distillation alone in about three minutes on 2 CPU
cores (tests/test_distill.py holds how far eval/kl falls and eval/accuracy rises):

    python distill.py
    python distill.py --teacher path/to/qwen3-1.7b --ckpt path/to/qwen3-0.6b --data train.jsonl --lr 1e-5 --lmbda 0.5
    python distill.py --teacher DIR --teacher-dtype bfloat16 --ckpt DIR --data train.jsonl --lora --loss jsd --beta 0

Outputs in --out: metrics.jsonl (loss, token_terms' and layer_terms' names; eval/kl, the same under eval/,
eval/accuracy, eval/teacher_accuracy), checkpoints/ (--resume), hf/ (--lora: adapter/).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

import adapters
import ckpt
import data
import engine
import flags
import logprobs
import model as model_lib
import moe
import run
import shard
import tasks
import tokenizer


@dataclasses.dataclass
class Config(flags.RunConfig):
    # -- student, teacher and data --
    model: str = "tiny-qwen3-small"  # the student: preset or family alias (ignored when --ckpt is given)
    ckpt: str | None = None  # the student's Hugging Face checkpoint directory
    teacher: str = ""  # the teacher's checkpoint directory or preset ("": one trained on the built-in task)
    teacher_dtype: str = "float32"  # the teacher's weights and compute: float32 or bfloat16
    data: str | None = None  # JSONL in sft.py's formats; None: the built-in arithmetic task
    eval_data: str | None = None  # JSONL of {"prompt","completion"} for eval; None: held-out task problems
    task: str = "*,3,1"  # built-in task: operator, digits of a, digits of b
    train_examples: int = 50_000  # built-in task: size of the training set
    eval_examples: int = 256  # held-out examples for eval/kl and eval/accuracy
    max_len: int = 512  # longest sequence; longer examples are truncated
    # -- the divergence (TRL's names) --
    loss: str = "jsd"  # D, one of DIVERGENCES: jsd, symmetric_kl, tv, skew_*_kl, sampled_reverse_kl
    beta: float = 0.5  # jsd: 0 is forward KL(teacher ‖ student), 1 reverse KL; symmetric_kl: reverse's weight
    skew_alpha: float = 0.1  # DistiLLM's skew α
    temperature: float = 1.0  # softmax temperature of both models in the loss
    tau_squared: bool = False  # multiply the divergence by temperature² (Hinton)
    kd_ratio: float = 1.0  # loss = kd_ratio · divergence + (1 − kd_ratio) · NLL of the data's tokens
    teacher_topk: int = 0  # K > 0: the teacher's top-K log-probs of the data, made once and cached; no teacher after
    teacher_cache: str = "~/.cache/nanotune/teacher_topk"  # directory of --teacher-topk caches
    # -- on-policy data (GKD) --
    lmbda: float = 0.0  # fraction of steps whose completions the student samples
    seq_kd: bool = False  # the other steps: the teacher generates the completions (else the dataset's)
    sampling_temperature: float = 0.9  # temperature of the sampled completions (GKD's default)
    top_p: float = 1.0  # nucleus sampling of the sampled completions
    max_new_tokens: int = 128  # longest sampled completion
    rollout_slots: int = 0  # S > 0: sample in S slots refilled as completions end (engine.py); 0: one static batch
    # -- optimisation --
    steps: int = 1000  # optimizer steps
    batch_size: int = 128  # sequences per optimizer step (all micro-batches together)
    grad_accum: int = 1  # micro-batches per step (less memory, the same step: L divides by the whole step's Σ m)
    lr: float | None = None  # peak learning rate
    warmup: float = 0.03  # fraction of steps of linear warmup, then cosine decay to 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    dtype: str = ""  # the student's compute dtype: float32 or bfloat16, params stay float32 ("": bfloat16 with --tpu)
    # -- logging and checkpoints --
    eval_every: int = 200  # steps between evaluations (and at the start and end)
    save_every: int = 250  # steps between train-state checkpoints
    seed: int = 0  # data order, sampling and initialisation
    # -- the demo's teacher (no --teacher: tiny-qwen3 trained on the built-in task first) --
    teacher_steps: int = 1500  # most supervised steps for the demo's teacher
    teacher_target: float = 0.95  # they stop once its greedy accuracy on training prompts reaches this
    # -- LoRA (the student) --
    lora: bool = False  # train LoRA adapters on the student only
    lora_rank: int = 8  # LoRA r
    lora_alpha: float = 16.0  # LoRA scale numerator (alpha / r)
    # -- intermediate layers (Tunix's feature and attention strategies) --
    hidden_layers: str = ""  # "S:T,...": the student's residual stream after S blocks pulled to the teacher's after T
    hidden_loss: str = "mse"  # mse (through a learned [D_s, D_t] projection when widths differ) | cosine (wider pooled)
    hidden_weight: float = 1.0  # weight of the hidden-state loss (summed over the pairs, per completion token)
    attention_layers: str = ""  # "S:T,...": student layer S's head-averaged attention map pulled to teacher layer T's
    attention_weight: float = 1.0  # weight of the attention maps' KL(teacher ‖ student) (summed over pairs and rows)
    AUTO: ClassVar[dict] = {"lr": (3e-3, 2e-5)}  # the fields left None: (a random tiny student, pretrained; TRL's)
    RESUMABLE: ClassVar[frozenset] = flags.RunConfig.RESUMABLE | {"teacher_cache"}  # where the cache lives

    def __post_init__(self):
        flags.fill_defaults(self)  # the fields left None: AUTO's value for this start
        tasks.builtin_task(self.task)  # a bad --task fails here, before anything loads
        flags.check(flags.positive(self, "max_new_tokens") + [
            (self.loss in DIVERGENCES, f"--loss must be one of {', '.join(DIVERGENCES)}, got {self.loss!r}"),
            (0 <= self.beta <= 1 and 0 < self.skew_alpha < 1, "need 0 <= --beta <= 1 and 0 < --skew-alpha < 1"),
            (self.temperature > 0 and self.sampling_temperature > 0 and 0 < self.top_p <= 1,
             "need --temperature > 0, --sampling-temperature > 0 and 0 < --top-p <= 1"),
            (0 <= self.kd_ratio <= 1 and 0 <= self.lmbda <= 1 and self.rollout_slots >= 0,
             "need 0 <= --kd-ratio <= 1, 0 <= --lmbda <= 1 and --rollout-slots >= 0"),
            (not self.teacher_topk or (self.teacher_topk > 0 and not self.lmbda and not self.seq_kd and
                                       self.loss != "sampled_reverse_kl"),
             "--teacher-topk K > 0 scores the dataset's completions: not with --lmbda, --seq-kd or sampled_reverse_kl"),
            (self.teacher_dtype in ("float32", "bfloat16"), "--teacher-dtype must be float32 or bfloat16"),
            (self.hidden_loss in ("mse", "cosine") and self.hidden_weight >= 0 and self.attention_weight >= 0,
             "--hidden-loss must be mse or cosine; --hidden-weight and --attention-weight >= 0"),
            (not self.teacher_topk or not (self.hidden_layers or self.attention_layers),
             "--hidden-layers and --attention-layers need the teacher itself: not with --teacher-topk")])
        for flag in ("hidden-layers", "attention-layers"):
            flags.int_pairs(getattr(self, flag.replace("-", "_")), flag, "student:teacher layer")


# ----------------------------------------------------------------------------- the divergences

def kl(log_p, log_q):
    """KL(p ‖ q) = Σ_v p (log p − log q) per position, from log-probs [c, V]."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def kl_of_logits(p, lse_p, q, lse_q):
    """KL(softmax(p) ‖ softmax(q)) per position from logits [c, V] and their rows' logsumexps [c]: one pass over
    the vocabulary, no log-probs made (log p − log q = p − q − lse_p + lse_q, and Σ_v softmax(p) = 1)."""
    return jnp.sum(jnp.exp(p - lse_p[:, None]) * (p - q), axis=-1) - lse_p + lse_q


@jax.custom_vjp
def forward_kl(s_logits, t_logits):
    """KL(p_T ‖ p_S) per position [c] from the student's and the teacher's logits [c, V] (log-probs do as well),
    differentiated on the student's side only, its gradient p_S − p_T written out: the forward pass keeps no
    [c, V] array for it and the backward pass makes the gradient in one pass. Autodiff of kl(log_softmax(t),
    log_softmax(s)) kept both log-probs and p_T: bench_distill.py's mid step went from 1.62 s to 1.41 s (CPU)."""
    return _forward_kl_fwd(s_logits, t_logits)[0]


def _forward_kl_fwd(s_logits, t_logits):
    lse_s, lse_t = (jax.nn.logsumexp(z, axis=-1) for z in (s_logits, t_logits))  # [c]
    return kl_of_logits(t_logits, lse_t, s_logits, lse_s), (s_logits, t_logits, lse_s, lse_t)


def _forward_kl_bwd(residuals, g):  # g [c] → (d s_logits [c, V], none for the teacher's)
    # The barrier keeps XLA from sharing exp(s − lse_s) and exp(t − lse_t) with the forward pass's sums: kept
    # [c, V] arrays cost more than two more exponentials in this one fused pass (60 ms of the same mid step).
    s_logits, t_logits, lse_s, lse_t = jax.lax.optimization_barrier(residuals)
    return g[:, None] * (jnp.exp(s_logits - lse_s[:, None]) - jnp.exp(t_logits - lse_t[:, None])), None


forward_kl.defvjp(_forward_kl_fwd, _forward_kl_bwd)


def mixture(log_p, w: float, log_q):
    """log(w·p + (1 − w)·q), in log space (TRL's GKD mixture)."""
    return jax.nn.logsumexp(jnp.stack([log_p + jnp.log(w), log_q + jnp.log1p(-w)]), axis=0)


def picked(log_p, target):
    """log p(y) [c] of the token y that came next."""
    return jnp.take_along_axis(log_p, target[:, None], axis=-1)[:, 0]


# D per position [c] from the student's and the teacher's log-probs [c, V] (s, t), y [c] the token that came next
DIVERGENCES = {
    # GKD: β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M), M = β p_T + (1 − β) p_S; the endpoints exact
    "jsd": lambda s, t, y, c: kl(t, s) if c.beta == 0 else kl(s, t) if c.beta == 1 else (
        c.beta * kl(t, mixture(t, c.beta, s)) + (1 - c.beta) * kl(s, mixture(t, c.beta, s))),
    "symmetric_kl": lambda s, t, y, c: (1 - c.beta) * kl(t, s) + c.beta * kl(s, t),
    "tv": lambda s, t, y, c: 0.5 * jnp.sum(jnp.abs(jnp.exp(t) - jnp.exp(s)), axis=-1),  # ½ Σ_v |p_T − p_S|
    "skew_forward_kl": lambda s, t, y, c: kl(t, mixture(t, c.skew_alpha, s)),  # KL(p_T ‖ α p_T + (1 − α) p_S)
    "skew_reverse_kl": lambda s, t, y, c: kl(s, mixture(s, c.skew_alpha, t)),  # KL(p_S ‖ α p_S + (1 − α) p_T)
    # a policy-gradient estimate of reverse KL from the sampled token alone: −sg(log p_T(y) − log p_S(y))·log p_S(y)
    "sampled_reverse_kl": lambda s, t, y, c: -jax.lax.stop_gradient(picked(t, y) - picked(s, y)) * picked(s, y),
}


def token_terms(s, t, s1, t1, target, cfg: Config) -> dict:
    """Per position [c], what the loss and the log are made of, from the student's and the teacher's logits
    at the loss's temperature (s, t) and at 1 (s1, t1) ([c, V]; log-probs do as well), by the name each is
    logged under. The exact forward KL (the default) is forward_kl of the logits; the other divergences take
    log-probs. The teacher's side is never differentiated here (forward_kl gives it no gradient)."""
    forward = cfg.loss == "jsd" and cfg.beta == 0  # KL(p_T ‖ p_S)
    kd = forward_kl(s, t) if forward else DIVERGENCES[cfg.loss](
        jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1), target, cfg)
    lse_s, lse_t = (jax.nn.logsumexp(z, axis=-1) for z in (s1, t1))  # [c]
    s1_fixed, lse_s_fixed = jax.lax.stop_gradient(s1), jax.lax.stop_gradient(lse_s)
    same = forward and s is s1 and t is t1  # at τ = 1 kd is the logged forward KL: one pass less
    kl_forward = jax.lax.stop_gradient(kd) if same else kl_of_logits(t1, lse_t, s1_fixed, lse_s_fixed)
    return {"kd_loss": kd * (cfg.temperature ** 2 if cfg.tau_squared else 1.0),
            "nll_loss": lse_s - picked(s1, target), "teacher_nll": lse_t - picked(t1, target),
            "kl/forward": kl_forward, "kl/reverse": kl_of_logits(s1_fixed, lse_s_fixed, t1, lse_t)}


def top1_agreement(s_logits, t_logits):
    """[c]: 1 where the student's likeliest token is the teacher's (with ties, where any token is the likeliest of
    both), from logits [c, V]: an equality with the row's max, which log_softmax takes anyway (an argmax is one
    more pass: two of them were 7% of bench_distill.py's mid step on CPU)."""
    top = lambda z: z == jnp.max(z, axis=-1, keepdims=True)  # noqa: E731
    return jnp.any(top(jax.lax.stop_gradient(s_logits)) & top(t_logits), axis=-1).astype(jnp.float32)


def student_teacher_terms(student, teacher, batch, mask, coefficients: dict, cfg: Config, projections=None):
    """Σ mask · token_terms [B, T − 1] by name, the loss Σ coefficients[name] · those, the layers' losses, the
    student's router aux loss (a MoE student's, moe.load_balancing_loss; else 0): the teacher without gradients,
    both heads a chunk of positions at a time (the teacher's logits inside the student's chunk, cut to the
    common vocabulary), each made once, the gradient taken there (summed_terms)."""
    tokens, T = batch["tokens"], batch["tokens"].shape[1]
    taps = tuple(name for name, pairs in (("hidden", cfg.hidden_layers), ("attention", cfg.attention_layers)) if pairs)
    x, taps_s = model_lib.next_token_hidden(student, tokens, batch["positions"], batch["segment_ids"], T - 1,
                                            taps=(*taps, "router"))
    router = moe.load_balancing_loss(taps_s.pop("router"), batch["segment_ids"][:, :-1] > 0, student.cfg)
    if teacher is None:  # --teacher-topk: the teacher's top-K log-probs from the cache, in K + 1 buckets
        return (*topk_terms(student, x, batch, mask, coefficients, cfg), {}, router)
    x_t = jax.lax.stop_gradient(model_lib.next_token_hidden(teacher, tokens, batch["positions"], batch["segment_ids"],
                                                            T - 1, taps=taps))
    x_t, taps_t = x_t if taps else (x_t, None)
    head_t, cap_t = jax.lax.stop_gradient(teacher.head(teacher.cfg.param_dtype)), teacher.cfg.final_softcap
    V = min(student.cfg.vocab_size, teacher.cfg.vocab_size)

    def per_token(logits, target, x_t):  # [c, V_s], [c], [c, D_t]
        t_logits = logprobs.softcap(jnp.einsum("RD,VD->RV", x_t, head_t.astype(x_t.dtype),
                                               preferred_element_type=jnp.float32), cap_t)[:, :V]
        s_logits = logits[:, :V]
        s, t = (s_logits, t_logits) if cfg.temperature == 1 else (z / cfg.temperature for z in (s_logits, t_logits))
        return {**token_terms(s, t, s_logits, t_logits, target, cfg),
                "top1_agreement": top1_agreement(s_logits, t_logits)}
    loss, sums = logprobs.summed_terms(per_token, x, student.head(student.cfg.param_dtype), mask, coefficients,
                                       tokens[:, 1:], x_t, cap=student.cfg.final_softcap)
    return loss, sums, layer_terms(taps_s, taps_t, projections, cfg), router


def topk_terms(student, x, batch, mask, coefficients: dict, cfg: Config):
    """(loss, sums) against the cached teacher: batch["topk_ids"], ["topk_logps"] [B, T − 1, K], its K likeliest
    tokens, their log-probs at --temperature. Both distributions become K + 1 buckets (the tail as one more: K = V
    is the full divergence); the KLs are logged over those, the teacher's NLL where the token is one of K."""
    def bucketed(top_logps):  # log-probs of K tokens [c, K] → K + 1 buckets: the K, and the rest as one (floored)
        rest = jnp.log(jnp.maximum(1.0 - jnp.sum(jnp.exp(top_logps), axis=-1), 1e-12))
        return jnp.concatenate([top_logps, rest[:, None]], axis=-1)

    def per_token(logits, target, ids, top_logps):  # [c, V], [c], [c, K], [c, K]
        log_s = jax.nn.log_softmax(logits[:, :student.cfg.vocab_size] / cfg.temperature, axis=-1)
        s_buckets, t_buckets = bucketed(jnp.take_along_axis(log_s, ids, axis=-1)), bucketed(top_logps)
        terms = token_terms(s_buckets, t_buckets, s_buckets, t_buckets, target, cfg)
        hit = ids == target[:, None]
        return {**terms, "nll_loss": -picked(jax.nn.log_softmax(logits, axis=-1), target),
                "teacher_nll": -jnp.where(jnp.any(hit, -1), jnp.sum(top_logps * hit, -1), t_buckets[:, -1]),
                "top1_agreement": (picked(logits, ids[:, 0]) == jnp.max(logits, axis=-1)).astype(jnp.float32)}
    return logprobs.summed_terms(per_token, x, student.head(student.cfg.param_dtype), mask, coefficients,
                                 batch["tokens"][:, 1:], batch["topk_ids"], batch["topk_logps"],
                                 cap=student.cfg.final_softcap)


def layer_terms(taps_s, taps_t, projections: dict, cfg: Config) -> dict:
    """The intermediate layers' losses per position [B, T − 1], summed over the pairs: hidden_loss, the mean
    squared error (the student projected when widths differ) or 1 − cos (the wider average-pooled; Tunix pools
    the teacher); attention_loss, KL(teacher's map ‖ student's) of each query's row (Tunix's attention
    strategies match the attention block's output instead)."""
    out = {}
    for s, t in flags.int_pairs(cfg.hidden_layers, "hidden-layers"):
        h_s, h_t = taps_s["hidden"][s].astype(jnp.float32), taps_t["hidden"][t].astype(jnp.float32)  # [B, T-1, D_*]
        if cfg.hidden_loss == "mse":
            h_s = h_s @ projections[f"s{s}_t{t}"] if h_s.shape[-1] != h_t.shape[-1] else h_s  # [B, T-1, D_t]
            term = jnp.mean(jnp.square(h_s - h_t), axis=-1)
        else:
            width = min(h_s.shape[-1], h_t.shape[-1])
            h_s, h_t = pooled(h_s, width), pooled(h_t, width)
            term = 1 - jnp.sum(h_s * h_t, -1) / jnp.maximum(jnp.linalg.norm(h_s, axis=-1) *
                                                            jnp.linalg.norm(h_t, axis=-1), 1e-8)
        out["hidden_loss"] = out.get("hidden_loss", 0.0) + term
    for s, t in flags.int_pairs(cfg.attention_layers, "attention-layers"):
        a_s, a_t = taps_s["attention"][s], taps_t["attention"][t]  # [B, T-1, T-1], rows sum to 1
        log = lambda a: jnp.log(jnp.maximum(a, 1e-30))  # noqa: E731 (masked keys have probability 0 in both)
        out["attention_loss"] = out.get("attention_loss", 0.0) + jnp.sum(a_t * (log(a_t) - log(a_s)), axis=-1)
    return out


def pooled(h, width: int):
    """h [..., D] average-pooled to [..., width] as Tunix's avg_pool_array_to_target_shape (VALID padding):
    windows of D − (width − 1)·stride features every stride = D // width."""
    D = h.shape[-1]
    if D == width:
        return h
    stride = D // width
    window, starts = D - (width - 1) * stride, jnp.arange(width) * stride
    total = jnp.cumsum(jnp.pad(h, [(0, 0)] * (h.ndim - 1) + [(1, 0)]), axis=-1)  # [..., D + 1]
    return (total[..., starts + window] - total[..., starts]) / window


def make_projections(cfg: Config, student_cfg, teacher_cfg) -> dict:
    """Checks the layer pairs against both models; → the learned projections [D_s, D_t] of --hidden-loss mse
    when the widths differ (LeCun normal; trained with the student, saved with it)."""
    key, out = jax.random.key(cfg.seed + 2), {}
    for flag, pairs, fewer in (("hidden-layers", cfg.hidden_layers, 0), ("attention-layers", cfg.attention_layers, 1)):
        for s, t in flags.int_pairs(pairs, flag):  # L + 1 residual streams (0..L), L attention maps (0..L − 1)
            if not (0 <= s <= student_cfg.n_layers - fewer and 0 <= t <= teacher_cfg.n_layers - fewer):
                flags.fail(f"--{flag} {s}:{t}: the student has layers 0..{student_cfg.n_layers - fewer} and the "
                           f"teacher 0..{teacher_cfg.n_layers - fewer} here")
            if flag == "hidden-layers" and cfg.hidden_loss == "mse" and student_cfg.dim != teacher_cfg.dim:
                out[f"s{s}_t{t}"] = student_cfg.dim ** -0.5 * jax.random.normal(
                    jax.random.fold_in(key, len(out)), (student_cfg.dim, teacher_cfg.dim), jnp.float32)
    return out


def distill_loss(student, teacher, batch, cfg: Config, projections=None):
    """Σ over completion tokens of kd_ratio · divergence + (1 − kd_ratio) · NLL (+ the weighted intermediate
    layers' losses), and {name: the sum of what is logged}, with "tokens", their count."""
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)  # [B, T − 1]
    coefficients = {"kd_loss": cfg.kd_ratio, "nll_loss": 1 - cfg.kd_ratio}  # Σ m·(kd_ratio·D + ...)
    token_loss, sums, layers, router = student_teacher_terms(student, teacher, batch, mask, coefficients, cfg,
                                                             projections)
    sums = {**sums, **{name: jnp.sum(term * mask) for name, term in layers.items()}}
    aux_loss_coef = moe.aux_loss_coef(cfg.router_aux_loss_coef, student.cfg)  # a MoE student's c (None: dense)
    if aux_loss_coef is not None:  # weighted by the batch's tokens, as the step divides the sums by all of them
        sums["aux_loss"] = router * jnp.sum(mask)
    loss = token_loss + cfg.hidden_weight * sums.get("hidden_loss", 0.0) + \
        cfg.attention_weight * sums.get("attention_loss", 0.0) + (aux_loss_coef or 0.0) * sums.get("aux_loss", 0.0)
    return loss, {**sums, "tokens": jnp.sum(mask)}


# ----------------------------------------------------------------------------- the train step

class Frozen(NamedTuple):
    """What the step reads and never trains."""
    student: object  # the student's frozen state (all but the trained parameters: nnx.split's rest)
    teacher: object  # the teacher's whole state; None with --teacher-topk (the batch holds its numbers)


def make_loss_fn(graphdef, teacher_graphdef, cfg: Config):
    """loss_fn(params, frozen: Frozen, micro_batch, key) → distill_loss: params are {"student": its trained
    part, "projections": those of the hidden-state loss, when there are any}."""
    def loss_fn(params, frozen, micro_batch, key):
        student = nnx.merge(graphdef, params["student"], frozen.student)
        teacher = None if frozen.teacher is None else nnx.merge(teacher_graphdef, frozen.teacher)
        return distill_loss(student, teacher, micro_batch, cfg, params.get("projections"))
    return loss_fn


def make_train_step(graphdef, teacher_graphdef, tx, cfg: Config):
    """step(params, opt_state, frozen: Frozen, batch [grad_accum, b, T], key) → params, opt_state, metrics,
    aux sums [M]: only params are differentiated and updated."""
    sums = make_loss_fn(graphdef, teacher_graphdef, cfg)

    def loss_fn(params, frozen, micro_batch, key):
        loss, aux = sums(params, frozen, micro_batch, key)
        return loss / micro_batch["targets"], aux  # L: / Σ m over the whole step
    update = run.make_update(loss_fn, tx)  # sums the micro-batches' losses and gradients

    def train_step(params, opt_state, frozen, batch, key):
        targets = jnp.maximum(jnp.sum(batch["loss_mask"][:, :, 1:]), 1.0)  # Σ m of every micro-batch
        batch = {**batch, "targets": jnp.full(batch["tokens"].shape[:1], targets)}  # one per micro-batch
        return update(params, opt_state, frozen, batch, key)
    return train_step


# ----------------------------------------------------------------------------- data, off- and on-policy

def step_examples(examples, picked_ids, student, teacher, tok, cfg: Config, step: int):
    """The step's examples, as GKD draws them: with probability lmbda the student's samples for the picked
    prompts, else (seq_kd) the teacher's, else the dataset's; seeded by (seed, step); a sample ends at a stop
    id (data.stop_ids). → examples, the sampled completions' lengths (None when off-policy)."""
    draw = np.random.default_rng([cfg.seed, step, 1])
    on_policy = draw.random() < cfg.lmbda
    if not on_policy and not cfg.seq_kd:
        return [examples[i] for i in picked_ids], None
    prompts = [data.prompt_of(examples[i]) for i in picked_ids]
    room = max(1, min(cfg.max_new_tokens, cfg.max_len - max(map(len, prompts))))  # rows stay within max_len
    outs = engine.generate(student if on_policy else teacher, prompts, slots=cfg.rollout_slots, max_new_tokens=room,
                           temperature=cfg.sampling_temperature, top_p=cfg.top_p, seed=int(draw.integers(2**31)),
                           eos_ids=data.stop_ids(tok, student.cfg))
    return [((p + o)[:cfg.max_len], ([0] * len(p) + [1] * len(o))[:cfg.max_len]) for p, o in zip(prompts, outs)], \
        [len(o) for o in outs]


def device_batch(examples, cfg: Config, pad_id: int, mesh, micro_batches: int, topk=None):
    """Examples → data.collate's arrays (+ topk: each example's cached teacher ids and log-probs [n_i, K] at its
    target positions), this host's rows as [micro_batches, b, T] on the mesh (mesh None: unsharded)."""
    batch = data.collate([[ex] for ex in examples], data.bucket_length(max(len(ids) for ids, _ in examples),
                                                                       cfg.max_len), pad_id)
    if topk is not None:
        B, T = batch["tokens"].shape
        K = cfg.teacher_topk
        batch["topk_ids"], batch["topk_logps"] = np.zeros((B, T - 1, K), np.int32), np.zeros((B, T - 1, K), np.float32)
        for r, (ids, logps) in enumerate(topk):
            where = np.flatnonzero(batch["loss_mask"][r, 1:])
            batch["topk_ids"][r, where], batch["topk_logps"][r, where] = ids, logps
    return shard.micro_batches(batch, mesh, micro_batches)


# ----------------------------------------------------------------------------- the teacher

def load_teacher(cfg: Config, loaded, mesh, train_rows):
    """The frozen teacher: --teacher (a directory or a preset), else runs/sft/hf when there, else tiny-qwen3
    trained on the task's examples now (saved to <out>/teacher, reused on --resume). Its vocabulary must
    be the student's, up to padding rows past both tokenizers' ids."""
    path, saved = cfg.teacher, pathlib.Path(cfg.out) / "teacher"
    if not path:
        path = next((str(p) for p in (saved, pathlib.Path("runs/sft/hf")) if (p / "config.json").is_file()), "")
    with flags.user_errors():
        directory = pathlib.Path(path) if path and pathlib.Path(path).is_dir() else None
        teacher, _, directory = ckpt.load_model(path or "tiny-qwen3", ckpt=directory, dtype=cfg.teacher_dtype,
                                                param_dtype=cfg.teacher_dtype, seed=cfg.seed + 1)
        tok_t = tokenizer.load_tokenizer(directory)
    teacher = shard.shard_model(teacher, mesh)
    print(f"teacher: {path}" if path else f"teacher: tiny-qwen3, trained on the built-in task first (until greedy "
          f"accuracy on training prompts reaches {cfg.teacher_target}, at most {cfg.teacher_steps} steps)",
          file=sys.stderr)
    if not path:
        rows = data.as_rows(train_rows[:256], loaded.tokenizer)
        plan = run.Supervised(cfg.teacher_steps, 3e-3, 128, cfg.max_len, cfg.teacher_target, cfg.seed + 1)
        teacher, _ = run.train_supervised(teacher, train_rows, plan, lambda m: run.evaluate_completions(
            m, rows, loaded.tokenizer, None)["eval/accuracy"], mesh, saved, loaded)
    with flags.user_errors():
        tokenizer.check_same_tokenizer(loaded.tokenizer, loaded.model.cfg.vocab_size, tok_t, teacher.cfg.vocab_size)
    return teacher


def teacher_topk(teacher, splits: dict, cfg: Config, pad_id: int, V: int) -> dict:
    """The teacher's top-K log-probs (at --temperature, over the first V tokens) of every target token of
    each split's examples (run.top_logps), made once and kept in --teacher-cache under a hash of the
    teacher's weights, the examples' tokens and K, τ, V."""
    key = ["distill teacher top-k v1", cfg.teacher_topk, cfg.temperature, V, *splits,
           *[np.asarray(x) for x in jax.tree.leaves(shard.gather(nnx.state(teacher)))],
           *[np.array([len(ids) for ids, _ in ex] + [t for ids, m in ex for t in ids + m]) for ex in splits.values()]]
    return run.cached_arrays(cfg.teacher_cache, key, lambda: run.top_logps(
        teacher, splits, cfg.teacher_topk, cfg.temperature, V, pad_id), f"teacher top-{cfg.teacher_topk}")


def cached_rows(cache: dict, split: str, indices) -> list:
    """The cached (ids, log-probs) of examples `indices` of a split."""
    o = cache[f"{split}/offsets"]
    return [(cache[f"{split}/ids"][o[i]:o[i + 1]], cache[f"{split}/logps"][o[i]:o[i + 1]]) for i in indices]


# ----------------------------------------------------------------------------- eval and main

class Start(NamedTuple):
    """What a distillation run starts from (prepare), and what eval/* is measured on."""
    loaded: run.Loaded  # the student as loaded (with its LoRA adapters, B = 0), and the tokenizer
    train: list  # tokenized training examples (ids, loss_mask), cut to --max-len
    evals: list[dict]  # held-out {"prompt", "completion"} rows
    eval_examples: list  # the same, tokenized and cut
    teacher: object
    teacher_accuracy: dict  # eval/teacher_accuracy, made once
    cache: dict | None  # --teacher-topk: the teacher's cached top-K of both splits
    mesh: object
    manager: object  # the orbax checkpoint manager of <out>/checkpoints


def evaluate(s: Start, loss_sums, graphdef, params, frozen: Frozen, cfg: Config) -> dict:
    """eval/kl (forward KL per completion token: at temperature 1; over the K + 1 buckets at --temperature
    with --teacher-topk) and the logged terms on held-out examples (loss_sums: jit (params, frozen, batch)
    → distill_loss's sums), eval/accuracy of the student's greedy completions and the teacher's."""
    totals, n = None, len(s.eval_examples)
    for i in range(0, n, 64):
        topk = None if s.cache is None else cached_rows(s.cache, "eval", range(i, min(i + 64, n)))
        batch = device_batch(s.eval_examples[i:i + 64], cfg, data.pad_id(s.loaded.tokenizer), None, 1, topk)
        sums = jax.device_get(loss_sums(params, frozen, batch))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    record = {} if totals is None else {f"eval/{k}": float(v) / max(float(totals["tokens"]), 1.0)
                                        for k, v in {**totals, "kl": totals["kl/forward"]}.items() if k != "tokens"}
    student = nnx.merge(graphdef, params["student"], frozen.student)
    return {**record, **run.evaluate_completions(student, s.evals, s.loaded.tokenizer, None), **s.teacher_accuracy}


def prepare(cfg: Config) -> Start:
    """The student (LoRA adapters added), the data (rows cut to --max-len), the teacher and its accuracy, its
    top-K cache, the mesh, the manager."""
    with flags.user_errors():
        loaded = run.load(cfg)
        train, evals = data.completion_data(loaded.tokenizer, loaded.family, cfg.data, cfg.eval_data, cfg.task,
                                            cfg.train_examples, cfg.eval_examples, cfg.seed)
        manager, mesh = run.checkpoints(cfg, loaded.model), shard.make_mesh(cfg.mesh)
    cut = lambda examples: [(ids[:cfg.max_len], mask[:cfg.max_len]) for ids, mask in examples]  # noqa: E731
    train, eval_examples = cut(train), cut(data.tokenize(row, loaded.tokenizer, loaded.family) for row in evals)
    teacher = load_teacher(cfg, loaded, mesh, train)
    teacher_accuracy = {k.replace("accuracy", "teacher_accuracy"): v
                        for k, v in run.evaluate_completions(teacher, evals, loaded.tokenizer, None).items()}
    cache = teacher_topk(teacher, {"train": train, "eval": eval_examples}, cfg, data.pad_id(loaded.tokenizer),
                         min(teacher.cfg.vocab_size, loaded.model.cfg.vocab_size)) if cfg.teacher_topk else None
    if cfg.lora:
        adapters.add_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    return Start(loaded, train, evals, eval_examples, teacher, teacher_accuracy, cache, mesh, manager)


def main(argv=None):
    cfg = flags.parse(Config, argv)
    start_time, s = time.perf_counter(), prepare(cfg)
    tok, student, train = s.loaded.tokenizer, s.loaded.model, s.train
    graphdef, params, student_frozen = nnx.split(shard.shard_model(student, s.mesh),
                                                 adapters.LoRA if cfg.lora else nnx.Param, ...)  # trained | the rest
    projections = make_projections(cfg, student.cfg, s.teacher.cfg)
    params = {"student": params, **({"projections": shard.shard_tree(projections, s.mesh)} if projections else {})}
    teacher_graphdef, teacher_state = nnx.split(s.teacher)
    frozen = Frozen(student_frozen, None if s.cache is not None else teacher_state)  # cached: no teacher in the step
    tx, schedule = run.adamw(cfg, cfg.steps)
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, s.mesh)
    train_step = jax.jit(make_train_step(graphdef, teacher_graphdef, tx, cfg), donate_argnums=(0, 1),
                         out_shardings=(param_sh, opt_sh, None, None))
    loss_sums = jax.jit(lambda p, f, b: make_loss_fn(graphdef, teacher_graphdef, cfg)(
        p, f, jax.tree.map(lambda x: x[0], b), None)[1])
    step, state, position = run.resume(cfg, s.manager, {"params": params, "opt_state": opt_state},
                                       {"params": param_sh, "opt_state": opt_sh})
    params, opt_state = state["params"], state["opt_state"]
    run.announce(s.loaded, params, s.mesh, f"{len(train)} training examples, loss {cfg.loss}", cfg)

    with run.MetricsLog(cfg.out, cfg) as log:
        if step == 0:
            log.write({"step": 0, **evaluate(s, loss_sums, graphdef, params, frozen, cfg)})
        progress, lengths = run.Progress(cfg, step, s.manager), []
        while step < cfg.steps:
            picked_ids = data.stream(len(train), cfg.seed, position, cfg.batch_size)
            position += cfg.batch_size
            examples, sampled = step_examples(train, picked_ids, nnx.merge(graphdef, params["student"], student_frozen),
                                              s.teacher, tok, cfg, step)
            lengths += sampled or []
            batch = device_batch(examples, cfg, data.pad_id(tok), s.mesh, cfg.grad_accum,
                                 None if s.cache is None else cached_rows(s.cache, "train", picked_ids))
            params, opt_state, metrics, aux = train_step(params, opt_state, frozen, batch, None)
            step += 1
            if progress.due(step, cfg.log_every):
                tokens = max(float(np.sum(aux["tokens"])), 1.0)  # the logged terms: means per completion token
                record = {**progress.record(step, metrics, schedule(step - 1)),
                          **{k: float(np.sum(v)) / tokens for k, v in aux.items()
                             if k != "tokens" and (k != "nll_loss" or cfg.kd_ratio < 1)},
                          **({"completions/mean_length": float(np.mean(lengths))} if lengths else {})}
                if progress.due(step, cfg.eval_every):
                    record.update(evaluate(s, loss_sums, graphdef, params, frozen, cfg))
                progress.write(log, record, loss=f"{record['loss']:.4f}", acc=record.get("eval/accuracy", ""))
                lengths = []
            # PLUMBING (keep): the checkpoint (and the NaN stop before it), the bar, SIGTERM's early end
            if progress.save_due(step, metrics):
                run.save(cfg, s.manager, step, {"params": params, "opt_state": opt_state}, position)
            progress.bar.update(1)
            if progress.stopping(step):
                break
        progress.close(step)
    projections = projections and shard.gather(params["projections"])  # the hidden-state projections, trained
    if projections and shard.is_main_process():
        safetensors.numpy.save_file({k: np.asarray(v) for k, v in projections.items()},
                                    str(pathlib.Path(cfg.out) / "projections.safetensors"))
    run.export_policy(nnx.merge(graphdef, params["student"], student_frozen), cfg.out, s.loaded, cfg.lora,
                      time.perf_counter() - start_time)


if __name__ == "__main__":
    main()
