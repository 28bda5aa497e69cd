"""distill.py — knowledge distillation: a student learns the teacher's next-token distributions.

At every completion token the student's distribution p_S is pulled toward the teacher's p_T by a
divergence D, both softmax(logits / τ) (--temperature), in float32 whatever the models' dtype:

    L(θ) = Σ_t m_t [ kd_ratio · D(p_T, p_S) + (1 − kd_ratio) · (−log p_S(x_t)) ]  /  Σ_t m_t

(m: completion tokens of the whole accumulated batch, as sft.py normalises). --loss picks D (table in
`divergences`): jsd, GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024, arXiv 2306.13649)
as TRL computes it, M = β p_T + (1 − β) p_S in log space, β = 0 / 1 exactly KL(p_T ‖ p_S) / KL(p_S ‖ p_T);
symmetric_kl, (1 − β)·forward + β·reverse; tv, total variation; DistiLLM's skew KLs (Ko et al. 2024),
KL(p_T ‖ α p_T + (1 − α) p_S) and KL(p_S ‖ α p_S + (1 − α) p_T), α = --skew-alpha; sampled_reverse_kl,
the on-policy estimator that needs only the teacher's log-prob of each sampled token y,
−sg(log p_T(y) − log p_S(y)) · log p_S(y). Where the peers differ this file follows TRL: --temperature
scales the loss's logits (TRL's DistillationTrainer; its GKDTrainer samples with it: here
--sampling-temperature), no τ² unless --tau-squared (Hinton's; Tunix's LogitStrategy has it).
torchtune's SymmetricKLLoss(sym_kd_ratio=r) is symmetric_kl with β = 1 − r and its kd_ratio defaults to
0.5 (here 1.0, as TRL); Tunix averages over every position, padding included (here completion tokens).

Intermediate layers (Tunix's feature and attention strategies, per completion token, added with their
weights): --hidden-layers S:T,... pulls the student's residual stream after S blocks to the teacher's
after T, by MSE through a learned projection when widths differ (trained with the student, saved to
<out>/projections.safetensors) or, --hidden-loss cosine, 1 − cos with the wider average-pooled;
--attention-layers S:T,... pulls layer S's head-averaged attention map to layer T's, KL per query row.

Data, off- and on-policy (GKD): each step, with probability --lmbda the student samples the batch's
completions (sample.py) and the teacher scores them; else, with --seq-kd, the teacher generates them;
else the dataset's are used. The teacher runs without gradients, is never in the optimizer state and
may be kept in bf16 (--teacher-dtype); with --teacher-topk K its top-K log-probs of the data are made
once, cached on disk (--teacher-cache, under a hash of its weights and the tokens) and training runs
with no teacher in memory: both distributions become the K ids plus one bucket for the rest (K = V is
the full divergence). Teacher and student may differ in size and family when their tokenizers agree
(vocabularies padded past the tokenizer are cut to the common size). Both heads run a chunk of
positions at a time (logprobs.per_position): never a [B, T, V] float32 pair.

With no arguments: the built-in task ("123*4=" → "0492"). The teacher, tiny-qwen3 (0.43M parameters),
is trained on it first (supervised, saved to <out>/teacher; or runs/sft/hf when `python sft.py` has
run); the student, tiny-qwen3-small (0.11M), learns from scratch by distillation alone: held-out
forward KL (eval/kl) 6.3 → 0.23 and greedy accuracy 0 → 0.84 against the teacher's 0.95, in about
three minutes on 2 CPU cores:

    python distill.py
    python distill.py --teacher path/to/qwen3-1.7b --ckpt path/to/qwen3-0.6b --data train.jsonl --lr 1e-5 --lmbda 0.5
    python distill.py --teacher DIR --teacher-dtype bfloat16 --ckpt DIR --data train.jsonl --lora --loss jsd --beta 0

Data: sft.py's JSONL formats ({"prompt", "completion"}, {"messages"}, {"text"}). Outputs in --out:
metrics.jsonl (loss, kd_loss, nll_loss, kl/forward, kl/reverse, top1_agreement, teacher_nll,
hidden_loss, attention_loss, completions/mean_length; eval/kl and the same under eval/,
eval/accuracy, eval/teacher_accuracy), checkpoints/ (--resume), hf/ (--lora: also adapter/).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
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

DIVERGENCES = ("jsd", "symmetric_kl", "tv", "skew_forward_kl", "skew_reverse_kl", "sampled_reverse_kl")


@dataclasses.dataclass
class Config(run.RunConfig):
    # student, teacher and data
    model: str = "tiny-qwen3-small"  # the student: preset or family alias (ignored when --ckpt is given)
    ckpt: str | None = None  # the student's Hugging Face checkpoint directory
    teacher: str = ""  # the teacher's checkpoint directory or preset (default: trained on the built-in task)
    teacher_dtype: str = "float32"  # the teacher's weights and compute: float32 or bfloat16
    data: str | None = None  # JSONL in sft.py's formats; default: the built-in arithmetic task
    eval_data: str | None = None  # JSONL of {"prompt","completion"} for eval; default: held-out task problems
    task: str = "*,3,1"  # built-in task: operator, digits of a, digits of b
    train_examples: int = 50_000  # built-in task: size of the training set
    eval_examples: int = 256  # held-out examples for eval/kl and eval/accuracy
    max_len: int = 512  # longest sequence; longer examples are truncated
    # the divergence (TRL's names)
    loss: str = "jsd"  # jsd | symmetric_kl | tv | skew_forward_kl | skew_reverse_kl | sampled_reverse_kl
    beta: float = 0.5  # jsd: 0 is forward KL(teacher ‖ student), 1 reverse KL; symmetric_kl: reverse's weight
    skew_alpha: float = 0.1  # DistiLLM's skew α
    temperature: float = 1.0  # softmax temperature of both models in the loss
    tau_squared: bool = False  # multiply the divergence by temperature² (Hinton)
    kd_ratio: float = 1.0  # loss = kd_ratio · divergence + (1 − kd_ratio) · NLL of the data's tokens
    teacher_topk: int = 0  # K > 0: the teacher's top-K log-probs of the data, made once and cached; no teacher after
    teacher_cache: str = "~/.cache/nanotune/teacher_topk"  # directory of --teacher-topk caches
    # on-policy data (GKD)
    lmbda: float = 0.0  # fraction of steps whose completions the student samples
    seq_kd: bool = False  # the other steps: the teacher generates the completions (else the dataset's)
    sampling_temperature: float = 0.9  # temperature of the sampled completions (GKD's default)
    top_p: float = 1.0  # nucleus sampling of the sampled completions
    max_new_tokens: int = 128  # longest sampled completion
    # optimisation
    steps: int = 1000  # optimizer steps
    batch_size: int = 128  # sequences per optimizer step (all micro-batches together)
    grad_accum: int = 1  # micro-batches per step; the loss normalised by the step's completion tokens
    lr: float | None = None  # peak learning rate (3e-3 for a random tiny student; 2e-5 pretrained)
    warmup: float = 0.03  # fraction of steps of linear warmup, then cosine decay to 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    dtype: str = ""  # the student's compute dtype: float32 or bfloat16, params stay float32 ("": bfloat16 with --tpu)
    # logging and checkpoints
    eval_every: int = 200  # steps between evaluations (and at the start and end)
    save_every: int = 250  # steps between train-state checkpoints
    out: str = "runs/distill"  # output directory
    seed: int = 0  # data order, sampling and initialisation
    # the demo's teacher (no --teacher: tiny-qwen3 trained on the built-in task first)
    teacher_steps: int = 1500  # most supervised steps for the demo's teacher
    teacher_target: float = 0.95  # they stop once its greedy accuracy on training prompts reaches this
    # LoRA (the student)
    lora: bool = False  # train LoRA adapters on the student only
    lora_rank: int = 8  # LoRA r
    lora_alpha: float = 16.0  # LoRA scale numerator (alpha / r)
    # The defaults of the fields left None: (a random tiny student, a pretrained one); pretrained: TRL's GKDConfig
    # learning_rate 2e-5 (SFTConfig's).
    AUTO: ClassVar[dict] = {"lr": (3e-3, 2e-5)}
    # intermediate layers (Tunix's feature and attention strategies)
    hidden_layers: str = ""  # "S:T,...": the student's residual stream after S blocks pulled to the teacher's after T
    hidden_loss: str = "mse"  # mse (through a learned [D_s, D_t] projection when widths differ) | cosine (wider pooled)
    hidden_weight: float = 1.0  # weight of the hidden-state loss (summed over the pairs, per completion token)
    attention_layers: str = ""  # "S:T,...": student layer S's head-averaged attention map pulled to teacher layer T's
    attention_weight: float = 1.0  # weight of the attention maps' KL(teacher ‖ student) (summed over pairs and rows)

    def __post_init__(self):
        run.fill_defaults(self)  # the fields left None: AUTO's value for this start
        tasks.builtin_task(self.task)  # a bad --task fails here, before anything loads
        run.check(run.positive(self, "steps", "batch_size", "grad_accum", "max_len", "eval_every", "save_every", "keep",
                               "log_every", "train_examples", "eval_examples", "max_new_tokens", "lora_rank") + [
            (self.loss in DIVERGENCES, f"--loss must be one of {', '.join(DIVERGENCES)}, got {self.loss!r}"),
            (0 <= self.beta <= 1 and 0 < self.skew_alpha < 1, "need 0 <= --beta <= 1 and 0 < --skew-alpha < 1"),
            (self.temperature > 0 and self.sampling_temperature > 0 and 0 < self.top_p <= 1,
             "need --temperature > 0, --sampling-temperature > 0 and 0 < --top-p <= 1"),
            (0 <= self.kd_ratio <= 1 and 0 <= self.lmbda <= 1, "need 0 <= --kd-ratio <= 1 and 0 <= --lmbda <= 1"),
            (self.batch_size % self.grad_accum == 0,
             f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}"),
            (not self.teacher_topk or (self.teacher_topk > 0 and not self.lmbda and not self.seq_kd and
                                       self.loss != "sampled_reverse_kl"),
             "--teacher-topk K > 0 scores the dataset's completions: not with --lmbda, --seq-kd or sampled_reverse_kl"),
            (self.lr > 0 and 0 <= self.warmup < 1 and self.clip > 0 and self.weight_decay >= 0,
             "need --lr > 0, 0 <= --warmup < 1, --clip > 0, --weight-decay >= 0"),
            (self.dtype in ("float32", "bfloat16") and self.teacher_dtype in ("float32", "bfloat16"),
             "--dtype and --teacher-dtype must be float32 or bfloat16"),
            (self.hidden_loss in ("mse", "cosine") and self.hidden_weight >= 0 and self.attention_weight >= 0,
             "--hidden-loss must be mse or cosine; --hidden-weight and --attention-weight >= 0"),
            (not self.teacher_topk or not (self.hidden_layers or self.attention_layers),
             "--hidden-layers and --attention-layers need the teacher itself: not with --teacher-topk")])
        layer_pairs(self.hidden_layers, "hidden-layers"), layer_pairs(self.attention_layers, "attention-layers")


def layer_pairs(text: str, flag: str) -> list[tuple[int, int]]:
    """"2:4,4:8" → [(2, 4), (4, 8)]: (student layer, teacher layer) pairs."""
    try:
        return [(int(s), int(t)) for s, t in (pair.split(":") for pair in text.split(","))] if text.strip() else []
    except ValueError:
        raise ValueError(f"--{flag} takes student:teacher layer pairs like 2:4,4:8, got {text!r}") from None


# ----------------------------------------------------------------------------- the divergences

def kl(log_p, log_q):
    """KL(p ‖ q) = Σ_v p (log p − log q) per position, from log-probs [c, V]."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def mixture(log_p, w: float, log_q):
    """log(w·p + (1 − w)·q), in log space (TRL's GKD mixture)."""
    return jax.nn.logsumexp(jnp.stack([log_p + jnp.log(w), log_q + jnp.log1p(-w)]), axis=0)


