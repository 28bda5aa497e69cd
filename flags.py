"""flags.py — a script's command line, made from its Config dataclass, and its one-line errors.

Every script (sft, lora, dpo, grpo, distill, sample, serve) writes its knobs once, as the fields of a
dataclass with a comment each; `parse` turns them into flags and --help:

    @dataclasses.dataclass
    class Config(flags.RunConfig):
        # -- sampling --                                       a group heading in --help
        num_generations: int = 8  # G, completions per prompt  the field's help text
        # the upper clip (DAPO's clip-higher); None: epsilon    or its help, on the line(s) above it
        epsilon_high: float | None = None

A comment that is neither (help text written both above and after a field, or a field with none) stops
the script at start-up with one line saying where: --help never silently lies. Fields left None take
their defaults from the class's AUTO table, one for a random tiny model and one for a pretrained
checkpoint; --help shows both. Bad input anywhere in a run ends in one line on stderr (`fail`), never
a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import pathlib
import re
import sys
import textwrap
import tokenize
import typing

import ckpt
import shard

GROUP = re.compile(r"^--\s*(.+?)\s*--$")  # "# -- sampling --" heads a group


class ConfigError(ValueError):
    """A Config whose comments cannot become --help (the message names the file and line)."""


# ----------------------------------------------------------------------------- the flags every script has

@dataclasses.dataclass
class RunConfig:
    """The flags every training script has, with the same meaning; a script's Config subclasses it and
    adds its own (--help lists these last in their groups)."""
    # -- model --
    init: str = "pretrained"  # a real preset's weights (HF cache, else downloaded); random: random weights (benchmarks)
    # -- optimisation --
    clip: float = 1.0  # global gradient-norm clip
    dtype: str = ""  # compute dtype: float32 or bfloat16 (params stay float32); "": bfloat16 with --tpu, else float32
    remat: bool = False  # backward pass keeps only each block's input, recomputing the rest (least memory)
    router_aux_loss_coef: float | None = None  # MoE: weight of the router's load-balancing loss (None: the model's)
    # -- logging and checkpoints --
    out: str = ""  # output directory ("": runs/<the running script's file name>, so a copy is its own run)
    keep: int = 2  # checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl lines
    report_to: str = ""  # also log to tensorboard and/or wandb, comma-separated (optional installs)
    resume: bool = False  # continue from the newest checkpoint in --out (same script, same algorithm settings)
    # -- devices --
    mesh: str = ""  # device mesh, e.g. data=1,fsdp=-1,tp=1 ("": all devices on fsdp)
    tpu: bool = False  # multi-host TPU start-up (jax.distributed)
    # -- several processes (hosts) --
    coordinator: str = ""  # HOST:PORT of process 0, which listens there; every process passes the same one
    num_processes: int = 1  # processes in the run, with --coordinator
    process_id: int = 0  # this process's number, 0 .. num_processes - 1, with --coordinator
    distributed: bool = False  # jax.distributed finds the processes itself (SLURM, Open MPI, TPU pod, Kubernetes)
    join_timeout: int = 300  # seconds to wait for every process to join; then one line and exit 2

    # The fields a resumed run may change: how long it runs, how often it logs, evaluates and saves, where
    # and on what devices. Any other difference from the checkpoint's saved settings changes the algorithm,
    # and --resume refuses it (run.resume).
    RESUMABLE: typing.ClassVar[frozenset] = frozenset({
        "steps", "eval_every", "save_every", "log_every", "keep", "report_to", "resume", "out", "mesh", "tpu",
        "coordinator", "num_processes", "process_id", "distributed", "join_timeout"})


@dataclasses.dataclass
class WarmUpConfig:
    """The flags of the supervised warm-up (run.warm_up) that grpo's and dpo's demos need: a random policy earns
    no reward and prefers nothing."""
    # -- supervised warm-up (the built-in task from random weights) --
    warmup_sft_steps: int | None = None  # most supervised steps first (None: 500 on the task from scratch, else 0)
    warmup_sft_target: float = 0.3  # the warm-up stops once greedy accuracy on training prompts reaches this
    warmup_sft_lr: float = 3e-3  # warm-up learning rate (constant after a 10-step ramp)
    warmup_sft_batch_size: int | None = None  # warm-up sequences per step (None: 128; grpo's tool demo 32)


@dataclasses.dataclass
class LoRAConfig:
    """The LoRA flags of the RL scripts (grpo, dpo): adapters trained on a frozen base, which is the reference."""
    # -- LoRA --
    lora: bool = False  # train LoRA adapters only; the reference is the base (adapters off)
    lora_rank: int = 8  # LoRA r
    lora_alpha: float = 16.0  # LoRA scale numerator (alpha / r)


def script_name(config_class) -> str:
    """The file name, without .py, of the script that defines the Config ("grpo"; a copy: "my_grpo")."""
    return pathlib.Path(sys.modules[config_class.__module__].__file__).stem


def fill_defaults(cfg) -> None:
    """A Config's __post_init__ calls this first: its fields left None take their value from the class's
    AUTO table, {field: (random tiny model, pretrained checkpoint)}; dtype "" becomes bfloat16 with --tpu,
    else float32; out "" becomes runs/<script name>; then the shared fields' ranges are checked."""
    pretrained = starts_pretrained(vars(cfg))
    for name, values in getattr(cfg, "AUTO", {}).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, values[pretrained])
    cfg.dtype = cfg.dtype or ("bfloat16" if cfg.tpu else "float32")
    cfg.out = cfg.out or f"runs/{script_name(type(cfg))}"
    if getattr(cfg, "warmup_sft_steps", 0) is None:  # a warm-up is for the built-in task from random weights
        cfg.warmup_sft_steps = 0 if pretrained or cfg.ckpt or cfg.data else 500
    if getattr(cfg, "warmup_sft_batch_size", 0) is None:
        cfg.warmup_sft_batch_size = 128
    check_shared(cfg)


