"""The distillation step at two sizes: nanotune's distill.py step vs Tunix's DistillationTrainer, side by side.

One step = the frozen teacher's forward over the batch, then the student's forward, the
forward KL(p_T ‖ p_S) at temperature 1 over every next-token position (pure distillation: no
hard-label term, no τ² at τ = 1), backward, global norm and AdamW update, float32 parameters,
one device, teacher and student of different random weights. B rows of T random tokens (numpy
seed 0, the same tokens on both sides), every token real, every target counted. Settings:

    tiny   teacher tiny-qwen3 (vocab 259, dim 128, 2 layers, 0.43M), student tiny-qwen3-small
           (dim 64, 2 layers, 0.11M), 16 x 64
    mid    teacher the Qwen 3 of 41.6M parameters of bench_train.py (8 layers, dim 512, FFN 1536,
           8 heads / 4 KV heads of 64, vocab 32000, tied), student the same with 4 layers (29.0M),
           4 x 256

nanotune (a worker process of this file, nanotune's venv): distill.py's own step as its main()
builds it: `distill.Config(teacher="tiny-qwen3", batch_size=B, lr=1e-5, loss="jsd", beta=0.0,
max_len=T)` (β 0 = the exact forward KL, Tunix's divergence), both models sharded on
`shard.make_mesh("")`, the student split into trained params and the rest, `run.adamw` +
`run.init_optimizer`, the jitted `distill.make_train_step` (params and optimizer state donated,
out_shardings as main()'s). Per step `step(params, opt_state, Frozen(frozen, teacher_state), batch,
None)`, one XLA program holding the teacher's forward, timed until the loss and params are
ready; the batch (`distill.device_batch` of (ids, loss_mask) examples, the mask 1 on every token
but the first) is built once before the timer. Tunix (benchmarks/tunix_distill_worker.py,
Tunix's venv): per step `DistillationTrainer._prepare_inputs` (eager positions and mask, the
teacher's nnx.jit forward to full logits), `shard_input`, and the jitted `_train_step` of
`LogitStrategy(temperature=1, alpha=1)` with optax.adamw(1e-5), timed until the loss and student
params are ready; its TrainingInput is put on the device before the timer. Neither side times
host-side batch building; both time the teacher forward.

What differs beside speed: Tunix averages the KL over all B(T − 1) positions with no mask (the
same here: every target counts) and materialises both models' [B, T − 1, V] float32 logits, the
one-hot labels, and the student's and teacher's cross-entropies it logs even at alpha 1;
nanotune's heads run a chunk of positions at a time inside the step, each chunk's logits made once
and the student's gradient taken there (logprobs.summed_terms), and it
also logs reverse KL, both NLLs and top-1 agreement. nanotune's AdamW follows run.adamw (global-
norm clip 1.0, weight decay 0.01, warmup-cosine schedule), Tunix's is plain optax.adamw(1e-5).

Every measurement is a fresh process (its peak resident memory is counted from the end of
building through compilation and the timed steps; both processes hold the teacher, the student
and its AdamW moments), systems alternating A B A B. The first step compiles and is left out;
a process's step time is the median of the others, a system's the median over its processes.
Under the table: the step's model FLOPs (bench_train.step_flops: the student's forward and backward,
the teacher's forward) over the f32 matmul roofline measured in the same run, the fastest any
implementation could run the step on this machine, and so the most any could gain over Tunix here.

    python benchmarks/bench_distill.py                                  # tiny and mid, both systems
    python benchmarks/bench_distill.py --settings mid --repeats 3 --steps 5
    python benchmarks/bench_distill.py --systems nanotune
"""
from __future__ import annotations

import pathlib
import sys
import time

from worker import peak_rss, reset_peak, side_by_side

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
SHAPES = {"tiny": (16, 64), "mid": (4, 256)}  # rows, length


def random_examples(vocab: int, rows: int, length: int) -> list[tuple[list, list]]:
    """tunix_distill_worker.py's tokens (numpy seed 0) as distill.py's (ids, loss_mask) examples: every
    token a target but the first, which has nothing before it."""
    import numpy as np
    tokens = np.random.default_rng(0).integers(0, vocab, (rows, length), dtype=np.int32)
    return [(row.tolist(), [0] + [1] * (length - 1)) for row in tokens]


def configs(setting: str):
    """(teacher, student) model configs of a setting."""
    sys.path.insert(0, str(ROOT))
    from bench_train import model_config
    from model import CONFIGS
    teacher = model_config(setting)
    return teacher, CONFIGS["tiny-qwen3-small"] if setting == "tiny" else teacher.replace(n_layers=4)