def divergences(log_s, log_t, target, cfg: Config) -> dict:
    """Each divergence per position [c] of the student's and teacher's log-probs [c, V] (as functions:
    only the chosen one runs). target [c]: the token that came next (sampled, on-policy)."""
    b, a = cfg.beta, cfg.skew_alpha
    picked = lambda lp: jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0]  # noqa: E731
    return {
        # GKD: β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M), M = β p_T + (1 − β) p_S; the endpoints exact
        "jsd": lambda: kl(log_t, log_s) if b == 0 else kl(log_s, log_t) if b == 1 else (
            b * kl(log_t, mixture(log_t, b, log_s)) + (1 - b) * kl(log_s, mixture(log_t, b, log_s))),
        "symmetric_kl": lambda: (1 - b) * kl(log_t, log_s) + b * kl(log_s, log_t),
        "tv": lambda: 0.5 * jnp.sum(jnp.abs(jnp.exp(log_t) - jnp.exp(log_s)), axis=-1),
        "skew_forward_kl": lambda: kl(log_t, mixture(log_t, a, log_s)),  # KL(p_T ‖ α p_T + (1 − α) p_S)
        "skew_reverse_kl": lambda: kl(log_s, mixture(log_s, a, log_t)),  # KL(p_S ‖ α p_S + (1 − α) p_T)
        # a policy-gradient estimate of reverse KL from the sampled token alone
        "sampled_reverse_kl": lambda: -jax.lax.stop_gradient(picked(log_t) - picked(log_s)) * picked(log_s),
    }


