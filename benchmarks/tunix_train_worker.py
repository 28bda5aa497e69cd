"""Tunix SFT-step worker: Tunix's PeftTrainer (full fine-tuning or LoRA) behind a JSON-lines pipe.

Builds one of Tunix's own models, float32 parameters, on one CPU device inside a (1, 1)
("fsdp", "tp") mesh, and one `tunix.sft.peft_trainer.PeftTrainer` with `optax.adamw(1e-5)`,
its default TrainingConfig (no eval, no checkpoint directory, no metrics directory) and its
default loss (`_default_loss_fn`: next-token cross-entropy summed over the input mask and
divided by the number of masked-in targets). The models:

    tiny         Tunix Qwen 3 with nanotune's `tiny-qwen3` shapes: vocab 259, dim 128, 2 layers,
                 4 heads, 2 KV heads, head_dim 32, FFN 384, QK-norm, tied embeddings, RoPE 1e6,
                 norm eps 1e-6 (0.43M params)
    mid          Tunix Qwen 3: vocab 32000, dim 512, 8 layers, 8 heads, 4 KV heads, head_dim 64,
                 FFN 1536, tied embeddings, RoPE 1e6 (41.56M params)
    gemma3-270m  Tunix Gemma 3 `ModelConfig.gemma3_270m()` with param_dtype float32 (268M params,
                 vocab 262144); random init, or "ckpt": a Hugging Face directory loaded through
                 `params_safetensors.create_model_from_safe_tensors` (as tunix_worker.py does)

"mode": "full" trains every nnx.Param; "lora" applies Tunix's LoRA the way its CLI does
(`qwix.LoraProvider(module_path, rank, alpha=2*rank)` + `qwix.apply_lora_to_model` with the
model's `get_model_input()`) to every attention and MLP projection (Qwen 3: q_proj, k_proj,
v_proj, o_proj, gate_proj, up_proj, down_proj; Gemma 3: q_einsum, kv_einsum (k and v in one
weight), attn_vec_einsum, gate_proj, up_proj, down_proj); PeftTrainer then sees nnx.LoRAParam
leaves and differentiates and optimises only those. "dtype": "bfloat16" sets the Qwen 3
ModelConfig's compute `dtype` to bfloat16 with float32 params (Tunix returns float32 logits
either way); Tunix's Gemma 3 config has no compute dtype (it computes in param_dtype), so it is
refused there. It needs Tunix's own virtual environment, not nanotune's:

    benchmarks/.tunix-venv/bin/python benchmarks/tunix_train_worker.py '{"model": "tiny",
        "mode": "full", "batch": 8, "len": 256, "rank": 8, "dtype": "float32", "ckpt": null}'

Inputs: random tokens (numpy seed 0) [batch, len] in the vocabulary, an all-ones input mask,
as a `peft_trainer.TrainingInput`; the trainer's gen_model_input_fn is the one of Tunix's
PEFT CLI (tunix/cli/peft_main.py): positions = `build_positions_from_mask`, attention mask =
`make_causal_attn_mask` ([B, T, T]), both inside the jitted step, with the pad mask taken from
the input mask (the CLI uses `tokens != 0`, its pad id; the same for unpadded rows).

Protocol: after building, one JSON line per request on stdin, {"steps": N}; one reply per
request on stdout: {"step_s": [seconds of each step], "peak_rss_bytes": VmHWM since the last
reset, "params": every nnx.Param (LoRA factors included), "trainable": the ones optimised}.
The peak-RSS count is reset once after the model and trainer are built. Each entry of step_s
is one call of the function `PeftTrainer.train()` itself calls per batch: the jitted
`_train_step` (forward, value_and_grad, global grad norm, `optimizer.update`, one XLA
program, optimizer state donated) obtained from `trainer.jit_train_and_eval_step(
cache_nnx_graph=True)`, exactly as train() obtains it, timed until its loss and the updated
trainable parameters are ready. That is one optimizer step and nothing else; train()'s own
per-batch bookkeeping (throttler, metrics buffer, no-op checkpoint save, progress bar) is left
out, as nanotune's side times its jitted update alone. The batch is put on the mesh with
`sharding_utils.shard_input` as train() does, before the timer starts. The first step of
the first request includes compilation. Everything else is logged to stderr; exits on EOF.
"""
import dataclasses
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from tunix.rl import reshard
from tunix.sft import peft_trainer, sharding_utils
from tunix.sft import utils as sft_utils

from worker import peak_rss, reset_peak