# the counts every script that has them needs >= 1, and the ranges of the optimisation knobs they share
COUNTS = ("steps", "batch_size", "grad_accum", "max_len", "eval_every", "save_every", "keep", "log_every",
          "train_examples", "eval_examples", "lora_rank", "warmup_sft_batch_size")


def check_shared(cfg) -> None:
    """The range checks of the fields scripts share (their own fields are checked in their __post_init__)."""
    has = lambda *names: all(hasattr(cfg, n) for n in names)  # noqa: E731
    check(positive(cfg, *(n for n in COUNTS if hasattr(cfg, n))) + [
        (cfg.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}"),
        (cfg.lr > 0 and 0 <= cfg.warmup < 1 and cfg.clip > 0 and cfg.weight_decay >= 0,
         "need --lr > 0, 0 <= --warmup < 1, --clip > 0, --weight-decay >= 0"),
        (not has("batch_size", "grad_accum") or cfg.batch_size % cfg.grad_accum == 0,
         f"--batch-size must be a multiple of --grad-accum, got {getattr(cfg, 'batch_size', 0)} and "
         f"{getattr(cfg, 'grad_accum', 1)}"),
        (not has("warmup_sft_lr") or (cfg.warmup_sft_lr > 0 and cfg.warmup_sft_steps >= 0),
         "need --warmup-sft-lr > 0 and --warmup-sft-steps >= 0"),
        (cfg.router_aux_loss_coef is None or cfg.router_aux_loss_coef >= 0, "need --router-aux-loss-coef >= 0")])


def starts_pretrained(args: dict) -> bool:
    """Whether the run starts from a trained checkpoint (--ckpt, or a real preset with --init pretrained),
    whose settings differ from a random tiny model's (a script's Config.AUTO: field → (tiny, pretrained))."""
    return bool(args.get("ckpt")) or (ckpt.hub_repo(args["model"]) is not None and args["init"] != "random")


# ----------------------------------------------------------------------------- comments → --help

def config_comments(config_class) -> tuple[dict[str, str], dict[str, str]]:
    """Each field's help text and the group it sits in, read from the class bodies (base classes first):
    `# -- name --` alone on a line starts a group; a field's help is the comment after it, or the comment
    lines right above it. Raises ConfigError for a field with help in both places or in neither."""
    helps, groups, where = {}, {}, {}
    for klass in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source, first = inspect.getsourcelines(klass)
        own = set(vars(klass).get("__annotations__", {})) & {f.name for f in dataclasses.fields(klass)}
        group, above, line = "options", [], None  # line: [name, row, its comment] of the statement being read
        for token in tokenize.generate_tokens(io.StringIO("".join(source)).readline):
            row, col = token.start
            if token.type == tokenize.COMMENT:
                text = token.string.lstrip("#").strip()
                if line and row == line[1]:
                    line[2] = text
                elif col == 4 and line is None:  # alone on its line, at the fields' indentation
                    heading = GROUP.match(text)
                    group, above = (heading.group(1), []) if heading else (group, above + [text])
            elif token.type == tokenize.NAME and col == 4 and line is None:
                line = [token.string, row, ""]
            elif token.type == tokenize.NEWLINE and line:
                name, row, trailing = line
                if name in own:
                    place = f"{inspect.getsourcefile(klass)}:{first + row - 1}"
                    if trailing and above:
                        raise ConfigError(f"{place}: {klass.__name__}.{name} has help text both above and after it; "
                                          "keep one (the comment after the field)")
                    groups.setdefault(name, group)  # a field redefined in a subclass keeps its base's group
                    helps[name], where[name] = trailing or " ".join(above) or helps.get(name, ""), place
                above, line = [], None
            elif token.type == tokenize.NL and not token.line.strip():
                above = []  # a blank line: the comment above it belonged to nothing
    fields = {f.name for f in dataclasses.fields(config_class)}
    for name in sorted(n for n in fields if not helps.get(n)):
        raise ConfigError(f"{where.get(name, config_class.__name__)}: field {name} has no help text: end its line "
                          "with `# what it is` (--help shows it)")
    return {k: v for k, v in helps.items() if k in fields}, {k: v for k, v in groups.items() if k in fields}