def bucketed(top):
    """Log-probs of K tokens [c, K] → K + 1 buckets: the K, and all the others as one (its mass floored)."""
    rest = jnp.log(jnp.maximum(1.0 - jnp.sum(jnp.exp(top), axis=-1), 1e-12))
    return jnp.concatenate([top, rest[:, None]], axis=-1)


def token_terms(student, teacher, batch, cfg: Config, layers=None, projections=None):
    """Per target position [B, T − 1]: the divergence, the student's and the teacher's NLL of the token,
    forward and reverse KL at temperature 1, and whether the two argmaxes agree; and {name: [B, T − 1]} of
    the intermediate layers' losses. The teacher's hidden states are made without gradients; both heads
    run a chunk of positions at a time, the teacher's logits inside the student's chunk, cut to the
    vocabularies' common size."""
    tokens, T = batch["tokens"], batch["tokens"].shape[1]
    taps = tuple(name for name, pairs in (("hidden", cfg.hidden_layers), ("attention", cfg.attention_layers)) if pairs)
    x = model_lib.next_token_hidden(student, tokens, batch["positions"], batch["segment_ids"], T - 1, layers=layers,
                                    taps=taps)
    if teacher is None:  # --teacher-topk: the teacher's top-K log-probs from the cache, in K + 1 buckets
        return topk_terms(student, x, batch, cfg), {}
    x_t = jax.lax.stop_gradient(model_lib.next_token_hidden(teacher, tokens, batch["positions"], batch["segment_ids"],
                                                            T - 1, layers=model_lib.unrolled_if_small(teacher),
                                                            taps=taps))
    (x, taps_s), (x_t, taps_t) = (x, x_t) if taps else ((x, None), (x_t, None))
    head_t, cap_t = jax.lax.stop_gradient(teacher.head(teacher.cfg.param_dtype)), teacher.cfg.final_softcap
    V = min(student.cfg.vocab_size, teacher.cfg.vocab_size)

    def per_token(logits, target, x_t):  # [c, V_s], [c], [c, D_t]
        t_logits = logprobs.softcap(jnp.einsum("RD,VD->RV", x_t, head_t.astype(x_t.dtype),
                                               preferred_element_type=jnp.float32), cap_t)[:, :V]
        s_logits = logits[:, :V]
        log_s, log_t = (jax.nn.log_softmax(z / cfg.temperature, axis=-1) for z in (s_logits, t_logits))
        kd = divergences(log_s, log_t, target, cfg)[cfg.loss]() * (cfg.temperature ** 2 if cfg.tau_squared else 1.0)
        s1, t1 = jax.nn.log_softmax(s_logits, axis=-1), jax.nn.log_softmax(t_logits, axis=-1)
        nll = -jnp.take_along_axis(s1, target[:, None], axis=-1)[:, 0]
        s1 = jax.lax.stop_gradient(s1)
        return (kd, nll, -jnp.take_along_axis(t1, target[:, None], axis=-1)[:, 0], kl(t1, s1), kl(s1, t1),
                (jnp.argmax(s1, axis=-1) == jnp.argmax(t1, axis=-1)).astype(jnp.float32))
    return logprobs.per_position(per_token, x, student.head(student.cfg.param_dtype), tokens[:, 1:], x_t,
                                 cap=student.cfg.final_softcap), layer_terms(taps_s, taps_t, projections, cfg)


