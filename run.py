"""run.py — the run plumbing every algorithm script shares. Nothing in this file is an algorithm.

What is the same in sft.py, lora.py and grpo.py lives here once, so that each script holds its
algorithm alone (its loss, its step, what it logs):

    flags        parse_flags: the CLI generated from a script's Config dataclass, help from each
                 field's comment, defaults shown, grouped by the comment lines inside the class
    loading      load: model + tokenizer for --model / --ckpt (and the chat-template family)
    optimizer    adamw: AdamW with global-norm clipping, linear warmup then cosine decay
    train state  checkpoints / resume / save: orbax train states in <out>/checkpoints
    metrics      MetricsLog: <out>/metrics.jsonl, one JSON object per logged step, closed on exit;
                 evaluate_completions: eval/loss and greedy eval/accuracy on held-out rows
    export       export_hf / export_peft: the final model (or adapters) with its tokenizer files
    the update   make_update: one jitted optimizer step over (params, frozen) with gradients
                 accumulated over micro-batches and normalised by the step's token count

Arrows point down: scripts import run; run imports adapters, ckpt, data, sample and shard, never a script.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import math
import os
import pathlib
import signal
import shutil
import sys
import textwrap
import time
import tokenize
import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import adapters
import ckpt
import data
import sample
import shard


# ----------------------------------------------------------------------------- flags

def config_comments(config_class) -> tuple[dict[str, str], dict[str, str]]:
    """Each field's trailing comment (its --help text) and the group it sits in: a comment alone on a
    line inside the class body starts a group ("# sampling"), for the fields below it. Base classes first."""
    helps, groups = {}, {}
    for klass in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        group, lines = "options", {}
        for token in tokenize.generate_tokens(io.StringIO(inspect.getsource(klass)).readline):
            row = token.start[0]
            if token.type == tokenize.COMMENT and (row in lines or token.start[1] == 4):  # a field's, or a group's
                lines.setdefault(row, []).append(("comment", token.string.lstrip("# ").strip()))
            elif token.type == tokenize.NAME and token.start[1] == 4 and row not in lines:
                lines[row] = [("name", token.string)]
        for row in sorted(lines):
            (kind, text), *rest = lines[row]
            if kind == "comment" and text:
                group = text
            elif kind == "name":  # a field redefined in a subclass keeps its base's group
                groups.setdefault(text, group)
                helps[text] = rest[0][1] if rest else helps.get(text, "")
    fields = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in helps.items() if k in fields}, {k: v for k, v in groups.items() if k in fields}


@dataclasses.dataclass
class RunConfig:
    """The flags every script has, with the same meaning and default; a script's Config subclasses it and
    adds its own (--help lists these last in their groups)."""
    # model
    init: str = "pretrained"  # a real preset's weights (HF cache, else downloaded); random: random weights (benchmarks)
    # optimisation
    clip: float = 1.0  # global gradient-norm clip
    dtype: str = ""  # compute dtype: float32 or bfloat16 (params stay float32); "": bfloat16 with --tpu, else float32
    remat: bool = False  # backward pass keeps only each block's input, recomputing the rest (least memory)
    # logging and checkpoints
    keep: int = 2  # checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl lines
    report_to: str = ""  # also log to tensorboard and/or wandb, comma-separated (optional installs)
    resume: bool = False  # continue from the newest checkpoint in --out
    # devices
    mesh: str = ""  # device mesh, e.g. data=1,fsdp=-1,tp=1 (default: all devices on fsdp)
    tpu: bool = False  # multi-host TPU start-up (jax.distributed)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _split_lines(self, text, width):  # wrap at spaces only: "built-in" stays one word
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit status 2 (not usage + message)
        fail(f"{message} (see --help)", status=2)


def parse_flags(config_class, argv=None):
    """The script's Config from the command line (`--batch-size 8`; booleans `--pack` / `--no-pack`),
    then, with --tpu, the multi-host start-up. Bad flags and out-of-range values (the Config's
    __post_init__ raises ValueError) end in one line on stderr and exit status 2."""
    module = sys.modules[config_class.__module__]
    parser = _Parser(description=(module.__doc__ or "").strip(), formatter_class=_Formatter)
    helps, groups = config_comments(config_class)
    hints = typing.get_type_hints(config_class)
    sections = {}
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    fields = sorted(dataclasses.fields(config_class), key=lambda f: f.name in shared)  # the script's own first
    for field in fields:
        name = groups.get(field.name, "options")
        section = sections.get(name) or sections.setdefault(name, parser.add_argument_group(name))
        flag, kind = "--" + field.name.replace("_", "-"), hints[field.name]
        default = '""' if field.default == "" else field.default
        text = f"{helps.get(field.name, '')} (default: {default})".replace("%", "%%")
        if kind is bool:
            section.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None → X
        section.add_argument(flag, type=base, default=field.default, metavar=base.__name__.upper(), help=text)
    try:
        cfg = config_class(**vars(parser.parse_args(argv)))  # __post_init__ fills defaults, checks ranges
        check_report_to(cfg.report_to)
    except ValueError as e:
        fail(str(e), status=2)
    if getattr(cfg, "tpu", False):
        shard.init_tpu()
    return cfg


def fill_defaults(cfg) -> None:
    """A Config's __post_init__ calls this first: its fields left None take their value from the class's
    AUTO table, {field: (random tiny model, pretrained checkpoint)}; dtype "" becomes bfloat16 with --tpu,
    else float32."""
    pretrained = starts_pretrained(vars(cfg))
    for name, values in getattr(cfg, "AUTO", {}).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, values[pretrained])
    cfg.dtype = cfg.dtype or ("bfloat16" if cfg.tpu else "float32")


def starts_pretrained(args: dict) -> bool:
    """Whether the run starts from a trained checkpoint (--ckpt, or a real preset with --init pretrained),
    whose settings differ from a random tiny model's (a script's Config.AUTO: field → (tiny, pretrained))."""
    return bool(args.get("ckpt")) or (ckpt.hub_repo(args["model"]) is not None and args["init"] != "random")


def check_report_to(report_to: str) -> None:
    unknown = [name for name in report_to.split(",") if name and name not in ("tensorboard", "wandb")]
    if unknown:
        raise ValueError(f"--report-to takes tensorboard and/or wandb, got {', '.join(unknown)}")


def positive(cfg, *names: str) -> list[tuple[bool, str]]:
    """Checks for `check`: each named field is >= 1."""
    return [(getattr(cfg, n) >= 1, f"--{n.replace('_', '-')} must be >= 1, got {getattr(cfg, n)}") for n in names]


def check(conditions: list[tuple[bool, str]]) -> None:
    """A Config's range checks (its __post_init__): the first condition that fails raises ValueError
    with its message, which parse_flags prints as one line."""
    for ok, message in conditions:
        if not ok:
            raise ValueError(message)


def fail(message: str, status: int = 1):
    """User error: one line on stderr and a non-zero exit, never a traceback (status 1: SystemExit
    carries the line; 2, bad flags: the line is printed and the code is 2, as argparse does)."""
    if status == 1:
        sys.exit(f"error: {message}")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


@contextlib.contextmanager
def user_errors():
    """Bad input raised as ValueError or OSError (CheckpointError, DataError, TokenizerError,
    MeshError are ValueErrors) inside the block ends the run with one line."""
    try:
        yield
    except (ValueError, OSError) as e:
        fail(str(e))


# ----------------------------------------------------------------------------- loading

class Loaded(NamedTuple):
    model: object  # model.Transformer
    tokenizer: object  # data.ByteTokenizer | HFTokenizer | SentencePieceTokenizer
    source: str  # where the weights came from (a directory, or "random <preset>")
    directory: pathlib.Path | None  # the checkpoint directory; None for random weights
    family: str | None  # the chat-template family (None: no checkpoint, byte-level tokenizer)


def load(cfg, **overrides) -> Loaded:
    """The model of --ckpt, else of the --model preset (local HF cache, else random weights), in
    cfg.dtype with float32 parameters, and its tokenizer (the byte-level one when there is no directory)."""
    model, source, directory = ckpt.load_model(cfg.model, ckpt=cfg.ckpt, dtype=cfg.dtype, param_dtype="float32",
                                               seed=cfg.seed, init=cfg.init, remat=cfg.remat, **overrides)
    return Loaded(model, data.load_tokenizer(directory), source, directory, model.cfg.family if directory else None)


def announce(loaded: Loaded, params, mesh, detail: str, cfg=None) -> None:
    """On stderr (main process), as the run starts: the model's source, what trains, the data, the mesh;
    and the settings that depend on the start (the Config's AUTO fields and dtype), as they are in effect."""
    if shard.is_main_process():
        print(f"model: {loaded.source}, training {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.3f}M "
              f"parameters; {detail}; mesh {dict(mesh.shape)}", file=sys.stderr)
        if cfg is not None:
            start = "pretrained" if starts_pretrained(vars(cfg)) else "tiny"
            print(f"settings ({start} defaults for what the flags leave unset): " + ", ".join(
                f"{k} {getattr(cfg, k)!r}" if isinstance(getattr(cfg, k), str) else f"{k} {getattr(cfg, k)}"
                for k in [*getattr(cfg, "AUTO", {}), "dtype"]), file=sys.stderr)


# ----------------------------------------------------------------------------- optimizer

def adamw(cfg, updates: int):
    """AdamW (cfg.lr, cfg.weight_decay) after clipping the global gradient norm to cfg.clip; the rate
    ramps up linearly over cfg.warmup of the updates, then decays to 0 by a cosine. → (tx, schedule)"""
    ramp = max(1, int(cfg.warmup * updates))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, ramp, max(updates, ramp + 1))
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

