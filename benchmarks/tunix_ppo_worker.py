"""Tunix PPO-step worker: Tunix's PPOLearner on a random tiny Qwen 3 behind a JSON-lines pipe.

Tunix's own Qwen 3 (tunix.models.qwen3) with the shapes of nanotune's `tiny-qwen3` preset (vocab 259 = bytes +
pad/bos/eos, dim 128, 2 layers, 4 heads, 2 KV heads, head_dim 32, FFN 384, QK-norm, tied embeddings, RoPE base
1e6), float32, one CPU device. The critic is a second such trunk with a value head (D → 1) on its final norm,
as ppo.py's; actor, reference, critic and rollout share the mesh. It needs Tunix's own virtual environment:

    benchmarks/.tunix-venv/bin/python benchmarks/tunix_ppo_worker.py '{"prompts_per_step": 8,
        "max_completion_len": 16, "num_ppo_epochs": 4, "kl_coef": 0.05}'

Protocol: one JSON line per request on stdin, {"prompts": [...]} (prompts_per_step strings), one reply per
request on stdout: {"seconds", "phases", "lengths"}. `seconds` is the wall time of `learner.train()` over a
one-batch dataset: one PPO step = rollout (temperature 1, one completion per prompt) + rewards + reference,
old-policy log-probs and the critic's values + GAE + num_ppo_epochs updates of the actor and of the critic,
all on the host when it returns; "phases" splits it (rollout, ref_logps, old_logps, values, updates: both
networks'). EOS is unreachable (id 259, outside the vocabulary): every completion has the full length.
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
from tunix.rl.ppo import ppo_learner
from tunix.rl.rollout import base_rollout

from tunix_grpo_worker import PROMPT_BUCKET, ByteTokenizer, reward, timed


class Critic(nnx.Module):
    """A Qwen 3 trunk and a value head on its final norm: the values [B, L, 1] Tunix's compute_score reads."""

    def __init__(self, config, rngs):
        self.trunk = qwen3.Qwen3(config, rngs=rngs)
        self.v_head = nnx.Linear(config.embed_dim, 1, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, input_tokens, positions, cache, attention_mask, **kwargs):
        x = self.trunk.embedder.encode(input_tokens)
        for layer in self.trunk.layers:
            _, x = layer(x, positions, None, attention_mask)
        return self.v_head(self.trunk.final_norm(x)), None


def build(cfg: dict) -> ppo_learner.PPOLearner:
    config = qwen3.ModelConfig(num_layers=2, vocab_size=259, embed_dim=128, hidden_dim=384, num_heads=4,
                               head_dim=32, num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6,
                               use_tied_embedding=True)
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    reference = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(reference)
    actor = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))
    critic = Critic(config, nnx.Rngs(1))
    updates = cfg["num_ppo_epochs"] * 200  # ppo.py's schedule: warmup 5%, cosine; lr 3e-4 both, clip 1

    def adamw():
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-4, int(0.05 * updates), updates)))
    C = cfg["max_completion_len"]
    roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT,
             rl_cluster_lib.Role.CRITIC)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={role: mesh for role in roles}, rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=adamw(), critic_optimizer=adamw(), eval_every_n_steps=1_000_000, max_steps=1_000_000,
            pbar_description=None),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=C, max_prompt_length=PROMPT_BUCKET, kv_cache_size=PROMPT_BUCKET + C,
            temperature=1.0, top_p=1.0, top_k=None),
    )
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, critic=critic, tokenizer=ByteTokenizer(),
                                       cluster_config=cluster_config)
    algo = ppo_learner.PPOConfig(num_iterations=cfg["num_ppo_epochs"], beta=cfg["kl_coef"], kl_method="kl",
                                 gamma=1.0, gae_lambda=0.95, epsilon=0.2, clip_range_value=0.2)
    return ppo_learner.PPOLearner(rl_cluster=cluster, ppo_config=algo, reward_fns=[reward])


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cfg = json.loads(sys.argv[1])
    print(f"tunix_ppo_worker: jax {jax.__version__} on {jax.devices()}, {cfg}", file=sys.stderr, flush=True)
    learner = build(cfg)
    cluster, phases = learner.rl_cluster, {}
    for method, name in (("generate", "rollout"), ("get_ref_per_token_logps", "ref_logps"),
                         ("get_old_per_token_logps", "old_logps"), ("get_values", "values"),
                         ("update_actor", "updates"), ("update_critic", "updates")):
        setattr(cluster, method, timed(getattr(cluster, method), phases, name))
    seen = {}
    generate = cluster.generate

    def generate_and_check(prompts, **kwargs):
        out = generate(prompts, **kwargs)
        seen.update(lengths=sorted({len(t) for t in out.tokens}))
        return out
    cluster.generate = generate_and_check
    for line in sys.stdin:
        if not line.strip():
            continue
        prompts = json.loads(line)["prompts"]
        phases.clear()
        start = time.perf_counter()
        learner.train([{"prompts": np.array(prompts)}])  # one batch: one PPO step, then the iterator ends
        jax.block_until_ready((nnx.state(cluster.actor_trainer.model, nnx.Param),
                               nnx.state(cluster.critic_trainer.model, nnx.Param)))
        print(json.dumps({"seconds": time.perf_counter() - start, "phases": phases, **seen}), flush=True)


if __name__ == "__main__":
    main()
