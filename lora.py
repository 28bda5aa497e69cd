"""lora.py — LoRA and QLoRA: fine-tune low-rank adapters beside a frozen (optionally 4-bit) base.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes every weight W and learns a rank-r update on
the chosen projections (default: q k v o gate up down), scaled by alpha / r (rsLoRA: alpha / √r):

    y = x W + (alpha / r) · dropout(x) A B,    A [in, r] random, B [r, out] = 0 at the start

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) also stores the frozen W as 4-bit NormalFloat
codes (or int8) with one absmax scale per block of 64, dequantized inside the forward pass.
The loss is SFT's completion-token NLL; only A and B are differentiated and only they have
optimizer state. The model code for both lives in model.py (`add_lora`, `quantize_model`).

With no arguments it trains rank-8 adapters on a frozen *random* tiny Qwen 3 (9% of its
parameters; on real models well under 1%) to add 3-digit numbers, "123+045=" → "0168", reaching
≥ 0.9 held-out accuracy in about two minutes on a laptop CPU:

    python lora.py
    python lora.py --ckpt path/to/gemma-3-270m --quant nf4 --data train.jsonl --lr 2e-4 --merge
    python lora.py --model qwen3 --ckpt DIR --data train.jsonl --dtype bfloat16 --tpu --mesh fsdp=-1,tp=4

Outputs in --out: metrics.jsonl, checkpoints/ (resume with --resume), adapter/ (PEFT's layout:
`peft.PeftModel.from_pretrained(hf_model, "runs/lora/adapter")`), and with --merge hf/, a full
checkpoint with W + (alpha / r) A B. --adapter DIR continues from a PEFT adapter.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import ckpt
import data
import model as model_lib
import sample
import shard


@dataclasses.dataclass
class Config:
    model: str = "tiny-qwen3"  # preset or family alias (ignored when --ckpt is given)
    ckpt: str | None = None  # Hugging Face checkpoint directory to fine-tune
    data: str | None = None  # training JSONL; default: the built-in arithmetic task
    eval_data: str | None = None  # JSONL of {"prompt","completion"} for eval; default: held-out task problems
    task: str = "+,3,3"  # built-in task: operator, digits of a, digits of b
    train_examples: int = 50_000  # built-in task: size of the training set
    eval_examples: int = 256  # held-out problems for eval/loss and eval/accuracy
    lora_rank: int = 8  # r
    lora_alpha: float = 16.0  # the update is scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the adapters' inputs
    lora_targets: str = "q,k,v,o,gate,up,down"  # projections that get adapters
    rslora: bool = False  # scale by alpha / sqrt(r) (rank-stabilised LoRA)
    quant: str = ""  # QLoRA: store the frozen base as nf4 or int8 ("" keeps float32)
    quant_block: int = 64  # values per quantization scale
    adapter: str | None = None  # PEFT adapter directory to continue from (its rank and targets win)
    merge: bool = False  # also write out/hf: the base with the adapters merged in
    steps: int = 1200  # optimizer steps
    batch_size: int = 128  # sequences per optimizer step (all micro-batches together)
    grad_accum: int = 1  # micro-batches per step; gradients normalised by the step's token count
    max_len: int = 512  # longest sequence; longer examples are truncated
    pack: bool = False  # pack several examples per row (segment ids keep them apart)
    lr: float = 3e-3  # peak learning rate
    warmup: float = 0.03  # fraction of steps of linear warmup, then cosine decay to 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    clip: float = 1.0  # global gradient-norm clip
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
    remat: bool = False  # recompute activations in the backward pass (less memory)
    eval_every: int = 200  # steps between evaluations (and at the start and end)
    save_every: int = 400  # steps between train-state checkpoints
    keep: int = 2  # checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl lines
    out: str = "runs/lora"  # output directory
    resume: bool = False  # continue from the newest checkpoint in --out
    seed: int = 0  # data order and initialisation
    mesh: str = ""  # device mesh, e.g. data=1,fsdp=-1,tp=1 (default: all devices on fsdp)
    tpu: bool = False  # multi-host TPU start-up (jax.distributed)

    def __post_init__(self):
        positive = ("steps", "batch_size", "grad_accum", "max_len", "eval_every", "save_every", "keep", "log_every",
                    "train_examples", "eval_examples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}")
        if not (self.lr > 0 and 0 <= self.warmup < 1 and self.clip > 0 and self.weight_decay >= 0):
            raise ValueError("need --lr > 0, 0 <= --warmup < 1, --clip > 0, --weight-decay >= 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("need --lora-rank >= 1, --lora-alpha > 0 and 0 <= --lora-dropout < 1")
        unknown = set(self.lora_targets.split(",")) - set(model_lib.TARGETS)
        if unknown:
            raise ValueError(f"unknown --lora-targets {', '.join(sorted(unknown))}; "
                             f"choose from {','.join(model_lib.TARGETS)}")
        if self.quant not in ("", *model_lib.QUANT_FORMATS) or self.quant_block < 2 or self.quant_block % 2:
            raise ValueError(f"--quant must be nf4 or int8 and --quant-block even, got {self.quant!r} "
                             f"{self.quant_block}")


# ----------------------------------------------------------------------------- loss

def token_nll(model, batch, dropout_key=None):
    """Summed NLL of the target tokens and their count. batch: tokens, loss_mask,
    segment_ids, positions [B, T]; position t is predicted from tokens[:t]."""
    logits = model(batch["tokens"][:, :-1], positions=batch["positions"][:, :-1],
                   segment_ids=batch["segment_ids"][:, :-1], dropout_key=dropout_key)  # [B, T-1, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    mask = batch["loss_mask"][:, 1:]
    return jnp.sum(nll * mask), jnp.sum(mask)


# ----------------------------------------------------------------------------- train step

def make_train_step(graphdef, tx):
    def train_step(params, opt_state, frozen, batch, key):
        """One optimizer step over a batch of shape [grad_accum, B/grad_accum, T]; params are
        the adapters, frozen the base (never differentiated, never updated)."""
        def micro(carry, mb_key):
            grads, nll, count = carry
            mb, key = mb_key
            (mb_nll, mb_count), g = jax.value_and_grad(
                lambda p: token_nll(nnx.merge(graphdef, p, frozen), mb, key), has_aux=True)(params)
            return (jax.tree.map(jnp.add, grads, g), nll + mb_nll, count + mb_count), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        keys = jax.random.split(key, jax.tree.leaves(batch)[0].shape[0])  # a dropout key per micro-batch
        (grads, nll, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), (batch, keys))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)  # normalised by the whole step's tokens
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": nll / count, "grad_norm": optax.global_norm(grads), "tokens": count}
        return optax.apply_updates(params, updates), opt_state, metrics
    return train_step


# ----------------------------------------------------------------------------- main

def load_datasets(cfg: Config, tok, family):
    """Tokenized training examples and eval rows ({"prompt", "completion"})."""
    if cfg.data:
        train = [data.tokenize(row, tok, family) for row in data.read_jsonl(cfg.data)]
    else:
        op, a, b = cfg.task.split(",")
        task = data.Arithmetic(op, int(a), int(b))
        train = [data.tokenize(row, tok) for row in task.examples("train", cfg.train_examples, cfg.seed)]
    if cfg.eval_data:
        evals = data.read_jsonl(cfg.eval_data)
        if any("prompt" not in row for row in evals):
            raise data.DataError(f"{cfg.eval_data}: eval rows need 'prompt' and 'completion'")
    elif cfg.data:
        evals = []
    else:
        evals = task.examples("eval", cfg.eval_examples, cfg.seed)
    return train, evals


def evaluate(graphdef, params, frozen, evals, tok, eval_loss_fn):
    """eval/loss over the rows and eval/accuracy: greedy completion == reference (stripped)."""
    if not evals:
        return {}
    model = nnx.merge(graphdef, params, frozen)
    examples = [data.tokenize(row, tok) for row in evals]
    nll = count = 0.0
    for i in range(0, len(examples), 64):
        chunk = [[ex] for ex in examples[i:i + 64]]
        batch = data.collate(chunk, data.bucket_length(max(len(ex[0][0]) for ex in chunk), 1 << 20), tok.pad_id)
        b_nll, b_count = eval_loss_fn(params, frozen, batch)
        nll, count = nll + float(b_nll), count + float(b_count)
    max_new = max(len(tok.encode(row["completion"], add_bos=False)) for row in evals) + 1
    outs = sample.generate(model, [tok.encode(row["prompt"]) for row in evals], max_new_tokens=max_new,
                           eos_ids=tok.eos_ids)
    correct = [tok.decode(out).strip() == row["completion"].strip() for out, row in zip(outs, evals)]
    return {"eval/loss": nll / max(count, 1.0), "eval/accuracy": float(np.mean(correct))}


def main(argv=None):
    cfg = shard.startup(Config, argv)
    out = pathlib.Path(cfg.out)
    try:
        model, source = ckpt.load_model(cfg.model, ckpt=cfg.ckpt, dtype=cfg.dtype, param_dtype="float32",
                                        seed=cfg.seed, remat=cfg.remat)
        local = cfg.ckpt or (source if os.path.isdir(source) else None)  # --ckpt or the HF cache
        tok = data.load_tokenizer(local)  # no directory: the byte-level tokenizer of the tiny presets
        train, evals = load_datasets(cfg, tok, model.cfg.family if local else None)
        manager = ckpt.checkpoint_manager(out / "checkpoints", keep=cfg.keep)
        if manager.latest_step() is not None and not cfg.resume:
            raise ValueError(f"{out}/checkpoints already holds a run: pass --resume or choose another --out")
        mesh = shard.make_mesh(cfg.mesh)
        n_base, bytes_f32 = model_lib.count_params(model), 4 * model_lib.count_params(model)
        if cfg.adapter:
            ckpt.load_peft(model, cfg.adapter)
        else:
            model_lib.add_lora(model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets.split(",")),
                               cfg.lora_dropout, cfg.rslora, seed=cfg.seed)
        if cfg.quant:
            model_lib.quantize_model(model, cfg.quant, cfg.quant_block)
    except (ValueError, OSError) as e:  # CheckpointError, DataError, TokenizerError, MeshError
        sys.exit(f"error: {e}")

    model = shard.shard_model(model, mesh)
    graphdef, params, frozen = nnx.split(model, model_lib.LoRA, ...)  # adapters | frozen base
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, int(cfg.warmup * cfg.steps)), cfg.steps)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adamw(schedule, weight_decay=cfg.weight_decay))
    param_sh, frozen_sh = shard.tree_shardings(params, mesh), shard.tree_shardings(frozen, mesh)
    opt_sh = shard.tree_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    # [grad_accum, B, T]: each micro-batch's rows split over (data, fsdp)
    batch_sh = shard.batch_sharding(mesh, 3, axis=1)
    train_step = jax.jit(make_train_step(graphdef, tx), in_shardings=(param_sh, opt_sh, frozen_sh, batch_sh, None),
                         out_shardings=(param_sh, opt_sh, None), donate_argnums=(0, 1))
    eval_loss_fn = jax.jit(lambda p, f, b: token_nll(nnx.merge(graphdef, p, f), b))

    step, position = 0, 0
    if cfg.resume:
        try:
            restored = ckpt.restore_train_state(manager, {"params": params, "opt_state": opt_state},
                                                {"params": param_sh, "opt_state": opt_sh})
        except ckpt.CheckpointError as e:
            sys.exit(f"error: {e}")
        if restored:
            step, state, meta = restored
            params, opt_state, position = state["params"], state["opt_state"], meta["data_position"]
            print(f"resumed from step {step} (data position {position})", file=sys.stderr)
    batches = data.Batches(train, cfg.batch_size, cfg.max_len, seed=cfg.seed, pack=cfg.pack, position=position,
                           pad_id=tok.pad_id)

    main_process = shard.is_main_process()
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        n_train = sum(x.size for x in jax.tree.leaves(params))
        n_bytes = model_lib.param_bytes(model)
        print(f"model: {source}, {n_base / 1e6:.2f}M base parameters; training {n_train / 1e6:.3f}M "
              f"({100 * n_train / n_base:.2f}%); parameter memory {n_bytes / 2**20:.1f} MiB = "
              f"{100 * n_bytes / bytes_f32:.0f}% of float32 ({cfg.quant or 'float32'} base); {len(train)} training "
              f"examples; mesh {dict(mesh.shape)}", file=sys.stderr)
    log = open(out / "metrics.jsonl", "a") if main_process else None

    def write(metrics):
        if log:
            log.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}) + "\n")
            log.flush()

    if step == 0:
        write({"step": 0, "trainable_params": n_train, "trainable_fraction": n_train / n_base,
               "param_bytes": n_bytes, "param_bytes_float32": bytes_f32,
               **evaluate(graphdef, params, frozen, evals, tok, eval_loss_fn)})
    bar = tqdm(total=cfg.steps, initial=step, disable=not main_process, dynamic_ncols=True)
    pending, t0 = [], time.perf_counter()  # metrics stay on device until logged: no per-step sync
    while step < cfg.steps:
        batch = next(batches)
        rows = shard.host_rows(cfg.batch_size)  # each host feeds its slice of the global batch
        batch = {k: v[rows].reshape(cfg.grad_accum, -1, v.shape[-1]) for k, v in batch.items()}
        batch = {k: shard.global_batch(v, mesh, axis=1) for k, v in batch.items()}
        params, opt_state, metrics = train_step(params, opt_state, frozen, batch,
                                                jax.random.fold_in(jax.random.key(cfg.seed), step))
        step += 1
        pending.append(metrics["tokens"])
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss, elapsed = float(metrics["loss"]), time.perf_counter() - t0
            tokens_seen = float(sum(pending))
            record = {"step": step, "loss": loss, "lr": float(schedule(step - 1)),
                      "grad_norm": float(metrics["grad_norm"]), "tokens_per_sec": tokens_seen / elapsed}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record.update(evaluate(graphdef, params, frozen, evals, tok, eval_loss_fn))
            write(record)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / elapsed:.0f}",
                            acc=record.get("eval/accuracy", ""))
            pending, t0 = [], time.perf_counter()  # metrics stay on device until logged: no per-step sync
        if step % cfg.save_every == 0 or step == cfg.steps:
            ckpt.save_train_state(manager, step, {"params": params, "opt_state": opt_state},
                                  {"data_position": batches.position, "config": dataclasses.asdict(cfg)})
        bar.update(1)
    bar.close()

    if main_process:  # the adapters in PEFT's layout; with --merge, a full HF checkpoint (+ tokenizer files)
        final = nnx.merge(graphdef, params, frozen)
        ckpt.save_peft(final, out / "adapter", base_model=local)
        saved = [out / "adapter"]
        if cfg.merge:
            merged = model_lib.merge_lora(final)
            merged.cfg = merged.cfg.replace(remat=False)
            ckpt.save_hf(merged, out / "hf")
            saved.append(out / "hf")
        if isinstance(tok, data.ByteTokenizer):
            for path in saved:
                tok.save(path)
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                     "generation_config.json", data.BYTE_TOKENIZER_FILE):
            if local and (pathlib.Path(local) / name).is_file():
                for path in saved:
                    shutil.copy(pathlib.Path(local) / name, path / name)
        print(f"saved {', '.join(map(str, saved))}; metrics in {out / 'metrics.jsonl'}", file=sys.stderr)


if __name__ == "__main__":
    main()
