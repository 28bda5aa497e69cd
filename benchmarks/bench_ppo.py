"""PPO step time on a random tiny Qwen 3 (f32, CPU): nanotune's ppo.py vs Tunix's PPOLearner.

One PPO step = rollout (B prompts, one sampled completion of exactly C new tokens each, EOS off) + rewards +
reference log-probs, old-policy log-probs and the critic's values + GAE + `epochs` passes of one update of
the policy and one of the critic (one mini-batch each). Both sides: nanotune's `tiny-qwen3` shapes (vocab
259, dim 128, 2 layers, 4 heads, 2 KV heads, head_dim 32, FFN 384, QK-norm, tied embeddings, RoPE 1e6; each
side its own random init) for the policy and for the critic's trunk, a value head D → 1 on the critic's
final norm, prompt padding 8, temperature 1, k1 KL in the reward (kl_coef 0.05), γ 1, λ 0.95, AdamW + clip 1
for each network, the same reward function (a digit sum of the text), one device. Each system runs in its
own process and the driver alternates A B A B, one step per request; the first step (compilation) is
reported separately.

    python benchmarks/bench_ppo.py                            # B,C,epochs: 8,16,4 64,8,4
    python benchmarks/bench_ppo.py --settings 64,8,4 --repeats 30

nanotune's step is ppo.py's main loop body through ppo.py's own functions (make_scorer, advantages,
ppo_updates with make_train_step), timed as four phases. Tunix runs when benchmarks/.tunix-venv exists (see
benchmarks/RESULTS.md for its install).
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time

from worker import Worker

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def reward(prompts, completions, **columns):
    """The same on both sides (tunix_grpo_worker.reward): varies across completions, costs nothing."""
    return [float(sum(map(ord, c)) % 10) for c in completions]


def nanotune_worker(setting):
    """ppo.py's per-step phases (its own functions, in main()'s order) on one device; returns run(prompts)."""
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    import ckpt
    import data
    import ppo
    import run as run_lib
    import sample
    import shard
    import tasks
    import tokenizer
    B, C, epochs = setting["prompts_per_step"], setting["max_completion_len"], setting["num_ppo_epochs"]
    cfg = ppo.Config(prompts_per_step=B, max_completion_len=C, num_ppo_epochs=epochs, kl_coef=setting["kl_coef"],
                     warmup_sft_steps=0, steps=200)
    cfg.weights = np.ones(1)
    model = ckpt.load_model("tiny-qwen3", dtype=cfg.dtype, param_dtype="float32", seed=cfg.seed).model
    tok, mesh = tokenizer.load_tokenizer(None), shard.make_mesh(cfg.mesh)
    model = shard.shard_model(model, mesh)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    critic_graphdef, critic, critic_frozen = ppo.make_critic(model, cfg, mesh)
    (tx, _), (critic_tx, _) = run_lib.adamw(cfg, cfg.steps * epochs), run_lib.adamw(cfg, cfg.steps * epochs)
    opt_state, param_sh, opt_sh = run_lib.init_optimizer(tx, params, mesh)
    critic_opt_state, critic_sh, critic_opt_sh = run_lib.init_optimizer(critic_tx, critic, mesh)
    ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(params)
    state_sh = {"params": param_sh, "opt_state": opt_sh, "critic": critic_sh, "critic_opt_state": critic_opt_sh}
    train_step = jax.jit(ppo.make_train_step(graphdef, critic_graphdef, tx, critic_tx, cfg), donate_argnums=(0,),
                         out_shardings=(state_sh, None))
    score = ppo.make_scorer(graphdef, critic_graphdef, cfg)
    state = {"params": params, "opt_state": opt_state, "critic": critic, "critic_opt_state": critic_opt_state}
    step = [0]

    def run(prompts):
        nonlocal state
        t = [time.perf_counter()]
        rows = [{"prompt": p} for p in prompts]
        prompt_ids = [tok.encode(r["prompt"]) for r in rows]
        completions = sample.generate(nnx.merge(graphdef, state["params"], frozen), prompt_ids, seed=step[0],
                                      max_new_tokens=C, temperature=cfg.temperature, eos_ids=())  # EOS off
        t.append(time.perf_counter())
        per_func = tasks.score([reward], rows, [tok.decode(c) for c in completions], completions)
        r = ppo.Rollout(rows, prompt_ids, completions, per_func, np.zeros(B, bool), per_func[:, 0].astype(np.float32))
        batch = data.completion_batch(prompt_ids, completions, tok.pad_id, C)
        t.append(time.perf_counter())
        scored = score(state["params"], ref, state["critic"], frozen, critic_frozen, shard.micro_batches(batch, mesh, 1))
        old_logp, ref_logp, old_values = (np.asarray(x).reshape(batch["mask"].shape) for x in jax.device_get(scored))
        learner_batch, _ = ppo.advantages(r, batch, old_logp, ref_logp, old_values, cfg)
        t.append(time.perf_counter())
        state, _ = jax.block_until_ready(ppo.ppo_updates(train_step, state, frozen, critic_frozen, learner_batch, cfg,
                                                         mesh, step[0]))
        t.append(time.perf_counter())
        step[0] += 1
        phases = dict(zip(("rollout", "rewards_batch", "logps_values_gae", "updates"), np.diff(t).tolist()))
        return {"seconds": t[-1] - t[0], "phases": phases, "lengths": sorted({len(c) for c in completions}),
                "compiles": {"train_step": train_step._cache_size(), "score": score._cache_size()}}
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["8,16,4", "64,8,4"],
                   help="prompts per step B, new tokens C, PPO epochs (one mini-batch each)")
    p.add_argument("--kl-coef", type=float, default=0.05, help="the KL penalty's coefficient in the reward")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per system and setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per system after the first")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run = nanotune_worker(json.loads(args.worker))
        for line in sys.stdin:
            print(json.dumps(run(json.loads(line)["prompts"])), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    import tasks
    task_prompts = [r["prompt"] for r in tasks.Arithmetic("*", 3, 1).examples("train", 4096, 0)]
    tunix_python = HERE / ".tunix-venv" / "bin" / "python"
    if not tunix_python.exists():
        print("(no benchmarks/.tunix-venv: Tunix skipped)", file=sys.stderr)
    results = []
    for text in args.settings:
        B, C, epochs = map(int, text.split(","))
        setting = json.dumps({"prompts_per_step": B, "max_completion_len": C, "num_ppo_epochs": epochs,
                              "kl_coef": args.kl_coef})
        workers = [Worker("nanotune", [sys.executable, str(HERE / "bench_ppo.py"), "--worker", setting])]
        if tunix_python.exists():
            workers.append(Worker("tunix", [str(tunix_python), str(HERE / "tunix_ppo_worker.py"), setting]))
        batches = (task_prompts[(i * B) % len(task_prompts):][:B] for i in range(10**9))
        first = {}
        for w in workers:  # compile, then a few untimed steps
            first[w.name] = w(prompts=next(batches))["seconds"]
            for _ in range(args.warmup):
                w(prompts=next(batches))
        replies = {w.name: [] for w in workers}
        for _ in range(args.repeats):  # alternate A B A B
            for w in workers:
                replies[w.name].append(w(prompts=next(batches)))
        for w in workers:
            w.close()
        for name, rs in replies.items():
            results.append({"system": name, "setting": (B, C, epochs), "first_s": first[name],
                            "ms": statistics.median(r["seconds"] for r in rs) * 1000,
                            "phases": {k: statistics.median(r["phases"].get(k, 0.0) for r in rs) * 1000
                                       for k in rs[-1]["phases"]},
                            "lengths": sorted({n for r in rs for n in r["lengths"]})})
            print(f"{name:>9} B={B} C={C} epochs={epochs}: {results[-1]}", file=sys.stderr)
    print(f"\nPPO step, random tiny Qwen 3 policy and critic (f32), kl_coef {args.kl_coef}, prompt length 7 (padded "
          f"to 8), EOS off, median of {args.repeats} steps, {os.cpu_count()} CPU cores; phases: medians in ms\n")
    print("| B x C, epochs | system | ms/step | first step (s) | rollout | log-probs + values | updates | other |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ph = r["phases"]
        scoring = ph.get("logps_values_gae", 0) + ph.get("ref_logps", 0) + ph.get("old_logps", 0) + ph.get("values", 0)
        other = r["ms"] - ph["rollout"] - scoring - ph["updates"]
        B, C, epochs = r["setting"]
        print(f"| {B} x {C}, {epochs} | {r['system']} | {r['ms']:.1f} | {r['first_s']:.1f} | {ph['rollout']:.1f} | "
              f"{scoring:.1f} | {ph['updates']:.1f} | {other:.1f} |")
    print()
    for r in results:
        peer = next((q for q in results if q["setting"] == r["setting"] and q["system"] == "tunix"), None)
        if r["system"] == "nanotune" and peer:
            print(f"B x C, epochs = {r['setting'][0]} x {r['setting'][1]}, {r['setting'][2]}: "
                  f"nanotune = {peer['ms'] / r['ms']:.2f}x Tunix's speed")


if __name__ == "__main__":
    main()