def layer_terms(taps_s, taps_t, projections: dict, cfg: Config) -> dict:
    """The intermediate layers' losses per position [B, T − 1], each summed over its pairs (Tunix's feature
    strategies, per token): hidden_loss, the squared error per unit of the teacher's state and the student's
    (projected when widths differ), or with cosine 1 − cos between the two with the wider one average-pooled
    to the narrower width (Tunix pools the teacher); attention_loss, KL(teacher's map ‖ student's) of each
    query's row (Tunix's attention strategies match the attention block's output instead)."""
    out = {}
    for s, t in layer_pairs(cfg.hidden_layers, "hidden-layers"):
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
    for s, t in layer_pairs(cfg.attention_layers, "attention-layers"):
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
    for flag, pairs, top in (("hidden-layers", cfg.hidden_layers, 0), ("attention-layers", cfg.attention_layers, 1)):
        for s, t in layer_pairs(pairs, flag):
            if not (0 <= s <= student_cfg.n_layers - top and 0 <= t <= teacher_cfg.n_layers - top):
                run.fail(f"--{flag} {s}:{t}: the student has layers 0..{student_cfg.n_layers - top} and the teacher "
                         f"0..{teacher_cfg.n_layers - top} here")
            if flag == "hidden-layers" and cfg.hidden_loss == "mse" and student_cfg.dim != teacher_cfg.dim:
                out[f"s{s}_t{t}"] = student_cfg.dim ** -0.5 * jax.random.normal(
                    jax.random.fold_in(key, len(out)), (student_cfg.dim, teacher_cfg.dim), jnp.float32)
    return out