def floor(steps: dict) -> list[str]:
    """Under the table: the step's model FLOPs (the student's forward and backward, the teacher's forward, as
    bench_train.step_flops counts them) over this machine's f32 matmul roofline measured now: no implementation
    runs the step in less, so Tunix's step over it is the most any could gain over Tunix here."""
    from bench_train import roofline_in_process, step_flops
    rate = roofline_in_process()["f32"] * 1e9
    lines = [f"\nf32 matmul roofline {rate / 1e9:.0f} GFLOP/s (2048^3, measured now)"]
    for setting, step in steps.items():
        (teacher, student), (B, T) = configs(setting), SHAPES[setting]
        flops = step_flops(student, B, T, "full") + step_flops(teacher, B, T, "full") / 3  # teacher: forward only
        best = flops / rate
        lines.append(f"{setting}: {flops / 1e9:.1f} GFLOP a step, {best * 1e3:.1f} ms at the roofline" + "".join(
            f"; {system} at {best / seconds:.0%} of it" for system, seconds in step.items()) +
            (f"; the most any step could be over Tunix's: {step['tunix'] / best:.2f}x" if "tunix" in step else ""))
    return lines


# ----------------------------------------------------------------------------- workers (own process)

def nanotune_worker(setting: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    from flax import nnx

    import distill
    import run
    import shard
    from model import Transformer

    B, T = SHAPES[setting]
    teacher_cfg, student_cfg = configs(setting)  # float32 compute and params
    # forward KL at τ 1, no τ², kd_ratio 1; lr as Tunix's (distill.py's schedule: a 3-step ramp from 0, then cosine)
    cfg = distill.Config(teacher="tiny-qwen3", batch_size=B, lr=1e-5, loss="jsd", beta=0.0, max_len=T)
    mesh = shard.make_mesh("")
    student = Transformer(student_cfg, nnx.Rngs(0))
    teacher = Transformer(teacher_cfg, nnx.Rngs(1))
    graphdef, params, frozen = nnx.split(shard.shard_model(student, mesh), nnx.Param, ...)
    params = {"student": params}  # distill.py's trained tree (and "projections" with --hidden-layers)
    teacher_graphdef, teacher_state = nnx.split(shard.shard_model(teacher, mesh))
    tx, _ = run.adamw(cfg, 100)
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, mesh)
    step = jax.jit(distill.make_train_step(graphdef, teacher_graphdef, tx, cfg), donate_argnums=(0, 1),
                   out_shardings=(param_sh, opt_sh, None, None))
    batch = distill.device_batch(random_examples(teacher_cfg.vocab_size, B, T), cfg, pad_id=0, mesh=mesh,
                                 micro_batches=1)
    assert batch["tokens"].shape == (1, B, T), batch["tokens"].shape  # no bucket padding
    frozen = distill.Frozen(frozen, teacher_state)
    del student, teacher
    reset_peak()
    times = []
    for _ in range(steps + 1):  # the first compiles
        start = time.perf_counter()
        params, opt_state, metrics, aux = step(params, opt_state, frozen, batch, None)
        jax.block_until_ready((params, metrics["loss"]))
        times.append(time.perf_counter() - start)
        tokens = float(aux["tokens"].sum())
        print(f"nanotune {setting} loss {float(metrics['loss']):.4f} grad_norm {float(metrics['grad_norm']):.4f} "
              f"student NLL {float(aux['nll_loss'].sum()) / tokens:.4f} teacher NLL "
              f"{float(aux['teacher_nll'].sum()) / tokens:.4f} {times[-1]:.3f}s", file=sys.stderr, flush=True)
    return {"step_s": times, "peak_rss_bytes": peak_rss(), "params": sum(x.size for x in jax.tree.leaves(params)),
            "teacher_params": sum(x.size for x in jax.tree.leaves(teacher_state))}


# ----------------------------------------------------------------------------- driver

def tunix_config(setting: str) -> dict:  # the Tunix worker's model and shapes
    B, T = SHAPES[setting]
    return {"model": setting, "batch": B, "len": T}


def describe(setting: str) -> tuple[str, int]:  # the table's row label, tokens per step
    B, T = SHAPES[setting]
    return f"{setting} {B} x {T}", B * T


if __name__ == "__main__":
    side_by_side(__file__, nanotune_worker, HERE / "tunix_distill_worker.py", tunix_config, describe, "tokens", floor)