warnings.filterwarnings("ignore", "`with mesh:`", DeprecationWarning)  # Tunix's own code uses it too
QWEN3_LORA = ".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj"
GEMMA3_LORA = ".*q_einsum|.*kv_einsum|.*attn_vec_einsum|.*gate_proj|.*up_proj|.*down_proj"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def build_model(cfg: dict) -> tuple[nnx.Module, str, int]:
    """Tunix's model for cfg["model"], float32 params; returns (model, LoRA module regex, vocab)."""
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.get("dtype", "float32")]
    if cfg["model"] in ("tiny", "mid"):
        from tunix.models.qwen3 import model as qwen3
        shapes = dict(num_layers=2, vocab_size=259, embed_dim=128, hidden_dim=384, num_heads=4, head_dim=32,
                      num_kv_heads=2) if cfg["model"] == "tiny" else \
            dict(num_layers=8, vocab_size=32000, embed_dim=512, hidden_dim=1536, num_heads=8, head_dim=64,
                 num_kv_heads=4)
        config = qwen3.ModelConfig(**shapes, rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=True,
                                   dtype=compute, param_dtype=jnp.float32)
        return qwen3.Qwen3(config, rngs=nnx.Rngs(0)), QWEN3_LORA, config.vocab_size
    if cfg["model"] == "gemma3-270m":
        from tunix.models.gemma3 import model as gemma3
        from tunix.models.gemma3 import params_safetensors
        if compute != jnp.float32:
            sys.exit("tunix_train_worker: Tunix's Gemma 3 ModelConfig has no compute dtype (only param_dtype; "
                     "it computes in the parameters' dtype), so bf16 compute with f32 params is not available")
        config = dataclasses.replace(gemma3.ModelConfig.gemma3_270m(), param_dtype=jnp.float32)
        if cfg.get("ckpt"):
            model = params_safetensors.create_model_from_safe_tensors(cfg["ckpt"], config, dtype=jnp.float32)
        else:
            model = gemma3.Gemma3(config, rngs=nnx.Rngs(0))
        return model, GEMMA3_LORA, config.num_embed
    sys.exit(f"tunix_train_worker: unknown model {cfg['model']!r} (tiny, mid, gemma3-270m)")


def count(model: nnx.Module, kind) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, kind)))


def gen_model_input(x: peft_trainer.TrainingInput) -> dict:
    """Tunix's PEFT CLI input function (tunix/cli/peft_main.py), pad mask = the input mask."""
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": sft_utils.build_positions_from_mask(x.input_mask),
            "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cfg = json.loads(sys.argv[1])
    import tunix
    log(f"tunix_train_worker: tunix {getattr(tunix, '__version__', '?')}, jax {jax.__version__} "
        f"on {jax.devices()}, {cfg}")
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    start = time.perf_counter()
    with mesh:
        model, lora_path, vocab = build_model(cfg)
        base = count(model, nnx.Param)
        log(f"tunix_train_worker: {cfg['model']} built, {base:,} params ({base / 1e6:.2f}M)")
        if cfg["mode"] == "lora":
            rank = int(cfg.get("rank", 8))
            provider = qwix.LoraProvider(module_path=lora_path, rank=rank, alpha=2.0 * rank)
            model = qwix.apply_lora_to_model(model, provider, **model.get_model_input(), rngs=nnx.Rngs(1))
            lora = count(model, nnx.LoRAParam)
            paths = sorted({"/".join(map(str, p[:-1])) for p, v in nnx.iter_graph(model)
                            if isinstance(v, nnx.LoRAParam)})
            log(f"tunix_train_worker: LoRA rank {rank}, alpha {2 * rank}: {lora:,} LoRA params on "
                f"{len(paths)} modules, e.g. {paths[:3]}")
            if lora == 0:
                sys.exit("tunix_train_worker: the LoRA module regex matched nothing")
        elif cfg["mode"] != "full":
            sys.exit(f"tunix_train_worker: unknown mode {cfg['mode']!r} (full, lora)")
        model = reshard.reshard_model_to_mesh(model, mesh)
        trainer = peft_trainer.PeftTrainer(
            model, optax.adamw(1e-5),
            peft_trainer.TrainingConfig(eval_every_n_steps=1_000_000, pbar_description=None),
        ).with_gen_model_input_fn(gen_model_input)
        trainable = nnx.LoRAParam if trainer._lora_enabled else nnx.Param  # what PeftTrainer optimises
        total, n_trainable = count(model, nnx.Param), count(model, trainable)
        step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)  # what train() calls per batch
        # The step writes its results into these same Variable objects (the graph is cached): reading
        # them back is cheaper than an nnx.state() traversal per step (5 ms on tiny, 10% of a step).
        variables = [v for _, v in nnx.iter_graph(trainer.model) if isinstance(v, trainable)]
        tokens = np.random.default_rng(0).integers(0, vocab, (cfg["batch"], cfg["len"]), dtype=np.int32)
        batch = sharding_utils.shard_input(
            peft_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, dtype=bool)),
            trainer.config.data_sharding_axis)
    log(f"tunix_train_worker: built in {time.perf_counter() - start:.1f}s; params {total:,}, "
        f"trainable {n_trainable:,}, lora={trainer._lora_enabled}")
    reset_peak()  # the peak-RSS count restarts here
    for line in sys.stdin:
        if not line.strip():
            continue
        steps = int(json.loads(line)["steps"])
        times = []
        with mesh:
            for _ in range(steps):
                start = time.perf_counter()
                loss, _, grad_norm = step(batch)
                jax.block_until_ready((loss, [v[...] for v in variables]))
                times.append(time.perf_counter() - start)
                log(f"tunix_train_worker: step {int(trainer.optimizer.step[...])} loss {float(loss):.4f} "
                    f"grad_norm {float(grad_norm):.4f} {times[-1]:.3f}s")
        print(json.dumps({"step_s": times, "peak_rss_bytes": peak_rss(), "params": total,
                          "trainable": n_trainable}), flush=True)


if __name__ == "__main__":
    main()
