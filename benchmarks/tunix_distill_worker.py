"""Tunix distillation-step worker: Tunix's DistillationTrainer with its LogitStrategy behind a JSON-lines pipe.

Builds two of Tunix's own Qwen 3 models, float32, on one CPU device inside a (1, 1) ("fsdp", "tp")
mesh: the frozen teacher and the trained student (different random weights, the same
vocabulary). Then one `tunix.distillation.distillation_trainer.DistillationTrainer(student,
teacher, LogitStrategy(...), optax.adamw(1e-5), TrainingConfig)` with the rest of its
TrainingConfig at the defaults (no eval, no checkpoint directory, no metrics directory). The
strategy is `strategies.LogitStrategy(temperature=1.0, alpha=1.0)`: pure distillation, the loss
KL(p_T ‖ p_S) at τ = 1 (τ² = 1) averaged over every [B, T − 1] position, as Tunix computes it
(`compute_loss`: full-vocabulary softmaxes of both float32 logits, no mask). The three functions
the strategy needs are written here as Tunix's logit-distillation notebook
(examples/logit_distillation.ipynb) writes them: the forward of either model returns its logits
at the first T − 1 positions ([B, T − 1, V]), the labels are the next tokens one-hot ([B, T − 1,
V], times the input mask); Tunix still computes the student's and teacher's cross-entropies
against them (the "hard" and "teacher" metrics) with alpha 1. The models, as
benchmarks/tunix_train_worker.py builds them (teacher / student):

    tiny   nanotune's `tiny-qwen3` shapes (vocab 259, dim 128, 2 layers, 4 heads, 2 KV heads,
           head_dim 32, FFN 384; 0.43M params) / its `tiny-qwen3-small` (vocab 259, dim 64,
           2 layers, 2 heads, 1 KV head, head_dim 32, FFN 192; 0.11M); QK-norm, tied
           embeddings, RoPE 1e6, norm eps 1e-6
    mid    vocab 32000, dim 512, 8 layers, 8 heads, 4 KV heads, head_dim 64, FFN 1536, tied
           embeddings, RoPE 1e6 (41.56M params) / the same with 4 layers (28.97M)

It needs Tunix's own virtual environment, not nanotune's:

    benchmarks/.tunix-venv/bin/python benchmarks/tunix_distill_worker.py '{"model": "tiny",
        "batch": 16, "len": 64}'

Inputs: random tokens (numpy seed 0) [batch, len] in the vocabulary with an all-ones input
mask, as a `distillation_trainer.TrainingInput`; the trainer's gen_model_input_fn is the one of
Tunix's PEFT CLI and the notebook (positions = `build_positions_from_mask`, attention mask =
`make_causal_attn_mask`, [B, T, T]), with the pad mask taken from the input mask. The batch is
put on the mesh (`sharding_utils.shard_input`) once, before any timer: the host-side batch is
not timed.

Protocol: after building, one JSON line per request on stdin, {"steps": N}; one reply per
request on stdout: {"step_s": [seconds of each step], "peak_rss_bytes": VmHWM since the last
reset, "params": nnx.Params of the student, "trainable": the ones optimised, "teacher_params":
the teacher's}. The peak-RSS count is reset once after the models and trainer are built. Each
entry of step_s is what `PeftTrainer.train()` does per batch to make one optimizer step, in its
order:

    1. `DistillationTrainer._prepare_inputs(batch)`: gen_model_input_fn's eager positions and
       [B, T, T] mask, then `LogitStrategy.get_teacher_outputs`: the nnx.jit teacher forward
       (the full [B, T − 1, V] float32 logits, materialised) and a stop_gradient, returned in a
       `TrainingInput` with `teacher_output`;
    2. `sharding_utils.shard_input(example, config.data_sharding_axis)`;
    3. the jitted `_train_step` from `trainer.jit_train_and_eval_step(cache_nnx_graph=True)`, as
       train() obtains it (gen_model_input_fn again, traced; `get_train_loss`: the student
       forward, the one-hot labels, `compute_loss`; value_and_grad, global grad norm,
       `optimizer.update`; one XLA program, optimizer state donated),

timed until the loss and the updated student parameters are ready. train()'s own per-batch
bookkeeping (throttler, metrics buffer, no-op checkpoint save, progress bar) is left out, as
nanotune's side times its jitted step alone. The first step of the first request includes
compilation (the eager ops, the teacher forward and the train step). Everything else is logged
to stderr; exits on EOF.
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
from tunix.distillation import distillation_trainer, strategies
from tunix.models.qwen3 import model as qwen3
from tunix.rl import reshard
from tunix.sft import sharding_utils
from tunix.sft import utils as sft_utils

from worker import peak_rss, reset_peak

warnings.filterwarnings("ignore", "`with mesh:`", DeprecationWarning)  # Tunix's own code uses it too
TEACHERS = {  # tunix_train_worker.py's Qwen 3 shapes
    "tiny": dict(num_layers=2, vocab_size=259, embed_dim=128, hidden_dim=384, num_heads=4, head_dim=32,
                 num_kv_heads=2),
    "mid": dict(num_layers=8, vocab_size=32000, embed_dim=512, hidden_dim=1536, num_heads=8, head_dim=64,
                num_kv_heads=4),
}
STUDENTS = {  # nanotune's tiny-qwen3-small; the mid teacher with half its layers
    "tiny": dict(num_layers=2, vocab_size=259, embed_dim=64, hidden_dim=192, num_heads=2, head_dim=32,
                 num_kv_heads=1),
    "mid": {**TEACHERS["mid"], "num_layers": 4},
}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def qwen3_model(shapes: dict, seed: int) -> nnx.Module:
    config = qwen3.ModelConfig(**shapes, rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=True,
                               dtype=jnp.float32, param_dtype=jnp.float32)
    return qwen3.Qwen3(config, rngs=nnx.Rngs(seed))


def build_models(name: str) -> tuple[nnx.Module, nnx.Module, int]:
    """(student, teacher, vocab): Tunix's Qwen 3 pair for `name`, float32, different random weights."""
    if name not in TEACHERS:
        sys.exit(f"tunix_distill_worker: unknown model {name!r} ({', '.join(TEACHERS)})")
    return qwen3_model(STUDENTS[name], 0), qwen3_model(TEACHERS[name], 1), TEACHERS[name]["vocab_size"]