def checkpoints(cfg):
    """The orbax manager of <out>/checkpoints, keeping the newest --keep steps (each save is written to a
    temporary directory and renamed when complete: a crash mid-save never leaves a broken newest one);
    refuses to write over an earlier run unless --resume."""
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=False, create=True)
    manager = ocp.CheckpointManager(os.path.abspath(pathlib.Path(cfg.out) / "checkpoints"), options=options)
    if manager.latest_step() is not None and not cfg.resume:
        raise ValueError(f"{cfg.out}/checkpoints already holds a run: pass --resume or choose another --out")
    return manager


def resume(cfg, manager, state: dict, shardings: dict):
    """With --resume, the newest train state that restores (same tree as `state`, into `shardings`):
    (step, state, data position); a newer one that does not (half-written, corrupted) is skipped with a
    warning naming it and why. Otherwise, or when there is none: (0, state, 0). None restoring: one line."""
    import orbax.checkpoint as ocp
    steps = sorted(manager.all_steps(), reverse=True) if cfg.resume else []
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    broken = []
    for step in steps:
        try:
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


def save(cfg, manager, step: int, state: dict, data_position: int) -> None:
    """The train state (params, optimizer state: saved sharded as they live) and {data_position, config}.
    A save that fails (a full disk, a quota) ends the run with one line; the earlier checkpoints stay."""
    import orbax.checkpoint as ocp
    meta = {"data_position": data_position, "config": dataclasses.asdict(cfg)}
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
        self.last, self.logged, self.t0 = cfg.steps, step, time.perf_counter()
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

    def record(self, step: int, metrics: dict, lr) -> dict:
        """step, loss, grad_norm, lr, and seconds_per_step since the last record (its eval not counted)."""
        self.check_finite(step, metrics)
        return {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                "lr": float(lr), "seconds_per_step": (time.perf_counter() - self.t0) / max(step - self.logged, 1)}

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
    """What sft.py and lora.py log on held-out {"prompt", "completion"} rows: eval/loss, the script's loss
    (eval_nll(batch) → summed loss, token count; None: not logged) over them in batches of 64, and
    eval/accuracy, greedy completions equal to the reference (whitespace-stripped)."""
    if not evals:
        return {}
    examples = [data.tokenize(row, tok) for row in evals] if eval_nll else []
    nll = count = 0.0
    for i in range(0, len(examples), 64):
        chunk = [[ex] for ex in examples[i:i + 64]]
        b_nll, b_count = eval_nll(data.collate(chunk, data.bucket_length(max(len(ex[0][0]) for ex in chunk), 1 << 20),
                                               tok.pad_id))
        nll, count = nll + float(b_nll), count + float(b_count)
    max_new = max(len(tok.encode(row["completion"], add_bos=False)) for row in evals) + 1
    outs = sample.generate(model, [tok.encode(row["prompt"]) for row in evals], max_new_tokens=max_new,
                           eos_ids=tok.eos_ids)
    correct = [tok.decode(out).strip() == row["completion"].strip() for out, row in zip(outs, evals)]
    return {**({"eval/loss": nll / max(count, 1.0)} if eval_nll else {}), "eval/accuracy": float(np.mean(correct))}