def topk_terms(student, x, batch, cfg: Config):
    """token_terms against cached teacher numbers: batch["topk_ids"], ["topk_logps"] [B, T − 1, K], the
    teacher's K most likely tokens and their log-probs at --temperature. Both distributions become K + 1
    buckets (sparse KL with the tail as one more bucket: with K = V, the full divergence); the KLs are
    logged over those buckets, the teacher's NLL where the token is one of the K."""
    tau2 = cfg.temperature ** 2 if cfg.tau_squared else 1.0

    def per_token(logits, target, ids, top):  # [c, V], [c], [c, K], [c, K]
        log_s = jax.nn.log_softmax(logits[:, :student.cfg.vocab_size] / cfg.temperature, axis=-1)
        s_b, t_b = bucketed(jnp.take_along_axis(log_s, ids, axis=-1)), bucketed(top)
        kd = divergences(s_b, t_b, target, cfg)[cfg.loss]() * tau2
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[:, None], axis=-1)[:, 0]
        s_b, hit = jax.lax.stop_gradient(s_b), ids == target[:, None]
        return (kd, nll, -jnp.where(jnp.any(hit, -1), jnp.sum(top * hit, -1), t_b[:, -1]), kl(t_b, s_b), kl(s_b, t_b),
                (jnp.argmax(logits, axis=-1) == ids[:, 0]).astype(jnp.float32))
    return logprobs.per_position(per_token, x, student.head(student.cfg.param_dtype), batch["tokens"][:, 1:],
                                 batch["topk_ids"], batch["topk_logps"], cap=student.cfg.final_softcap)


METRICS = ("kd_loss", "nll_loss", "teacher_nll", "kl/forward", "kl/reverse", "top1_agreement")


def distill_loss(student, teacher, batch, cfg: Config, layers=None, projections=None):
    """Σ over completion tokens of kd_ratio · divergence + (1 − kd_ratio) · NLL (+ the weighted intermediate
    layers' losses; make_update divides by the step's token count), and the sums of what is logged, with
    "tokens", their count."""
    terms, layer = token_terms(student, teacher, batch, cfg, layers, projections)
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    sums = {name: jnp.sum(term * mask) for name, term in (*zip(METRICS, terms), *layer.items())}
    loss = cfg.kd_ratio * sums["kd_loss"] + (1 - cfg.kd_ratio) * sums["nll_loss"] + \
        cfg.hidden_weight * sums.get("hidden_loss", 0.0) + cfg.attention_weight * sums.get("attention_loss", 0.0)
    return loss, {**sums, "tokens": jnp.sum(mask)}


# ----------------------------------------------------------------------------- the train step

def make_train_step(graphdef, teacher_graphdef, tx, cfg: Config, loss_only: bool = False):
    """step(params, opt_state, (frozen, teacher_state), batch [grad_accum, b, T], key) → params, opt_state,
    metrics, aux sums [A]: only params ({"student": its trained part, "projections": those of the hidden-state
    loss, when there are any}) are differentiated and updated. The teacher's
    state is None with --teacher-topk (the batch holds its numbers). loss_only: the loss function itself."""
    def loss_fn(params, frozen, micro_batch, key):
        student = nnx.merge(graphdef, params["student"], frozen[0])
        teacher = None if frozen[1] is None else nnx.merge(teacher_graphdef, frozen[1])
        return distill_loss(student, teacher, micro_batch, cfg, model_lib.unrolled_if_small(student),
                            params.get("projections"))
    return loss_fn if loss_only else run.make_update(loss_fn, tx)


# ----------------------------------------------------------------------------- data, off- and on-policy