def count(model: nnx.Module, kind) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, kind)))


def gen_model_input(x: distillation_trainer.TrainingInput) -> dict:
    """Tunix's PEFT CLI input function (tunix/cli/peft_main.py), pad mask = the input mask."""
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": sft_utils.build_positions_from_mask(x.input_mask),
            "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}


def forward(model: nnx.Module, input_tokens, input_mask, positions, attention_mask):
    """Either model's logits [B, T − 1, V]: every position that has a next token."""
    del input_mask  # in attention_mask already
    logits, _ = model(input_tokens, positions, None, attention_mask)
    return logits[:, :-1, :]


def make_labels(vocab: int):
    """labels_fn: the next tokens one-hot [B, T − 1, V], zero where the input mask is."""
    def labels(input_tokens, input_mask, **_):
        return jax.nn.one_hot(input_tokens[:, 1:], vocab) * input_mask[:, 1:, None].astype(jnp.float32)
    return labels


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cfg = json.loads(sys.argv[1])
    import tunix
    log(f"tunix_distill_worker: tunix {getattr(tunix, '__version__', '?')}, jax {jax.__version__} "
        f"on {jax.devices()}, {cfg}")
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    start = time.perf_counter()
    with mesh:
        student, teacher, vocab = build_models(cfg["model"])
        student, teacher = reshard.reshard_model_to_mesh(student, mesh), reshard.reshard_model_to_mesh(teacher, mesh)
        strategy = strategies.LogitStrategy(student_forward_fn=forward, teacher_forward_fn=forward,
                                            labels_fn=make_labels(vocab), temperature=1.0, alpha=1.0)
        trainer = distillation_trainer.DistillationTrainer(
            student, teacher, strategy, optax.adamw(1e-5),
            distillation_trainer.TrainingConfig(eval_every_n_steps=1_000_000, pbar_description=None),
        ).with_gen_model_input_fn(gen_model_input)
        total, n_teacher = count(trainer.model, nnx.Param), count(trainer.teacher_model, nnx.Param)
        step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)  # what train() calls per batch
        # The step writes its results into these same Variable objects (the graph is cached): reading
        # them back is cheaper than an nnx.state() traversal per step.
        variables = [v for _, v in nnx.iter_graph(trainer.model) if isinstance(v, nnx.Param)]
        tokens = np.random.default_rng(0).integers(0, vocab, (cfg["batch"], cfg["len"]), dtype=np.int32)
        batch = sharding_utils.shard_input(
            distillation_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, dtype=bool)),
            trainer.config.data_sharding_axis)  # on the mesh, untimed
    log(f"tunix_distill_worker: {cfg['model']} built in {time.perf_counter() - start:.1f}s; student params "
        f"{total:,} ({total / 1e6:.2f}M), teacher {n_teacher:,} ({n_teacher / 1e6:.2f}M), lora={trainer._lora_enabled}")
    reset_peak()  # the peak-RSS count restarts here
    for line in sys.stdin:
        if not line.strip():
            continue
        steps = int(json.loads(line)["steps"])
        times = []
        with mesh:
            for _ in range(steps):
                start = time.perf_counter()
                example = trainer._prepare_inputs(batch)  # eager positions + mask, the teacher's logits
                example = sharding_utils.shard_input(example, trainer.config.data_sharding_axis)
                loss, aux, grad_norm = step(example)
                jax.block_until_ready((loss, [v[...] for v in variables]))
                times.append(time.perf_counter() - start)
                log(f"tunix_distill_worker: step {int(trainer.optimizer.step[...])} loss {float(loss):.4f} "
                    f"grad_norm {float(grad_norm):.4f} student CE {float(aux['distill/hard_loss']):.4f} "
                    f"teacher CE {float(aux['distill/teacher_loss']):.4f} {times[-1]:.3f}s")
        print(json.dumps({"step_s": times, "peak_rss_bytes": peak_rss(), "params": total, "trainable": total,
                          "teacher_params": n_teacher}), flush=True)


if __name__ == "__main__":
    main()