# ----------------------------------------------------------------------------- export

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", data.BYTE_TOKENIZER_FILE)


def copy_tokenizer(loaded: Loaded, path) -> None:
    """The tokenizer files beside a saved model, so that it loads on its own."""
    if isinstance(loaded.tokenizer, data.ByteTokenizer):
        loaded.tokenizer.save(path)
    for name in TOKENIZER_FILES if loaded.directory else ():
        if (loaded.directory / name).is_file():
            shutil.copy(loaded.directory / name, pathlib.Path(path) / name)


def export_hf(model, path, loaded: Loaded) -> None:
    """A Hugging Face checkpoint that transformers loads (config.json, safetensors, tokenizer files)."""
    model.cfg = model.cfg.replace(remat=False)
    ckpt.save_hf(model, path)
    copy_tokenizer(loaded, path)


def export_peft(model, path, loaded: Loaded) -> None:
    """The adapters alone, in PEFT's layout (`peft.PeftModel.from_pretrained(hf_model, path)`)."""
    ckpt.save_peft(model, path, base_model=str(loaded.directory) if loaded.directory else None)
    copy_tokenizer(loaded, path)


def export_policy(final, out, loaded: Loaded, lora: bool, seconds: float) -> None:
    """grpo.py's and dpo.py's final policy as a Hugging Face checkpoint in out/hf; with LoRA, merged, and
    the adapters alone in PEFT's layout in out/adapter."""
    out, saved = pathlib.Path(out), [pathlib.Path(out) / "hf"]
    if lora:
        export_peft(final, out / "adapter", loaded)
        final, saved = adapters.merge_lora(final), saved + [out / "adapter"]
    export_hf(final, out / "hf", loaded)
    print(f"saved {', '.join(map(str, saved))}; metrics in {out / 'metrics.jsonl'} ({seconds:.0f} s)", file=sys.stderr)


