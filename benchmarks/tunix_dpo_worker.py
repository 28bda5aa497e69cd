"""Tunix DPO-step worker: Tunix's DPOTrainer (policy + reference model) behind a JSON-lines pipe.

Builds one of Tunix's own Qwen 3 models twice over the same initial weights, float32, on one CPU
device inside a (1, 1) ("fsdp", "tp") mesh: the policy, and the frozen reference (a second copy
of its parameters, as DPO with a `ref_model` runs). Then one
`tunix.sft.dpo.dpo_trainer.DPOTrainer(policy, reference, optax.adamw(1e-5), DPOTrainingConfig)`
with algorithm "dpo", beta 0.1, label_smoothing 0 (Tunix's only DPO loss, `dpo_loss_fn`:
−log σ(β((log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻)))), log-probs summed over the
answer tokens, mean over pairs), and the rest of its TrainingConfig at the defaults (no eval,
no checkpoint directory, no metrics directory). The models, as benchmarks/tunix_train_worker.py
builds them:

    tiny   Tunix Qwen 3 with nanotune's `tiny-qwen3` shapes: vocab 259, dim 128, 2 layers, 4 heads,
           2 KV heads, head_dim 32, FFN 384, QK-norm, tied embeddings, RoPE 1e6, norm eps 1e-6
           (0.43M params)
    mid    Tunix Qwen 3: vocab 32000, dim 512, 8 layers, 8 heads, 4 KV heads, head_dim 64, FFN 1536,
           tied embeddings, RoPE 1e6 (41.56M params)

It needs Tunix's own virtual environment, not nanotune's:

    benchmarks/.tunix-venv/bin/python benchmarks/tunix_dpo_worker.py '{"model": "tiny",
        "pairs": 8, "prompt_len": 32, "answer_len": 32}'

Inputs: a pre-tokenised `dpo_trainer.TrainingInput` of B = "pairs" pairs from random tokens
(numpy seed 0, drawn in this order: prompts [B, P], chosen answers [B, C], rejected answers
[B, C]): prompt_ids with prompt_mask (left-padded, here no padding: P real tokens), chosen_ids /
rejected_ids with their masks (right-padded, here C real tokens each), int32 masks as Tunix's
own `process_dpo_record` makes them. It is put on the mesh (`sharding_utils.shard_input`) once,
before any timer: the host-side batch is not timed.

Protocol: after building, one JSON line per request on stdin, {"steps": N}; one reply per
request on stdout: {"step_s": [seconds of each step], "peak_rss_bytes": VmHWM since the last
reset, "params": nnx.Params of the policy, "trainable": the ones optimised}. The peak-RSS count
is reset once after the models and trainer are built. Each entry of step_s is what
`PeftTrainer.train()` does per batch to make one optimizer step, in its order:

    1. `DPOTrainer._prepare_inputs(batch)`: chosen and rejected rows concatenated after a copy of
       their prompts ([2B, P + C]), positions (`build_positions_from_mask`), the dense causal
       attention mask ([2B, P + C, P + C], `make_causal_attn_mask`: Tunix's Qwen 3 has no
       `get_attention_mask`), all eager jnp ops, and the reference log-probs: the nnx.jit
       `compute_logps(ref_model, ...)` (a forward over the [2B, P + C] rows, the last C
       positions scored), returned in a `TrainExample`;
    2. `sharding_utils.shard_input(example, config.data_sharding_axis)`;
    3. the jitted `_train_step` from `trainer.jit_train_and_eval_step(cache_nnx_graph=True)`, as
       train() obtains it (`dpo_loss_fn`: the policy's `compute_logps` forward, value_and_grad,
       global grad norm, `optimizer.update`; one XLA program, optimizer state donated),

timed until the loss and the updated policy parameters are ready. train()'s own per-batch
bookkeeping (throttler, metrics buffer, `_post_process_train_step`'s aux metrics, no-op
checkpoint save, progress bar) is left out, as nanotune's side times its reference forward and
jitted update alone. The first step of the first request includes compilation (the eager ops,
the reference forward and the train step). Everything else is logged to stderr; exits on EOF.
"""
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.models.qwen3 import model as qwen3
from tunix.rl import reshard
from tunix.sft import sharding_utils
from tunix.sft.dpo import dpo_trainer

from worker import peak_rss, reset_peak