def step_examples(examples, picked, student, teacher, tok, cfg: Config, step: int, eos_ids):
    """The step's examples, as GKD draws them: with probability lmbda the student's samples for the
    picked prompts, else (seq_kd) the teacher's, else the dataset's; seeded by (seed, step). → examples,
    the sampled completions' lengths (None when off-policy)."""
    draw = np.random.default_rng([cfg.seed, step, 1])
    on_policy = draw.random() < cfg.lmbda
    if not on_policy and not cfg.seq_kd:
        return [examples[i] for i in picked], None
    prompts = [data.prompt_of(examples[i]) for i in picked]
    room = max(1, min(cfg.max_new_tokens, cfg.max_len - max(map(len, prompts))))  # rows stay within max_len
    outs = sample.generate(student if on_policy else teacher, prompts, max_new_tokens=room,
                           temperature=cfg.sampling_temperature, top_p=cfg.top_p, seed=int(draw.integers(2**31)),
                           eos_ids=eos_ids)
    return [((p + o)[:cfg.max_len], ([0] * len(p) + [1] * len(o))[:cfg.max_len]) for p, o in zip(prompts, outs)], \
        [len(o) for o in outs]


def device_batch(examples, cfg: Config, pad_id: int, mesh, micro_batches: int, topk=None):
    """Examples → data.collate's arrays (+ topk: each example's cached teacher rows, ids and log-probs
    [n_i, K], placed at its target positions), this host's rows as [micro_batches, b, T] on the mesh
    (mesh None: unsharded)."""
    batch = data.collate([[ex] for ex in examples], data.bucket_length(max(len(ids) for ids, _ in examples),
                                                                       cfg.max_len), pad_id)
    if topk is not None:
        B, T = batch["tokens"].shape
        batch["topk_ids"] = np.zeros((B, T - 1, cfg.teacher_topk), np.int32)
        batch["topk_logps"] = np.zeros((B, T - 1, cfg.teacher_topk), np.float32)
        for r, (ids, top) in enumerate(topk):
            where = np.flatnonzero(batch["loss_mask"][r, 1:])
            batch["topk_ids"][r, where], batch["topk_logps"][r, where] = ids, top
    return shard.micro_batches(batch, mesh, micro_batches)


# ----------------------------------------------------------------------------- the teacher

def load_teacher(cfg: Config, loaded, mesh, train_rows):
    """The frozen teacher: --teacher (a directory or a preset), else runs/sft/hf when there, else tiny-qwen3
    trained on the task's examples now (saved to <out>/teacher, reused on --resume). Its vocabulary must
    be the student's, up to padding rows past both tokenizers' ids."""
    path, saved = cfg.teacher, pathlib.Path(cfg.out) / "teacher"
    if not path:
        path = next((str(p) for p in (saved, pathlib.Path("runs/sft/hf")) if (p / "config.json").is_file()), "")
    with run.user_errors():
        directory = pathlib.Path(path) if path and pathlib.Path(path).is_dir() else None
        teacher, _, directory = ckpt.load_model(path or "tiny-qwen3", ckpt=directory, dtype=cfg.teacher_dtype,
                                                param_dtype=cfg.teacher_dtype, seed=cfg.seed + 1)
        tok_t = data.load_tokenizer(directory)
    teacher = shard.shard_model(teacher, mesh)
    if not path:
        print(f"teacher: tiny-qwen3 trained on the built-in task first (until {cfg.teacher_target} greedy accuracy "
              f"on training prompts, at most {cfg.teacher_steps} steps)", file=sys.stderr)
        teacher, _ = sft.warm_up(teacher, train_rows, mesh, steps=cfg.teacher_steps, lr=3e-3, batch_size=128,
                                 max_len=cfg.max_len, clip=1.0, weight_decay=0.01, seed=cfg.seed + 1,
                                 pad_id=loaded.tokenizer.pad_id, target=cfg.teacher_target, save_to=saved,
                                 loaded=loaded, accuracy=lambda m: run.evaluate_completions(
                                     m, data.as_rows(train_rows[:256], loaded.tokenizer), loaded.tokenizer,
                                     None)["eval/accuracy"])
    else:
        print(f"teacher: {path}", file=sys.stderr)
    with run.user_errors():
        data.check_same_tokenizer(loaded.tokenizer, loaded.model.cfg.vocab_size, tok_t, teacher.cfg.vocab_size)
    return teacher