# ----------------------------------------------------------------------------- a cache of computed arrays

def cached_arrays(directory, key_parts, compute, what: str = "arrays") -> dict[str, np.ndarray]:
    """compute() → {name: array}, stored once in directory/<sha256 of key_parts>.npz and read back on
    later calls with the same key (dpo.py's reference log-probs): numpy arrays only, never pickles. The
    file is written to a temporary name, then renamed, so a killed run never leaves half a cache. Says on
    stderr (`what`) whether they were computed or read."""
    digest = hashlib.sha256()
    for part in key_parts:
        digest.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
        digest.update(b"\0")
    path = pathlib.Path(directory).expanduser() / f"{digest.hexdigest()[:32]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            print(f"{what}: read from {path}", file=sys.stderr)
            return {k: stored[k] for k in stored.files}
    arrays = compute()
    print(f"{what}: computed, cached in {path}", file=sys.stderr)
    if shard.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, **arrays)
        partial.replace(path)
    return arrays


# ----------------------------------------------------------------------------- the update

def make_update(loss_fn, tx, normalise: bool = True):
    """One optimizer step over a batch of micro-batches [A, b, ...] (a scan: one micro-batch's
    activations live at a time). loss_fn(params, frozen, micro_batch, key) → (loss summed over the
    micro-batch, aux: a dict of arrays holding "tokens", the count that sum runs over). Only `params`
    are differentiated and updated; `frozen` (the rest of the model) is read. normalise: divide the
    summed gradients and loss by the whole step's token count (else the loss is already a mean).
    key: split into one per micro-batch (LoRA dropout); None passes None.

    With one micro-batch there is no accumulator and the loss is divided by its token count before
    it is differentiated, so the step holds one gradient-sized buffer, not three (the accumulator,
    the micro-batch's gradient, their quotient: at Gemma 3 270M, 1 GiB each).

    Returns update(params, opt_state, frozen, batch, key) → params, opt_state, metrics (loss,
    grad_norm, tokens), aux stacked over micro-batches [A, ...]."""
    def update(params, opt_state, frozen, batch, key):
        A = jax.tree.leaves(batch)[0].shape[0]
        keys = None if key is None else jax.random.split(key, A)
        if A == 1:
            def mean_loss(params, micro_batch, mb_key):
                loss, aux = loss_fn(params, frozen, micro_batch, mb_key)
                return loss / (jnp.maximum(jax.lax.stop_gradient(aux["tokens"]), 1.0) if normalise else 1.0), aux
            (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(
                params, *jax.tree.map(lambda x: x[0], (batch, keys)))
            tokens, aux = aux["tokens"], jax.tree.map(lambda x: x[None], aux)
        else:
            def micro(grads, mb_key):
                (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, *mb_key)
                return jax.tree.map(jnp.add, grads, g), (loss, aux)

            grads, (losses, aux) = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), (batch, keys))
            tokens = jnp.sum(aux["tokens"])
            scale = 1.0 / jnp.maximum(tokens, 1.0) if normalise else 1.0  # a product XLA folds into the optimizer
            grads, loss = jax.tree.map(lambda g: g * scale, grads), jnp.sum(losses) * scale
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": tokens}
        return optax.apply_updates(params, updates), opt_state, metrics, aux
    return update