warnings.filterwarnings("ignore", "`with mesh:`", DeprecationWarning)  # Tunix's own code uses it too
SHAPES = {  # tunix_train_worker.py's Qwen 3 shapes
    "tiny": dict(num_layers=2, vocab_size=259, embed_dim=128, hidden_dim=384, num_heads=4, head_dim=32,
                 num_kv_heads=2),
    "mid": dict(num_layers=8, vocab_size=32000, embed_dim=512, hidden_dim=1536, num_heads=8, head_dim=64,
                num_kv_heads=4),
}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def build_models(name: str) -> tuple[nnx.Module, nnx.Module, int]:
    """(policy, reference, vocab): Tunix's Qwen 3 for `name`, float32, and a copy of its initial weights."""
    if name not in SHAPES:
        sys.exit(f"tunix_dpo_worker: unknown model {name!r} ({', '.join(SHAPES)})")
    config = qwen3.ModelConfig(**SHAPES[name], rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=True,
                               dtype=jnp.float32, param_dtype=jnp.float32)
    policy = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(policy)
    reference = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))  # its own buffers, same values
    return policy, reference, config.vocab_size


def count(model: nnx.Module, kind) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, kind)))


def random_pairs(vocab: int, pairs: int, prompt_len: int, answer_len: int) -> dpo_trainer.TrainingInput:
    """B pairs of random tokens (numpy seed 0: prompts, chosen, rejected), every token real."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, vocab, (pairs, prompt_len)).astype(np.int32)
    chosen = rng.integers(0, vocab, (pairs, answer_len)).astype(np.int32)
    rejected = rng.integers(0, vocab, (pairs, answer_len)).astype(np.int32)
    ones = lambda x: np.ones_like(x, dtype=np.int32)  # noqa: E731 (process_dpo_record's int32 masks)
    return dpo_trainer.TrainingInput(prompt_ids=prompts, prompt_mask=ones(prompts), chosen_ids=chosen,
                                     chosen_mask=ones(chosen), rejected_ids=rejected, rejected_mask=ones(rejected))


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cfg = json.loads(sys.argv[1])
    import tunix
    log(f"tunix_dpo_worker: tunix {getattr(tunix, '__version__', '?')}, jax {jax.__version__} "
        f"on {jax.devices()}, {cfg}")
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    start = time.perf_counter()
    with mesh:
        policy, reference, vocab = build_models(cfg["model"])
        policy, reference = reshard.reshard_model_to_mesh(policy, mesh), reshard.reshard_model_to_mesh(reference, mesh)
        trainer = dpo_trainer.DPOTrainer(
            policy, reference, optax.adamw(1e-5),
            dpo_trainer.DPOTrainingConfig(algorithm="dpo", beta=0.1, label_smoothing=0.0,
                                          eval_every_n_steps=1_000_000, pbar_description=None))
        total = count(trainer.model, nnx.Param)
        step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)  # what train() calls per batch
        # The step writes its results into these same Variable objects (the graph is cached): reading
        # them back is cheaper than an nnx.state() traversal per step.
        variables = [v for _, v in nnx.iter_graph(trainer.model) if isinstance(v, nnx.Param)]
        batch = sharding_utils.shard_input(random_pairs(vocab, cfg["pairs"], cfg["prompt_len"], cfg["answer_len"]),
                                           trainer.config.data_sharding_axis)  # on the mesh, untimed
    log(f"tunix_dpo_worker: {cfg['model']} built in {time.perf_counter() - start:.1f}s; policy params {total:,} "
        f"({total / 1e6:.2f}M), reference {count(reference, nnx.Param):,}, lora={trainer._lora_enabled}")
    reset_peak()  # the peak-RSS count restarts here
    for line in sys.stdin:
        if not line.strip():
            continue
        steps = int(json.loads(line)["steps"])
        times = []
        with mesh:
            for _ in range(steps):
                start = time.perf_counter()
                example = trainer._prepare_inputs(batch)  # eager masks + the reference's compute_logps
                example = sharding_utils.shard_input(example, trainer.config.data_sharding_axis)
                loss, aux, grad_norm = step(example)
                jax.block_until_ready((loss, [v[...] for v in variables]))
                times.append(time.perf_counter() - start)
                log(f"tunix_dpo_worker: step {int(trainer.optimizer.step[...])} loss {float(loss):.4f} "
                    f"grad_norm {float(grad_norm):.4f} rewards/margin {float(aux['rewards/margin']):.4f} "
                    f"{times[-1]:.3f}s")
        print(json.dumps({"step_s": times, "peak_rss_bytes": peak_rss(), "params": total, "trainable": total}),
              flush=True)


if __name__ == "__main__":
    main()
