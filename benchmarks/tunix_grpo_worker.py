"""Tunix GRPO-step worker: Tunix's GRPOLearner on a random tiny Qwen 3 behind a JSON-lines pipe.

Builds Tunix's own Qwen 3 (tunix.models.qwen3) with the shapes of nanotune's `tiny-qwen3`
preset (vocab 259 = bytes + pad/bos/eos, dim 128, 2 layers, 4 heads, 2 KV heads, head_dim 32,
FFN 384, QK-norm, tied embeddings, RoPE base 1e6), float32, one CPU device, and one
`GRPOLearner` (vanilla rollout = Tunix's Sampler, actor/reference/rollout on the same mesh).
It needs Tunix's own virtual environment, not nanotune's:

    benchmarks/.tunix-venv/bin/python benchmarks/tunix_grpo_worker.py '{"prompts_per_step": 2,
        "num_generations": 4, "max_completion_len": 32, "num_iterations": 2, "beta": 0.02}'

Protocol: one JSON line per request on stdin, {"prompts": ["123*4=", ...]} (prompts_per_step
strings), one reply per request on stdout: {"seconds", "phases", "lengths", "reward_std"}.
`seconds` is the wall time of `learner.train()` over a one-batch dataset: one full GRPO step =
rollout (temperature 1, top_p 1.0: Tunix's only sampling mode; greedy otherwise) + rewards +
reference log-probs + old-policy log-probs (μ > 1) + μ optimizer updates, all on the host
when it returns; "phases" splits it (rollout, ref_logps, old_logps, updates; the rest is
rewards, advantages and the learner's bookkeeping). The first request includes compilation.
EOS is made impossible (the tokenizer's eos id is 259, outside the vocabulary), so every
completion has the full length; "lengths" and "reward_std" of each rollout show it.
"""
import json
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx
from tunix.models.qwen3 import model as qwen3
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout

PROMPT_BUCKET = 8  # prompts are padded to this many tokens (nanotune: next power of two >= 8)


class ByteTokenizer:
    """nanotune's byte vocabulary (ids 0-255 bytes, pad 256, bos 257), with an unreachable eos."""

    def encode(self, text, **kwargs):
        return list(text.encode("utf-8"))

    def decode(self, ids, **kwargs):
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def bos_id(self):
        return 257

    def eos_id(self):
        return 259  # never sampled: every completion runs to max_completion_len

    def pad_id(self):
        return 256


def reward(prompts, completions, **kwargs):
    """Any function of the text that differs within a group (the same one on both sides)."""
    return [float(sum(map(ord, c)) % 10) for c in completions]


def build(cfg: dict) -> grpo_learner.GRPOLearner:
    config = qwen3.ModelConfig(num_layers=2, vocab_size=259, embed_dim=128, hidden_dim=384, num_heads=4,
                               head_dim=32, num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6,
                               use_tied_embedding=True)
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    reference = qwen3.Qwen3(config, rngs=nnx.Rngs(0))  # RLCluster puts it on the mesh
    graphdef, state = nnx.split(reference)
    actor = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))
    updates = cfg["num_iterations"] * 200  # grpo.py's defaults: 200 steps, 3% warmup, lr 5e-4, clip 1
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 5e-4, int(0.03 * updates), updates)))
    C = cfg["max_completion_len"]
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={role: mesh for role in (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE,
                                              rl_cluster_lib.Role.ROLLOUT)},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=tx, eval_every_n_steps=1_000_000, max_steps=1_000_000, pbar_description=None),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=C, max_prompt_length=PROMPT_BUCKET, kv_cache_size=PROMPT_BUCKET + C,
            temperature=1.0, top_p=1.0, top_k=None),
    )
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=ByteTokenizer(),
                                       cluster_config=cluster_config)
    algo = grpo_learner.GRPOConfig(num_generations=cfg["num_generations"], num_iterations=cfg["num_iterations"],
                                   beta=cfg["beta"], epsilon=0.2)
    return grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[reward])


def timed(fn, phases, name):
    """Wrap a cluster method: add its wall time (results ready) to phases[name]."""
    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
        return out
    return wrapped


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cfg = json.loads(sys.argv[1])
    print(f"tunix_grpo_worker: jax {jax.__version__} on {jax.devices()}, {cfg}", file=sys.stderr, flush=True)
    learner = build(cfg)
    cluster, phases = learner.rl_cluster, {}
    for method, name in (("generate", "rollout"), ("get_ref_per_token_logps", "ref_logps"),
                         ("get_old_per_token_logps", "old_logps"), ("update_actor", "updates")):
        setattr(cluster, method, timed(getattr(cluster, method), phases, name))
    seen = {}  # completion lengths and rewards of the last rollout: a check that the work is equal
    generate = cluster.generate

    def generate_and_check(prompts, **kwargs):
        out = generate(prompts, **kwargs)
        seen.update(lengths=sorted({len(t) for t in out.tokens}), reward_std=float(np.std(reward(prompts, out.text))))
        return out
    cluster.generate = generate_and_check
    params = lambda: nnx.state(cluster.actor_trainer.model, nnx.Param)
    for line in sys.stdin:
        if not line.strip():
            continue
        prompts = json.loads(line)["prompts"]
        phases.clear()
        start = time.perf_counter()
        learner.train([{"prompts": np.array(prompts)}])  # one batch: one GRPO step, then the iterator ends
        jax.block_until_ready(params())
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "phases": phases, **seen}), flush=True)


if __name__ == "__main__":
    main()
