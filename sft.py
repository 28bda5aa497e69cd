"""sft.py — supervised fine-tuning of all parameters.

The model learns to continue each prompt with its completion: the loss is the mean
negative log-likelihood of the completion tokens only (prompt tokens are context),
normalised by the number of target tokens in the whole (accumulated) batch:

    L(θ) = − Σ_i Σ_t m_it · log p_θ(x_it | x_i,<t)  /  Σ_i Σ_t m_it,   m_it = 1 on completion tokens

(+ c · the router's load-balancing loss for a mixture-of-experts model, moe.load_balancing_loss, c =
--router-aux-loss-coef.)

With no arguments it trains the tiny Qwen 3 preset on the built-in task (fixed-width
3-digit × 1-digit multiplication) on a laptop CPU in about two minutes, reaching
≥ 0.9 exact-match accuracy on held-out problems:

    python sft.py
    python sft.py --ckpt path/to/gemma-3-270m --data train.jsonl --lr 2e-5 --steps 500 --batch-size 16
    python sft.py --model qwen3 --ckpt DIR --data train.jsonl --dtype bfloat16 --remat --tpu --mesh fsdp=-1,tp=4

Data (--data, --eval-data): JSONL in TRL's formats, {"prompt", "completion"},
{"messages": [...]} (chat template; loss on assistant turns) or {"text"}.
Outputs in --out: metrics.jsonl, checkpoints/ (resume with --resume), hf/ (transformers loads it).
lora.py trains with this file's loss and loop, on adapters instead of all parameters.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

import data
import flags
import logprobs
import model as model_lib
import moe
import run
import shard
import tasks


@dataclasses.dataclass
class Config(flags.RunConfig):
    # -- model and data --
    model: str = "tiny-qwen3"  # preset or family alias (ignored when --ckpt is given)
    ckpt: str | None = None  # Hugging Face checkpoint directory to fine-tune
    data: str | None = None  # training JSONL; None: the built-in arithmetic task
    eval_data: str | None = None  # JSONL of {"prompt","completion"} for eval; None: held-out task problems
    task: str = "*,3,1"  # built-in task: operator, digits of a, digits of b
    train_examples: int = 50_000  # built-in task: size of the training set
    eval_examples: int = 256  # held-out problems for eval/loss and eval/accuracy
    max_len: int = 512  # longest sequence; longer examples are truncated
    pack: bool = False  # pack several examples per row (segment ids keep them apart)
    # -- optimisation --
    steps: int = 1200  # optimizer steps
    batch_size: int = 128  # sequences per optimizer step (all micro-batches together)
    grad_accum: int = 1  # micro-batches per step (less memory, the same step: L divides by the whole step's Σ m)
    lr: float | None = None  # peak learning rate
    warmup: float = 0.03  # fraction of steps of linear warmup, then cosine decay to 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    # -- logging and checkpoints --
    eval_every: int = 200  # steps between evaluations (and at the start and end)
    save_every: int = 400  # steps between train-state checkpoints
    seed: int = 0  # data order and initialisation
    AUTO: ClassVar[dict] = {"lr": (3e-3, 2e-5)}  # the fields left None: (a random tiny model, pretrained; TRL's)

    def __post_init__(self):
        flags.fill_defaults(self)  # the fields left None: AUTO's value for this start
        tasks.builtin_task(self.task)  # a bad --task fails here, before anything loads
        flags.check(flags.positive(self, "steps", "batch_size", "grad_accum", "max_len", "eval_every", "save_every", "keep",
                               "log_every", "train_examples", "eval_examples") + [
            (self.batch_size % self.grad_accum == 0,
             f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}"),
            (self.lr > 0 and 0 <= self.warmup < 1 and self.clip > 0 and self.weight_decay >= 0,
             "need --lr > 0, 0 <= --warmup < 1, --clip > 0, --weight-decay >= 0"),
            (self.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {self.dtype!r}")])


# ----------------------------------------------------------------------------- loss

def token_nll(model, batch, dropout_key=None):
    """Summed NLL of the target tokens, their count, and the router's load-balancing loss over the batch's
    tokens (a MoE model's; 0 for a dense one). batch: tokens, loss_mask, segment_ids, positions [B, T];
    position t is predicted from tokens[:t]. dropout_key: LoRA dropout. The output head runs a chunk of
    positions at a time, its gradient taken on the way (logprobs.weighted_nll): no [B, T, V] logits."""
    tokens, T = batch["tokens"], batch["tokens"].shape[1]
    x, taps = model_lib.next_token_hidden(model, tokens, batch["positions"], batch["segment_ids"], T - 1,
                                          dropout_key=dropout_key, taps=("router",))  # [B, T-1, D]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    nll = logprobs.weighted_nll(x, model.head(model.cfg.param_dtype), tokens[:, 1:], mask, cap=model.cfg.final_softcap)
    return nll, jnp.sum(mask), moe.load_balancing_loss(taps["router"], batch["segment_ids"][:, :-1] > 0, model.cfg)


# ----------------------------------------------------------------------------- train step

def make_train_step(graphdef, tx, aux_loss_coef: float | None = None):
    """step(params, opt_state, frozen, batch [grad_accum, B/grad_accum, T], key) → params, opt_state,
    metrics: the trained params (all of them, or LoRA's adapters) move; frozen is the rest of the model.
    aux_loss_coef: c of a MoE model's aux loss (moe.aux_loss_coef; None: a dense model, no aux_loss logged)."""
    def loss_fn(params, frozen, micro_batch, key):
        nll, count, aux_loss = token_nll(nnx.merge(graphdef, params, frozen), micro_batch, key)
        # L: / Σ m over the whole step, + c · the aux loss averaged over the micro-batches (aux_weight = c / M)
        return nll / micro_batch["targets"] + micro_batch["aux_weight"] * aux_loss, {"tokens": count, "aux": aux_loss}
    update = run.make_update(loss_fn, tx)  # sums the micro-batches' losses and gradients

    def train_step(params, opt_state, frozen, batch, key):
        M = batch["tokens"].shape[0]
        targets = jnp.maximum(jnp.sum(batch["loss_mask"][:, :, 1:]), 1.0)  # Σ m of every micro-batch
        batch = {**batch, "targets": jnp.full(M, targets), "aux_weight": jnp.full(M, (aux_loss_coef or 0.0) / M)}
        params, opt_state, metrics, aux = update(params, opt_state, frozen, batch, key)
        aux_metric = {} if aux_loss_coef is None else {"aux_loss": jnp.mean(aux["aux"])}
        return params, opt_state, {**metrics, "tokens": jnp.sum(aux["tokens"]), **aux_metric}
    return train_step


# ----------------------------------------------------------------------------- main

def train(cfg: Config, loaded: run.Loaded, model, trainable=nnx.Param, first_record: dict | None = None):
    """Fine-tune the `trainable` parameters of `model` (nnx.Param: all; adapters.LoRA: the adapters) on
    the data; logs, evaluates, saves and resumes. Returns the trained model."""
    tok = loaded.tokenizer
    with flags.user_errors():
        train_rows, evals = data.completion_data(tok, loaded.family, cfg.data, cfg.eval_data, cfg.task,
                                                 cfg.train_examples, cfg.eval_examples, cfg.seed)
        manager, mesh = run.checkpoints(cfg, model), shard.make_mesh(cfg.mesh)
    graphdef, params, frozen = nnx.split(shard.shard_model(model, mesh), trainable, ...)  # trained | the rest
    tx, schedule = run.adamw(cfg, cfg.steps)
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, mesh)
    frozen_sh = shard.tree_shardings(frozen, mesh)
    batch_sh = shard.batch_sharding(mesh, 3, axis=1)  # [grad_accum, B, T]: each micro-batch's rows over (data, fsdp)
    aux_loss_coef = moe.aux_loss_coef(cfg.router_aux_loss_coef, model.cfg)  # None: dense
    train_step = jax.jit(make_train_step(graphdef, tx, aux_loss_coef), out_shardings=(param_sh, opt_sh, None),
                         in_shardings=(param_sh, opt_sh, frozen_sh, batch_sh, None), donate_argnums=(0, 1))
    eval_nll = jax.jit(lambda p, f, b: token_nll(nnx.merge(graphdef, p, f), b)[:2])

    def evaluate(params):  # eval/loss and greedy eval/accuracy of the model at these params
        return run.evaluate_completions(nnx.merge(graphdef, params, frozen), evals, tok,
                                        lambda batch: eval_nll(params, frozen, batch))
    step, state, position = run.resume(cfg, manager, {"params": params, "opt_state": opt_state},
                                       {"params": param_sh, "opt_state": opt_sh})
    params, opt_state = state["params"], state["opt_state"]
    batches = data.Batches(train_rows, cfg.batch_size, cfg.max_len, seed=cfg.seed, pack=cfg.pack, position=position,
                           pad_id=data.pad_id(tok))
    run.announce(loaded, params, mesh, f"{len(train_rows)} training examples", cfg)

    with run.MetricsLog(cfg.out, cfg) as log:
        if step == 0:
            log.write({"step": 0, **(first_record or {}), **evaluate(params)})
        progress, pending = run.Progress(cfg, step, manager), []  # metrics stay on device until logged: no per-step sync
        while step < cfg.steps:
            batch = shard.micro_batches(next(batches), mesh, cfg.grad_accum)
            key = jax.random.fold_in(jax.random.key(cfg.seed), step)  # LoRA dropout, when there is any
            params, opt_state, metrics = train_step(params, opt_state, frozen, batch, key)
            step += 1
            pending.append(metrics["tokens"])
            if progress.due(step, cfg.log_every):
                record = progress.record(step, metrics, schedule(step - 1))
                record["tokens_per_sec"] = float(sum(pending)) / (time.perf_counter() - progress.t0)
                record.update({"aux_loss": float(metrics["aux_loss"])} if "aux_loss" in metrics else {})
                if progress.due(step, cfg.eval_every):
                    record.update(evaluate(params))
                progress.write(log, record, loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}",
                               acc=record.get("eval/accuracy", ""))
                pending = []
            # PLUMBING (keep): the checkpoint (and the NaN stop before it), the bar, SIGTERM's early end
            if progress.save_due(step, metrics):
                run.save(cfg, manager, step, {"params": params, "opt_state": opt_state}, batches.position)
            progress.bar.update(1)
            if progress.stopping(step):
                break
        progress.close(step)
    return nnx.merge(graphdef, params, frozen)


def main(argv=None):
    cfg = flags.parse(Config, argv)
    with flags.user_errors():
        loaded = run.load(cfg)
    trained = train(cfg, loaded, loaded.model)
    run.export_hf(trained, pathlib.Path(cfg.out) / "hf", loaded)  # the final model (+ the tokenizer files)
    if shard.is_main_process():
        print(f"saved {cfg.out}/hf; metrics in {cfg.out}/metrics.jsonl", file=sys.stderr)


if __name__ == "__main__":
    main()
