"""run.py — the run plumbing every algorithm script shares. Nothing in this file is an algorithm.

What is the same in sft.py, lora.py, dpo.py, grpo.py and distill.py lives here once, so that each script
holds its algorithm alone (its loss and its denominator, its step, what it logs); their flags come from
flags.py:

    loading      load: model + tokenizer for --model / --ckpt (and the chat-template family)
    optimizer    adamw: AdamW with global-norm clipping, linear warmup (from lr/warmup, never 0) then cosine
    train state  checkpoints / resume / save: orbax train states in <out>/checkpoints; resume refuses a
                 checkpoint of another script or of other algorithm settings
    the loop     Progress: the bar, which steps log, evaluate and save, SIGTERM and NaN stops
    metrics      MetricsLog: <out>/metrics.jsonl, one JSON object per logged step, closed on exit;
                 evaluate_completions: eval/loss and greedy eval/accuracy on held-out rows
    export       export_hf / export_peft / export_policy: the final model (or adapters) with its tokenizer
    warm-up      warm_up: a short supervised start for the demos whose algorithm needs one (grpo, dpo,
                 distill's teacher)
    the update   make_update: one jitted optimizer step over (params, frozen) with the micro-batches'
                 losses and gradients summed (each script divides its own loss as its equation says)

Arrows point down: scripts import run; run imports adapters, ckpt, data, flags, logprobs, model, sample and
shard, never a script.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import signal
import shutil
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import adapters
import ckpt
import data
import flags
import logprobs
import model as model_lib
import sample
import shard
import tokenizer
from flags import fail, user_errors


# ----------------------------------------------------------------------------- loading

class Loaded(NamedTuple):
    model: object  # model.Transformer
    tokenizer: object  # tokenizer.ByteTokenizer | HFTokenizer | SentencePieceTokenizer
    source: str  # where the weights came from (a directory, or "random <preset>")
    directory: pathlib.Path | None  # the checkpoint directory; None for random weights
    family: str | None  # the chat-template family (None: no checkpoint, byte-level tokenizer)


def load(cfg, **overrides) -> Loaded:
    """The model of --ckpt, else of the --model preset (local HF cache, else random weights), in
    cfg.dtype with float32 parameters, and its tokenizer (the byte-level one when there is no directory)."""
    model, source, directory = ckpt.load_model(cfg.model, ckpt=cfg.ckpt, dtype=cfg.dtype, param_dtype="float32",
                                               seed=cfg.seed, init=cfg.init, remat=cfg.remat, **overrides)
    has_experts = model.cfg.experts is not None or bool(model.cfg.gemma4 and model.cfg.gemma4.experts)
    if has_experts and getattr(cfg, "quant", ""):
        raise ValueError(f"{source}: QLoRA does not quantize a mixture-of-experts model's experts yet; "
                         "train its adapters on the float base (no --quant)")
    return Loaded(model, tokenizer.load_tokenizer(directory), source, directory, model.cfg.family if directory else None)


def announce(loaded: Loaded, params, mesh, detail: str, cfg=None) -> None:
    """On stderr (main process), as the run starts: the model's source, what trains, the data, the mesh;
    and the settings that depend on the start (the Config's AUTO fields and dtype), as they are in effect."""
    if shard.is_main_process():
        print(f"model: {loaded.source}, training {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.3f}M "
              f"parameters; {detail}; mesh {dict(mesh.shape)}", file=sys.stderr)
        if cfg is not None:
            start = "pretrained" if flags.starts_pretrained(vars(cfg)) else "tiny"
            print(f"settings ({start} defaults for what the flags leave unset): " + ", ".join(
                f"{k} {getattr(cfg, k)!r}" if isinstance(getattr(cfg, k), str) else f"{k} {getattr(cfg, k)}"
                for k in [*getattr(cfg, "AUTO", {}), "dtype"]), file=sys.stderr)


# ----------------------------------------------------------------------------- optimizer

def adamw(cfg, updates: int):
    """AdamW (cfg.lr, cfg.weight_decay) after clipping the global gradient norm to cfg.clip; the rate
    ramps up linearly over the first cfg.warmup of the updates, lr·(n + 1)/(ramp + 1) at update n (as
    nanoGPT: the first update moves), then decays to 0 by a cosine. → (tx, schedule)"""
    ramp, lr = int(cfg.warmup * updates), cfg.lr

    def schedule(n):  # n: the updates done before this one
        cosine = 0.5 * lr * (1 + jnp.cos(jnp.pi * jnp.clip((n - ramp) / max(updates - ramp, 1), 0.0, 1.0)))
        return jnp.where(n < ramp, lr * (n + 1) / (ramp + 1), cosine)
    return optax.chain(clip_by_global_norm(cfg.clip), optax.adamw(schedule, weight_decay=cfg.weight_decay)), schedule


def clip_by_global_norm(max_norm: float):
    """optax.clip_by_global_norm as one multiplication by a scalar factor. optax divides each element
    by the norm; XLA will not repeat a division inside each consumer (AdamW's two moments), so it stores
    the clipped gradients: one more gradient-sized buffer per step (1 GiB at Gemma 3 270M)."""
    def update(grads, state, params=None):
        norm = optax.global_norm(grads)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def init_optimizer(tx, params, mesh):
    """The optimizer state, born sharded as the table in shard.py says, and the shardings of both."""
    param_sh = shard.tree_shardings(params, mesh)
    opt_sh = shard.tree_shardings(jax.eval_shape(tx.init, params), mesh)
    return jax.jit(tx.init, out_shardings=opt_sh)(params), param_sh, opt_sh


# ----------------------------------------------------------------------------- train state

def checkpoints(cfg, model):
    """The orbax manager of <out>/checkpoints, keeping the newest --keep steps (each save is written to a
    temporary directory and renamed when complete: a crash mid-save never leaves a broken newest one);
    refuses to write over an earlier run unless --resume. A save has at most max(1 GB, the model's largest
    parameter) in flight: orbax's default (96 GB) wrote all of Gemma 3 270M's 3 GiB train state at once,
    1.8 GiB above the state itself and above the training step's peak (benchmarks/memory_timeline.py)."""
    import orbax.checkpoint as ocp
    largest = max(getattr(x, "nbytes", 0) for x in jax.tree.leaves(nnx.state(model)))
    handlers = {"state": ocp.StandardCheckpointHandler(save_concurrent_gb=largest // 10**9 + 1),  # in 10^9 bytes
                "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=False, create=True)
    manager = ocp.CheckpointManager(os.path.abspath(pathlib.Path(cfg.out) / "checkpoints"), options=options,
                                    item_handlers=handlers)
    if manager.latest_step() is not None and not cfg.resume:
        raise ValueError(f"{cfg.out}/checkpoints already holds a run: pass --resume or choose another --out")
    return manager


def resume(cfg, manager, state: dict, shardings: dict):
    """With --resume, the newest train state that restores (same tree as `state`, into `shardings`):
    (step, state, data position); a newer one that does not (half-written, corrupted) is skipped with a
    warning naming it and why. Otherwise, or when there is none: (0, state, 0). None restoring, or a
    checkpoint written by another script or with other algorithm settings (same_run): one line."""
    import orbax.checkpoint as ocp
    steps = sorted(manager.all_steps(), reverse=True) if cfg.resume else []
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    broken = []
    for step in steps:
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            same_run(cfg, meta, manager.directory)  # before the state: another script's may not even fit
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax and tensorstore raise many types; all mean "not this one"
            broken.append(f"step {step} ({first_line(e)})")
            continue
        if broken:
            print(f"warning: checkpoint {', '.join(broken)} cannot be restored: resuming from step {step}",
                  file=sys.stderr)
        position = restored["meta"]["data_position"]
        print(f"resumed from step {step} (data position {position})", file=sys.stderr)
        return step, restored["state"], position
    if broken:
        fail(f"{manager.directory}: cannot restore the train state of any checkpoint (from another model or optimizer?): "
             f"{broken[0]}")
    return 0, state, 0


def same_run(cfg, meta: dict, directory) -> None:
    """--resume continues the run that wrote the checkpoint, or stops with one line: the same script (a copy
    of grpo.py is another run) and the same settings, but for the Config's RESUMABLE fields (steps, the
    cadences, devices)."""
    script = flags.script_name(type(cfg))
    if meta.get("script", script) != script:
        fail(f"{directory} holds a run of {meta['script']}.py, not of {script}.py: --resume continues only the script "
             "that wrote it (choose another --out)")
    saved, now = meta.get("config", {}), json.loads(json.dumps(dataclasses.asdict(cfg)))
    changed = [k for k in now if k not in cfg.RESUMABLE and k in saved and saved[k] != now[k]]
    if changed:
        k = changed[0]
        fail(f"{directory} was written with --{k.replace('_', '-')} {saved[k]!r}, this command has {now[k]!r}"
             + (f" (and {len(changed) - 1} more: {', '.join('--' + c.replace('_', '-') for c in changed[1:])})"
                if len(changed) > 1 else "")
             + f": --resume may change only {', '.join('--' + c.replace('_', '-') for c in sorted(cfg.RESUMABLE))}")


def save(cfg, manager, step: int, state: dict, data_position: int) -> None:
    """The train state (params, optimizer state: saved sharded as they live) and {data_position, script,
    config}. A save that fails (a full disk, a quota) ends the run with one line; the earlier checkpoints stay."""
    import orbax.checkpoint as ocp
    meta = {"data_position": data_position, "script": flags.script_name(type(cfg)), "config": dataclasses.asdict(cfg)}
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]  # orbax's own reports of a failed write
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    except Exception as e:  # OSError from Python, other types from tensorstore; the loggers stay quiet
        # orbax's writer threads are left mid-write and print tracebacks at interpreter exit: end here instead
        print(f"error: could not save the train state of step {step} in {manager.directory} ({first_line(e)}); "
              "the earlier checkpoints are intact", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# ----------------------------------------------------------------------------- metrics

class Progress:
    """The step loop's bookkeeping, the same in every script: the tqdm bar (main process only), which steps
    log, evaluate and save, the fields every record starts with, and the two ways a run ends early:

    - SIGTERM / SIGINT (preemption, Ctrl-C): the step finishes, is saved, one line says where, exit 0; a
      second signal stops at once. With several hosts orbax's preemption sync point decides instead
      (jax.distributed's own SIGTERM notice), so that every host saves the same step.
    - a loss or gradient norm that is not finite: one line naming the step and the metric; the step is not
      saved (checked at every log and save), so no checkpoint holds what made it."""

    def __init__(self, cfg, step: int, manager=None):
        self.last, self.logged, self.t0, self.phases = cfg.steps, step, time.perf_counter(), {}
        self.save_every, self.out, self.manager, self.signal = cfg.save_every, cfg.out, manager, None
        self.bar = tqdm(total=cfg.steps, initial=step, disable=not shard.is_main_process(), dynamic_ncols=True)
        self.previous = {sig: signal.signal(sig, self.on_signal)  # restored by close()
                         for sig in (signal.SIGTERM, signal.SIGINT)} if jax.process_count() == 1 else {}

    def on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal:
            print(f"\n{name} again: stopped at once (the newest checkpoint is kept)", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = name
        print(f"\n{name}: finishing this step, then saving it ({name} again stops at once)", file=sys.stderr)

    def stopping(self, step: int) -> bool:
        if self.manager is not None and jax.process_count() > 1 and self.manager.reached_preemption(step):
            self.signal = self.signal or "preemption"
        return self.signal is not None

    def due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.last

    def save_due(self, step: int, metrics: dict) -> bool:
        """Every --save-every steps, the last, and when stopping; a loss that is not finite ends the run first."""
        due = self.due(step, self.save_every) or self.stopping(step)
        if due:
            self.check_finite(step, metrics)
        return due

    def check_finite(self, step: int, metrics: dict) -> None:
        for name in ("loss", "grad_norm"):
            value = float(metrics[name]) if name in metrics else 0.0
            if not math.isfinite(value):
                kept = self.manager.latest_step() if self.manager is not None else None
                self.bar.close()
                fail(f"step {step}: {name} is {value}: stopped before saving it; " + (
                    "no checkpoint was saved yet" if kept is None else f"the newest checkpoint is step {kept}"))

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Seconds in a phase of the step (the caller waits for its results inside), logged per step as
        seconds_per_step/<phase> with the next record."""
        start = time.perf_counter()
        yield
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def record(self, step: int, metrics: dict, lr) -> dict:
        """step, loss, grad_norm, lr, seconds_per_step since the last record (its eval not counted) and the
        timed phases' seconds per step."""
        self.check_finite(step, metrics)
        steps, phases, self.phases = max(step - self.logged, 1), self.phases, {}
        return {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                "lr": float(lr), "seconds_per_step": (time.perf_counter() - self.t0) / steps,
                **{f"seconds_per_step/{phase}": seconds / steps for phase, seconds in phases.items()}}

    def close(self, step: int) -> None:
        """The bar closed; after a stop signal, one line saying where the step was saved, and exit 0."""
        self.bar.close()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.signal:
            print(f"stopped at step {step} by {self.signal}: the train state is saved in {self.out}/checkpoints/{step}; "
                  "--resume continues", file=sys.stderr)
            sys.exit(0)

    def write(self, log, record: dict, **shown) -> None:
        """The record to the log, `shown` beside the bar; the clock restarts."""
        log.write(record)
        self.bar.set_postfix(**shown)
        self.t0, self.logged = time.perf_counter(), record["step"]


class MetricsLog:
    """<out>/metrics.jsonl: one JSON object per write (floats rounded to 6 digits), appended, flushed
    at once, written by the main process only; a context manager, so it is closed on exit. With
    cfg.report_to, the same numbers also go to TensorBoard (<out>/tensorboard) and/or Weights & Biases
    (<out>/wandb; project $WANDB_PROJECT, default nanotune; WANDB_MODE=offline works without a network)."""

    def __init__(self, out, cfg=None):
        self.path = pathlib.Path(out) / "metrics.jsonl"
        self.file, self.reporters = None, []
        if shard.is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")
            names = [n for n in getattr(cfg, "report_to", "").split(",") if n]
            with user_errors():
                self.reporters = [reporter(name, pathlib.Path(out), cfg) for name in names]

    def write(self, record: dict) -> None:
        if self.file:
            record = {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            for report, _ in self.reporters:
                report(int(record["step"]), numbers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()
            for _, close in self.reporters:
                close()


def append_jsonl(path, records: list[dict]) -> None:
    """Records appended to a JSONL file (grpo's completions.jsonl), by the main process only."""
    if shard.is_main_process():
        with open(path, "a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)


def reporter(name: str, out: pathlib.Path, cfg):
    """--report-to's writers: (report(step, {name: number}), close)."""
    try:
        if name == "tensorboard":
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            writer = EventFileWriter(str(out / "tensorboard"))

            def report(step, numbers):
                values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in numbers.items()]
                writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                 summary=summary_pb2.Summary(value=values)))
                writer.flush()
            return report, writer.close
        import wandb
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanotune"), name=out.name, dir=str(out),
                         config=dataclasses.asdict(cfg) if cfg is not None else None)
        return (lambda step, numbers: run.log(numbers, step=step)), run.finish
    except ImportError:
        raise ValueError(f"--report-to {name} needs the {name} package: pip install {name}") from None


# ----------------------------------------------------------------------------- eval

def evaluate_completions(model, evals, tok, eval_nll) -> dict:
    """eval/loss and eval/accuracy on held-out {"prompt", "completion"} rows (sft, lora, dpo's and distill's
    eval/accuracy, the warm-ups' stopping test): the script's loss (eval_nll(batch) → summed loss, token count;
    None: not logged) over them in batches of 64, and greedy completions, ended at data.stop_ids, equal to
    the reference (whitespace-stripped)."""
    if not evals:
        return {}
    examples = [data.tokenize(row, tok) for row in evals] if eval_nll else []
    nll = count = 0.0
    for i in range(0, len(examples), 64):
        chunk = [[ex] for ex in examples[i:i + 64]]
        b_nll, b_count = eval_nll(data.collate(chunk, data.bucket_length(max(len(ex[0][0]) for ex in chunk), 1 << 20),
                                               data.pad_id(tok)))
        nll, count = nll + float(b_nll), count + float(b_count)
    max_new = max(len(tok.encode(row["completion"], add_bos=False)) for row in evals) + 1
    outs = sample.generate(model, [tok.encode(row["prompt"]) for row in evals], max_new_tokens=max_new,
                           eos_ids=data.stop_ids(tok, model.cfg))
    correct = [tok.decode(out).strip() == row["completion"].strip() for out, row in zip(outs, evals)]
    return {**({"eval/loss": nll / max(count, 1.0)} if eval_nll else {}), "eval/accuracy": float(np.mean(correct))}


# ----------------------------------------------------------------------------- export

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", tokenizer.BYTE_TOKENIZER_FILE)


def copy_tokenizer(loaded: Loaded, path) -> None:
    """The tokenizer files beside a saved model, so that it loads on its own."""
    if isinstance(loaded.tokenizer, tokenizer.ByteTokenizer):
        loaded.tokenizer.save(path)
    for name in TOKENIZER_FILES if loaded.directory else ():
        if (loaded.directory / name).is_file():
            shutil.copy(loaded.directory / name, pathlib.Path(path) / name)


# Every process calls the exports: the parameters are gathered whole on each (a collective), process 0 writes.

def export_hf(model, path, loaded: Loaded) -> None:
    """A Hugging Face checkpoint that transformers loads (config.json, safetensors, tokenizer files)."""
    model = shard.gather_model(model)
    if shard.is_main_process():
        model.cfg = model.cfg.replace(remat=False)
        ckpt.save_hf(model, path)
        copy_tokenizer(loaded, path)


def export_peft(model, path, loaded: Loaded) -> None:
    """The adapters alone, in PEFT's layout (`peft.PeftModel.from_pretrained(hf_model, path)`)."""
    model = shard.gather_model(model)
    if shard.is_main_process():
        ckpt.save_peft(model, path, base_model=str(loaded.directory) if loaded.directory else None)
        copy_tokenizer(loaded, path)


def export_policy(final, out, loaded: Loaded, lora: bool, seconds: float) -> None:
    """The final policy (grpo, dpo, distill) as a Hugging Face checkpoint in out/hf; with LoRA, merged, and
    the adapters alone in PEFT's layout in out/adapter."""
    out, saved = pathlib.Path(out), [pathlib.Path(out) / "hf"]
    if lora:
        export_peft(final, out / "adapter", loaded)
        final, saved = adapters.merge_lora(final), saved + [out / "adapter"]
    export_hf(final, out / "hf", loaded)
    if shard.is_main_process():
        print(f"saved {', '.join(map(str, saved))}; metrics in {out / 'metrics.jsonl'} ({seconds:.0f} s)",
              file=sys.stderr)


# ----------------------------------------------------------------------------- the demos' supervised warm-up

def warm_up(cfg, loaded, model, examples, rows, mesh, max_len: int, accuracy=None):
    """The supervised warm-up of grpo's and dpo's demos (--warmup-sft-*): a random policy earns no reward and
    prefers nothing, and one caught mid-learning (not annealed) still has unsure answers for the algorithm to
    sort out. It stops once greedy accuracy on the first --eval-examples training `rows` ({"prompt",
    "completion"}) reaches --warmup-sft-target, and is saved to <out>/warmup_sft: π_ref, which --resume
    reloads instead of training again. accuracy(model) replaces that test where a completion is more than one
    greedy turn (grpo's tool demo). Returns the model and what step 0 logs of the warm-up."""
    saved = pathlib.Path(cfg.out) / "warmup_sft"
    if cfg.resume and (saved / "config.json").is_file():
        print(f"the supervised warm-up is the one in {saved}", file=sys.stderr)
        with user_errors():
            return shard.shard_model(ckpt.load_hf(saved, dtype=cfg.dtype, param_dtype="float32", remat=cfg.remat),
                                     mesh), {}
    print(f"warm-up: supervised steps until greedy accuracy on training prompts reaches {cfg.warmup_sft_target} "
          f"(at most {cfg.warmup_sft_steps})", file=sys.stderr)
    rows, tok = rows[:cfg.eval_examples], loaded.tokenizer
    plan = Supervised(cfg.warmup_sft_steps, cfg.warmup_sft_lr, cfg.warmup_sft_batch_size, max_len,
                      cfg.warmup_sft_target, cfg.seed)
    accuracy = accuracy or (lambda m: evaluate_completions(m, rows, tok, None)["eval/accuracy"])
    return train_supervised(model, examples, plan, accuracy, mesh, saved, loaded)


class Supervised(NamedTuple):
    """A short supervised training (a warm-up, distill's demo teacher)."""
    steps: int  # at most this many steps
    lr: float  # the learning rate after a 10-step ramp, then constant
    batch_size: int  # sequences per step
    max_len: int  # tokens per sequence at most
    target: float  # stop once accuracy(model) reaches this (checked every 10 steps)
    seed: int  # the examples' order


def train_supervised(model, examples, plan: Supervised, accuracy, mesh, save_to=None, loaded=None):
    """The mean NLL of the examples' target tokens (sft.py's loss), AdamW at plan.lr·(n + 1)/11 for the first
    10 updates n, then plan.lr; stopped once accuracy(model) reaches plan.target or after plan.steps; saved to
    save_to with loaded's tokenizer files. → the model, {"warmup_sft/steps", "warmup_sft/train_accuracy"}."""
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    schedule = lambda n: plan.lr * jnp.minimum((n + 1) / 11, 1.0)  # noqa: E731
    tx = optax.chain(clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))

    def loss_fn(params, frozen, batch, key):  # Σ m·(−log p) / Σ m over the batch's target tokens
        model, tokens = nnx.merge(graphdef, params, frozen), batch["tokens"]
        x = model_lib.next_token_hidden(model, tokens, batch["positions"], batch["segment_ids"], tokens.shape[1] - 1)
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        nll = logprobs.weighted_nll(x, model.head(model.cfg.param_dtype), tokens[:, 1:], mask,
                                    cap=model.cfg.final_softcap)
        return nll / jnp.maximum(jnp.sum(mask), 1.0), {}
    opt_state, param_sh, opt_sh = init_optimizer(tx, params, mesh)
    step = jax.jit(make_update(loss_fn, tx), donate_argnums=(0, 1), out_shardings=(param_sh, opt_sh, None, None))
    batches = data.Batches(examples, plan.batch_size, plan.max_len, seed=plan.seed,
                           pad_id=data.pad_id(loaded.tokenizer) if loaded else 0)
    bar, score = tqdm(range(1, plan.steps + 1), desc="warm-up (SFT)", disable=not shard.is_main_process()), 0.0
    for i in bar:
        params, opt_state, _, _ = step(params, opt_state, frozen, shard.micro_batches(next(batches), mesh, 1), None)
        if i % 10 == 0:
            score = accuracy(nnx.merge(graphdef, params, frozen))
            bar.set_postfix(train_accuracy=score)
            if score >= plan.target:
                break
    bar.close()
    model = shard.shard_model(nnx.merge(graphdef, params, frozen), mesh)
    whole = shard.gather_model(model) if save_to else None  # every process takes part; process 0 writes
    if save_to and shard.is_main_process():
        ckpt.save_hf(whole, save_to)
        copy_tokenizer(loaded, save_to)
        print(f"warm-up done: {i} steps, training-prompt accuracy {score:.3f}; saved {save_to}", file=sys.stderr)
    return model, {"warmup_sft/steps": i, "warmup_sft/train_accuracy": score}


# ----------------------------------------------------------------------------- a cache of computed arrays

def cached_arrays(directory, key_parts, compute, what: str = "arrays") -> dict[str, np.ndarray]:
    """compute() → {name: array}, stored once in directory/<sha256 of key_parts>.npz and read back on
    later calls with the same key (dpo's reference log-probs, distill's teacher top-K): numpy arrays only, never pickles. The
    file is written to a temporary name, then renamed, so a killed run never leaves half a cache. Says on
    stderr (`what`) whether they were computed or read."""
    digest = hashlib.sha256()
    for part in key_parts:
        digest.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
        digest.update(b"\0")
    path = pathlib.Path(directory).expanduser() / f"{digest.hexdigest()[:32]}.npz"
    if shard.agreed(path.is_file()):  # process 0's answer for all: computing takes every process
        with np.load(path, allow_pickle=False) as stored:
            print(f"{what}: read from {path}", file=sys.stderr)
            return {k: stored[k] for k in stored.files}
    arrays = compute()
    print(f"{what}: computed, cached in {path}", file=sys.stderr)
    if shard.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial.npz")  # two runs sharing a cache each write their own
        np.savez(partial, **arrays)
        partial.replace(path)
    return arrays


def top_logps(model, splits: dict, k: int, temperature: float, V: int, pad_id: int) -> dict[str, np.ndarray]:
    """The model's k most likely tokens and their log-probs (softmax(logits[:V] / temperature)) at every target
    token of each split's examples [(ids, loss_mask)]: {split/ids, split/logps [tokens, k], split/offsets
    [n + 1]}, example i's rows at offsets[i]:offsets[i + 1] (distill.py's cached teacher)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, b):  # [B, T - 1, k] of a collated batch
        model = nnx.merge(graphdef, state)
        x = model_lib.next_token_hidden(model, b["tokens"], b["positions"], b["segment_ids"], b["tokens"].shape[1] - 1)
        return logprobs.per_position(lambda z: jax.lax.top_k(jax.nn.log_softmax(z[:, :V] / temperature, axis=-1), k),
                                     x, model.head(model.cfg.param_dtype), cap=model.cfg.final_softcap)
    out = {}
    for split, examples in splits.items():
        ids, logps, offsets = [], [], [0]
        for i in range(0, len(examples), 64):
            chunk = examples[i:i + 64]
            b = data.collate([[ex] for ex in chunk], data.bucket_length(max(len(e[0]) for e in chunk), 1 << 20), pad_id)
            values, top_ids = jax.device_get(shard.gather(score(state, b)))  # b: numpy, the same on every host
            for r in range(len(chunk)):
                where = np.flatnonzero(b["loss_mask"][r, 1:])
                ids.append(top_ids[r, where])
                logps.append(values[r, where])
                offsets.append(offsets[-1] + len(where))
        out.update({f"{split}/ids": np.concatenate(ids).astype(np.int32), f"{split}/offsets": np.array(offsets),
                    f"{split}/logps": np.concatenate(logps).astype(np.float32)})
    return out


# ----------------------------------------------------------------------------- the update

def make_update(loss_fn, tx):
    """One optimizer step over a batch of micro-batches [M, b, ...] (a scan: one micro-batch's activations
    live at a time). loss_fn(params, frozen, micro_batch, key) → (the micro-batch's share of the step's
    loss, aux: a dict of arrays): the losses and their gradients are summed over micro-batches, so a loss
    that is a mean over the step divides by the step's count itself (the script says which count). Only
    `params` are differentiated and updated; `frozen` (the rest of the model) is read. key: split into one
    per micro-batch (LoRA dropout); None passes None. With one micro-batch there is no accumulator: the
    step holds one gradient-sized buffer, not two (at Gemma 3 270M, 1 GiB each).

    Returns update(params, opt_state, frozen, batch, key) → params, opt_state, metrics (loss, grad_norm),
    aux stacked over micro-batches [M, ...]."""
    def update(params, opt_state, frozen, batch, key):
        M = jax.tree.leaves(batch)[0].shape[0]
        keys = None if key is None else jax.random.split(key, M)
        if M == 1:
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, frozen, *jax.tree.map(lambda x: x[0], (batch, keys)))
            aux = jax.tree.map(lambda x: x[None], aux)
        else:
            def micro(grads, mb_key):
                (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, *mb_key)
                return jax.tree.map(jnp.add, grads, g), (loss, aux)

            grads, (losses, aux) = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), (batch, keys))
            loss = jnp.sum(losses)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics, aux
    return update
