"""The DPO step at two sizes: nanotune's dpo.py step vs Tunix's DPOTrainer, side by side.

One step = the frozen reference's log-probs of both answers of every pair, then the policy's
forward, backward, global norm and AdamW update: sigmoid DPO loss, β 0.1, no label smoothing,
float32 parameters, one device, the reference a second copy of the policy's initial weights.
B pairs of random tokens (numpy seed 0, the same tokens on both sides): a prompt of P tokens and
two answers of C tokens each, no padding. Settings:

    tiny   tiny-qwen3 (vocab 259, dim 128, 2 layers), 8 pairs, P = C = 32
    mid    the Qwen 3 of 41.6M parameters of bench_train.py (8 layers, dim 512, FFN 1536, 8 heads /
           4 KV heads of 64, vocab 32000, tied), 4 pairs, P = C = 128

nanotune (a worker process of this file, nanotune's venv): dpo.py's own step as its main() builds
it: `dpo.Config(loss_type="sigmoid", warmup_sft_steps=0, batch_size=B, lr=1e-5)`, the model sharded on
`shard.make_mesh("")`, `run.adamw` + `run.init_optimizer`, the jitted `dpo.make_train_step`
(params and optimizer state donated, out_shardings as main()'s), `dpo.reference_logps` over a
jitted copy of the initial params. Per step: `batch["ref_logps"] = ref(ref_params, frozen, batch)`
then `step(params, opt_state, frozen, batch)`, timed until the loss and params are ready; the batch
(`dpo.pair_batch`) is built once before the timer. Tunix (benchmarks/tunix_dpo_worker.py, Tunix's
venv): per step `DPOTrainer._prepare_inputs` (eager masks and positions, the reference's
`compute_logps`), `shard_input`, and the jitted `_train_step` with optax.adamw(1e-5), timed
until the loss and policy params are ready; its TrainingInput is put on the device before the
timer. Neither side times host-side batch building; both time the reference forward.

Every measurement is a fresh process (its peak resident memory is counted from the end of
building through compilation and the timed steps; both processes hold the policy, its AdamW
moments and the reference), systems alternating A B A B. The first step compiles and is left out;
a process's step time is the median of the others, a system's the median over its processes.

    python benchmarks/bench_dpo.py                                  # tiny and mid, both systems
    python benchmarks/bench_dpo.py --settings mid --repeats 3 --steps 5
    python benchmarks/bench_dpo.py --systems nanotune
"""
from __future__ import annotations

import pathlib
import sys
import time

from worker import peak_rss, reset_peak, side_by_side

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
SHAPES = {"tiny": (8, 32, 32), "mid": (4, 128, 128)}  # pairs, prompt length, answer length


def random_pairs(vocab: int, pairs: int, prompt_len: int, answer_len: int) -> list[tuple[list, list, list]]:
    """tunix_dpo_worker.py's tokens (numpy seed 0: prompts, chosen, rejected) as dpo.py's pairs of int lists."""
    import numpy as np
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, vocab, (pairs, prompt_len)).astype(np.int32)
    chosen = rng.integers(0, vocab, (pairs, answer_len)).astype(np.int32)
    rejected = rng.integers(0, vocab, (pairs, answer_len)).astype(np.int32)
    return [(p.tolist(), c.tolist(), r.tolist()) for p, c, r in zip(prompts, chosen, rejected)]


# ----------------------------------------------------------------------------- workers (own process)

def nanotune_worker(setting: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dpo
    import run
    import shard
    from bench_train import model_config
    from model import Transformer

    B, P, C = SHAPES[setting]
    cfg = model_config(setting)  # float32 compute and params
    # beta 0.1, no label smoothing; lr as Tunix's side (dpo.py's schedule: a 10-step ramp from 0, then cosine)
    dpo_cfg = dpo.Config(loss_type="sigmoid", warmup_sft_steps=0, batch_size=B, lr=1e-5)
    mesh = shard.make_mesh("")
    model = shard.shard_model(Transformer(cfg, nnx.Rngs(0)), mesh)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx, _ = run.adamw(dpo_cfg, 100)
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, mesh)
    step = jax.jit(dpo.make_train_step(graphdef, tx, dpo_cfg), donate_argnums=(0, 1),
                   out_shardings=(param_sh, opt_sh, None, None))
    ref = dpo.reference_logps(graphdef, dpo_cfg)
    ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(params)  # π_ref
    batch = dpo.pair_batch(random_pairs(cfg.vocab_size, B, P, C), None, pad_id=0, grad_accum=1, mesh=mesh)
    assert batch["tokens"].shape == (1, 2 * B, P + C), batch["tokens"].shape  # no bucket padding
    del model
    reset_peak()
    times = []
    for _ in range(steps + 1):  # the first compiles
        start = time.perf_counter()
        batch["ref_logps"] = ref(ref_params, frozen, batch)
        params, opt_state, metrics, aux = step(params, opt_state, frozen, batch)
        jax.block_until_ready((params, metrics["loss"]))
        times.append(time.perf_counter() - start)
        print(f"nanotune {setting} loss {float(metrics['loss']):.4f} grad_norm "
              f"{float(metrics['grad_norm']):.4f} {times[-1]:.3f}s", file=sys.stderr, flush=True)
    return {"step_s": times, "peak_rss_bytes": peak_rss(), "params": sum(x.size for x in jax.tree.leaves(params))}


# ----------------------------------------------------------------------------- driver

def tunix_config(setting: str) -> dict:  # the Tunix worker's model and shapes
    B, P, C = SHAPES[setting]
    return {"model": setting, "pairs": B, "prompt_len": P, "answer_len": C}


def describe(setting: str) -> tuple[str, int]:  # the table's row label, pairs per step
    B, P, C = SHAPES[setting]
    return f"{setting} {B} pairs, P {P}, C {C}", B


if __name__ == "__main__":
    side_by_side(__file__, nanotune_worker, HERE / "tunix_dpo_worker.py", tunix_config, describe, "pairs")