def teacher_topk(teacher, splits: dict, cfg: Config, pad_id: int, V: int) -> dict:
    """The teacher's top-K log-probs (at --temperature) of every target token of each split's examples:
    {split/ids, split/logps [tokens, K], split/offsets [n + 1]}, made once and kept in --teacher-cache
    under a hash of the teacher's weights, the examples' tokens and K, τ, V."""
    def top(logits):  # [c, V_t] → [c, K] log-probs and ids, most likely first
        values, ids = jax.lax.top_k(jax.nn.log_softmax(logits[:, :V] / cfg.temperature, axis=-1), cfg.teacher_topk)
        return values, ids
    graphdef, state = nnx.split(teacher)

    @jax.jit
    def score(state, b):  # [B, T - 1, K] of a collated batch
        model = nnx.merge(graphdef, state)
        x = model_lib.next_token_hidden(model, b["tokens"], b["positions"], b["segment_ids"], b["tokens"].shape[1] - 1)
        return logprobs.per_position(top, x, model.head(model.cfg.param_dtype), cap=model.cfg.final_softcap)

    def compute():
        out = {}
        for split, examples in splits.items():
            ids, logps, offsets = [], [], [0]
            for i in range(0, len(examples), 64):
                chunk = examples[i:i + 64]
                b = data.collate([[ex] for ex in chunk], data.bucket_length(max(len(e[0]) for e in chunk), 1 << 20),
                                 pad_id)
                values, top_ids = jax.device_get(score(state, {k: jnp.asarray(v) for k, v in b.items()}))
                for r in range(len(chunk)):
                    where = np.flatnonzero(b["loss_mask"][r, 1:])
                    ids.append(top_ids[r, where])
                    logps.append(values[r, where])
                    offsets.append(offsets[-1] + len(where))
            out.update({f"{split}/ids": np.concatenate(ids).astype(np.int32), f"{split}/offsets": np.array(offsets),
                        f"{split}/logps": np.concatenate(logps).astype(np.float32)})
        return out
    key = ["distill teacher top-k v1", cfg.teacher_topk, cfg.temperature, V, *splits,
           *[np.asarray(x) for x in jax.tree.leaves(state)],
           *[np.array([len(ids) for ids, _ in ex] + [t for ids, m in ex for t in ids + m]) for ex in splits.values()]]
    return run.cached_arrays(cfg.teacher_cache, key, compute, f"teacher top-{cfg.teacher_topk}")


def cached_rows(cache: dict, split: str, indices) -> list:
    """The cached (ids, log-probs) of examples `indices` of a split."""
    o = cache[f"{split}/offsets"]
    return [(cache[f"{split}/ids"][o[i]:o[i + 1]], cache[f"{split}/logps"][o[i]:o[i + 1]]) for i in indices]


# ----------------------------------------------------------------------------- eval

def evaluate(eval_loss, params, frozen, evals, eval_examples, eval_topk, tok, pad_id, cfg, policy,
             teacher_accuracy) -> dict:
    """eval/kl (forward KL per completion token: at temperature 1; over the K + 1 buckets at --temperature
    with --teacher-topk) and the logged terms on held-out examples, eval/accuracy of the student's greedy
    completions and the teacher's (computed once)."""
    totals = None
    for i in range(0, len(eval_examples), 64):
        topk = None if eval_topk is None else eval_topk[i:i + 64]
        sums = jax.device_get(eval_loss(params, frozen, device_batch(eval_examples[i:i + 64], cfg, pad_id, None, 1,
                                                                     topk)))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    record = {} if totals is None else {f"eval/{k}": float(v) / max(float(totals["tokens"]), 1.0)
                                        for k, v in totals.items() if k != "tokens"}
    if totals is not None:
        record["eval/kl"] = record["eval/kl/forward"]
    return {**record, **run.evaluate_completions(policy(), evals, tok, None), **teacher_accuracy}


# ----------------------------------------------------------------------------- main

def prepare(cfg: Config):
    """The student, the data (rows cut to --max-len), the teacher, the mesh and the checkpoint manager."""
    with run.user_errors():
        loaded = run.load(cfg)
        train, evals = data.completion_data(loaded.tokenizer, loaded.family, cfg.data, cfg.eval_data, cfg.task,
                                            cfg.train_examples, cfg.eval_examples, cfg.seed)
        manager, mesh = run.checkpoints(cfg), shard.make_mesh(cfg.mesh)
    cut = lambda examples: [(ids[:cfg.max_len], mask[:cfg.max_len]) for ids, mask in examples]  # noqa: E731
    train, eval_examples = cut(train), cut(data.tokenize(row, loaded.tokenizer, loaded.family) for row in evals)
    return loaded, train, evals, eval_examples, load_teacher(cfg, loaded, mesh, train), mesh, manager