def shown_default(config_class, field) -> str:
    """What --help prints as a field's default: its value; both of AUTO's for a field left None; for out,
    the directory this script writes."""
    auto = getattr(config_class, "AUTO", {})
    if field.name in auto:
        return f"tiny: {auto[field.name][0]!r}; pretrained: {auto[field.name][1]!r}"
    if field.name == "out" and issubclass(config_class, RunConfig):
        return f"default: runs/{script_name(config_class)}"
    return "default: " + ('""' if field.default == "" else str(field.default))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _split_lines(self, text, width):  # wrap at spaces only: "built-in" stays one word
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit status 2 (not usage + message)
        fail(f"{message} (see --help)", status=2)


def parse(config_class, argv=None):
    """The script's Config from the command line (`--batch-size 8`; booleans `--pack` / `--no-pack`; a
    list field takes its flag repeated), then, with --tpu, the multi-host start-up. Bad flags and
    out-of-range values (the Config's __post_init__ raises ValueError) end in one line and exit status 2."""
    module = sys.modules[config_class.__module__]
    parser = _Parser(description=(module.__doc__ or "").strip(), formatter_class=_Formatter)
    try:
        helps, groups = config_comments(config_class)
    except ConfigError as e:
        fail(str(e), status=2)
    hints, sections = typing.get_type_hints(config_class), {}
    shared = {f.name for klass in (RunConfig, WarmUpConfig, LoRAConfig) for f in dataclasses.fields(klass)}
    for field in sorted(dataclasses.fields(config_class), key=lambda f: f.name in shared):  # the script's own first
        name = groups.get(field.name, "options")
        section = sections.get(name) or sections.setdefault(name, parser.add_argument_group(name))
        flag, kind = "--" + field.name.replace("_", "-"), hints[field.name]
        text = f"{helps[field.name]} ({shown_default(config_class, field)})".replace("%", "%%")
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None → X
        if kind is bool:
            section.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=text)
        elif typing.get_origin(base) is list:  # repeated: --prompt a --prompt b
            item = typing.get_args(base)[0]
            section.add_argument(flag, type=item, action="append", default=None, metavar=item.__name__.upper(),
                                 help=text)
        else:
            section.add_argument(flag, type=base, default=field.default, metavar=base.__name__.upper(), help=text)
    try:
        cfg = config_class(**vars(parser.parse_args(argv)))  # __post_init__ fills defaults, checks ranges
        check_report_to(getattr(cfg, "report_to", ""))
    except ValueError as e:
        fail(str(e), status=2)
    if isinstance(cfg, RunConfig):
        shard.start_processes(cfg)
    return cfg


def check_report_to(report_to: str) -> None:
    unknown = [name for name in report_to.split(",") if name and name not in ("tensorboard", "wandb")]
    if unknown:
        raise ValueError(f"--report-to takes tensorboard and/or wandb, got {', '.join(unknown)}")


# ----------------------------------------------------------------------------- range checks and errors

def positive(cfg, *names: str) -> list[tuple[bool, str]]:
    """Checks for `check`: each named field is >= 1."""
    return [(getattr(cfg, n) >= 1, f"--{n.replace('_', '-')} must be >= 1, got {getattr(cfg, n)}") for n in names]


def one_of(cfg, name: str, choices) -> tuple[bool, str]:
    """A check for `check`: the field's value is one of the choices."""
    return getattr(cfg, name) in choices, f"--{name.replace('_', '-')} must be one of {', '.join(choices)}"


def check(conditions: list[tuple[bool, str]]) -> None:
    """A Config's range checks (its __post_init__): the first condition that fails raises ValueError
    with its message, which `parse` prints as one line."""
    for ok, message in conditions:
        if not ok:
            raise ValueError(message)


def numbers(text: str, flag: str) -> list[float]:
    """A comma-separated list of numbers ("1,0.5"; "": []); anything else raises ValueError naming --flag."""
    try:
        return [float(x) for x in text.split(",")] if text.strip() else []
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated numbers, got {text!r}") from None


def int_pairs(text: str, flag: str, meaning: str = "integer") -> list[tuple[int, int]]:
    """"2:4,4:8" → [(2, 4), (4, 8)] ("": []); anything else raises ValueError naming --flag."""
    try:
        return [(int(a), int(b)) for a, b in (pair.split(":") for pair in text.split(","))] if text.strip() else []
    except ValueError:
        raise ValueError(f"--{flag} takes {meaning} pairs like 2:4,4:8, got {text!r}") from None


def fail(message: str, status: int = 1):
    """User error: one line on stderr and a non-zero exit, never a traceback (status 1: SystemExit
    carries the line; 2, bad flags: the line is printed and the code is 2, as argparse does)."""
    if shard.several_processes():  # at once: see shard.leave
        print(f"error: {message}", file=sys.stderr)
        shard.leave(status)
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