def main(argv=None):
    cfg = run.parse_flags(Config, argv)
    out, start = pathlib.Path(cfg.out), time.perf_counter()
    loaded, train, evals, eval_examples, teacher, mesh, manager = prepare(cfg)
    tok, student = loaded.tokenizer, loaded.model
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_ids[0]
    teacher_accuracy = {k.replace("accuracy", "teacher_accuracy"): v
                        for k, v in run.evaluate_completions(teacher, evals, tok, None).items()}
    cache = teacher_topk(teacher, {"train": train, "eval": eval_examples}, cfg, pad_id,
                         min(teacher.cfg.vocab_size, student.cfg.vocab_size)) if cfg.teacher_topk else None
    if cfg.lora:
        adapters.add_lora(student, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    graphdef, params, frozen = nnx.split(shard.shard_model(student, mesh), adapters.LoRA if cfg.lora else nnx.Param,
                                         ...)  # the student's trained parameters | the rest
    projections = make_projections(cfg, student.cfg, teacher.cfg)
    params = {"student": params, **({"projections": shard.shard_tree(projections, mesh)} if projections else {})}
    teacher_graphdef, teacher_state = nnx.split(teacher)
    frozen = (frozen, None if cache is not None else teacher_state)  # with the cache the teacher takes no part
    tx, schedule = run.adamw(cfg, cfg.steps)
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, mesh)
    train_step = jax.jit(make_train_step(graphdef, teacher_graphdef, tx, cfg), donate_argnums=(0, 1),
                         out_shardings=(param_sh, opt_sh, None, None))
    eval_loss = jax.jit(lambda p, f, b: make_train_step(graphdef, teacher_graphdef, None, cfg, loss_only=True)(
        p, f, jax.tree.map(lambda x: x[0], b), None)[1])
    step, state, position = run.resume(cfg, manager, {"params": params, "opt_state": opt_state},
                                       {"params": param_sh, "opt_state": opt_sh})
    params, opt_state = state["params"], state["opt_state"]
    run.announce(loaded, params, mesh, f"{len(train)} training examples, loss {cfg.loss}", cfg)
    policy = lambda: nnx.merge(graphdef, params["student"], frozen[0])  # noqa: E731 (the student now)
    eval_topk = None if cache is None else cached_rows(cache, "eval", range(len(eval_examples)))
    evaluate_now = lambda: evaluate(eval_loss, params, frozen, evals, eval_examples, eval_topk, tok,  # noqa: E731
                                    pad_id, cfg, policy, teacher_accuracy)

    with run.MetricsLog(out, cfg) as log:
        if step == 0:
            record = evaluate_now()
            log.write({"step": 0, **record})
            print(f"step 0: eval/kl {record.get('eval/kl', float('nan')):.3f}, eval/accuracy "
                  f"{record.get('eval/accuracy', float('nan')):.3f} (teacher "
                  f"{record.get('eval/teacher_accuracy', float('nan')):.3f})", file=sys.stderr)
        progress, lengths = run.Progress(cfg, step, manager), []
        while step < cfg.steps:
            picked = data.stream(len(train), cfg.seed, position, cfg.batch_size)
            position += cfg.batch_size
            examples, sampled = step_examples(train, picked, policy(), teacher, tok, cfg, step, tok.eos_ids)
            lengths += sampled or []
            batch = device_batch(examples, cfg, pad_id, mesh, cfg.grad_accum,
                                 None if cache is None else cached_rows(cache, "train", picked))
            params, opt_state, metrics, aux = train_step(params, opt_state, frozen, batch, None)
            step += 1
            if progress.due(step, cfg.log_every):
                tokens = max(float(np.sum(aux["tokens"])), 1.0)
                record = {**progress.record(step, metrics, schedule(step - 1)),
                          **{k: float(np.sum(v)) / tokens for k, v in aux.items()
                             if k != "tokens" and (k != "nll_loss" or cfg.kd_ratio < 1)},
                          **({"completions/mean_length": float(np.mean(lengths))} if lengths else {})}
                if progress.due(step, cfg.eval_every):
                    record.update(evaluate_now())
                progress.write(log, record, loss=f"{record['loss']:.4f}", acc=record.get("eval/accuracy", ""))
                lengths = []
            if progress.save_due(step, metrics):
                run.save(cfg, manager, step, {"params": params, "opt_state": opt_state}, position)
            progress.bar.update(1)
            if progress.stopping(step):
                break
        progress.close(step)

    if shard.is_main_process():
        if projections:  # the hidden-state projections, as trained
            safetensors.numpy.save_file({k: np.asarray(v) for k, v in params["projections"].items()},
                                        str(out / "projections.safetensors"))
        run.export_policy(policy(), out, loaded, cfg.lora, time.perf_counter() - start)


if __name__ == "__main__":
    main()
