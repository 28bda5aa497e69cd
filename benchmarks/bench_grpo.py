"""GRPO step time on a random tiny Qwen 3 (f32, CPU): nanotune's grpo.py vs Tunix's GRPOLearner.

One GRPO step = rollout (B prompts x G sampled completions of exactly C new tokens, EOS off)
+ rewards + group advantages + reference log-probs (beta > 0) + mu optimizer updates. Both
sides use the same shapes (nanotune's `tiny-qwen3`: vocab 259, dim 128, 2 layers, 4 heads, 2
KV heads, head_dim 32, FFN 384, QK-norm, tied embeddings, RoPE 1e6; each side its own random
init), prompt padding 8, temperature 1, AdamW + clip 1 with grpo.py's schedule, the same reward
function (a digit sum of the text: it differs within a group, so every update is a real one),
one device. Each system runs in its own process and the driver alternates A B A B, one step
per request; the first step (compilation) is reported separately.

    python benchmarks/bench_grpo.py                           # B,G,C,mu: 2,4,32,1 2,4,32,2 16,8,16,2 64,8,8,1
    python benchmarks/bench_grpo.py --settings 16,8,16,2 --repeats 30 --beta 0.02

nanotune's step is grpo.py's main loop body, through grpo.py's own phase functions (generate,
score, advantages, step_batches, the reference log-probs, policy_updates with make_train_step;
the rollout-learner correction on, as by default), timed here as four phases. Tunix runs when benchmarks/.tunix-venv
exists (see benchmarks/RESULTS.md for its install).
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
    """The same on both sides (tunix_grpo_worker.reward): varies within a group, costs nothing."""
    return [float(sum(map(ord, c)) % 10) for c in completions]


def nanotune_worker(setting):
    """grpo.py's per-step phases (its own functions, in main()'s order) on one device; returns run(prompts)."""
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    import ckpt
    import tokenizer
    import grpo
    import run as run_lib
    import sample
    import shard
    import tasks
    cfg = grpo.Config(prompts_per_step=setting["prompts_per_step"], num_generations=setting["num_generations"],
                      max_completion_len=setting["max_completion_len"], num_iterations=setting["num_iterations"],
                      beta=setting["beta"], warmup_sft_steps=0)
    model = ckpt.load_model("tiny-qwen3", dtype=cfg.dtype, param_dtype="float32", seed=cfg.seed).model
    tok, mesh = tokenizer.load_tokenizer(None), shard.make_mesh(cfg.mesh)
    eos_ids, pad_id = (), tok.pad_id  # no EOS: every completion has max_completion_len tokens
    graphdef, params, frozen = nnx.split(shard.shard_model(model, mesh), nnx.Param, ...)
    tx, _ = run_lib.adamw(cfg, cfg.steps * cfg.num_iterations)
    opt_state, param_sh, opt_sh = run_lib.init_optimizer(tx, params, mesh)
    ref = None if not cfg.beta else jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(params)
    train_step, logps = grpo.learner(graphdef, tx, cfg, mesh, param_sh, opt_sh)
    G = cfg.num_generations
    state = {"params": params, "opt_state": opt_state, "step": 0}

    def run(prompts):
        params, opt_state, step = state["params"], state["opt_state"], state["step"]
        t = [time.perf_counter()]
        rows = [{"prompt": p} for p in prompts for _ in range(G)]
        prompt_ids = [tok.encode(r["prompt"]) for r in rows]
        completions, sampler_logps = sample.generate(nnx.merge(graphdef, params, frozen), prompt_ids, seed=step,
                                                     max_new_tokens=cfg.max_completion_len, temperature=cfg.temperature,
                                                     eos_ids=eos_ids, return_logprobs=True)
        t.append(time.perf_counter())
        per_func = tasks.score([reward], rows, [tok.decode(c) for c in completions], completions)
        rewards = per_func @ np.ones(1)
        advantages, std = grpo.advantages(per_func, np.ones(1), [len(c) for c in completions], cfg)
        rollout = grpo.Rollout(rows, prompt_ids, completions, sampler_logps, [[1] * len(c) for c in completions],
                               np.zeros((len(rows), 2)), per_func, rewards, advantages, std)
        steps = grpo.step_batches(rollout, eos_ids, pad_id, cfg, mesh, step)
        t.append(time.perf_counter())
        for s in steps if cfg.beta else ():
            s["ref_logp"] = jax.block_until_ready(logps(ref, frozen, s))
        t.append(time.perf_counter())
        params, opt_state, _ = grpo.policy_updates(train_step, logps, params, opt_state, frozen, steps, cfg)
        jax.block_until_ready((params, opt_state))
        t.append(time.perf_counter())
        state.update(params=params, opt_state=opt_state, step=step + 1)
        phases = dict(zip(("rollout", "rewards_batch", "ref_logps", "updates"), np.diff(t).tolist()))
        compiles = {"train_step": train_step._cache_size(), "ref_logps": logps._cache_size(),
                    "generate": sample._generate._cache_size()}
        return {"seconds": t[-1] - t[0], "phases": phases, "lengths": sorted({len(c) for c in completions}),
                "reward_std": float(np.std(rewards)), "compiles": compiles}
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["2,4,32,1", "2,4,32,2", "16,8,16,2", "64,8,8,1"],
                   help="prompts per step B, group size G, new tokens C, updates per rollout mu")
    p.add_argument("--beta", type=float, default=0.02, help="KL coefficient (> 0: a reference forward per step)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per system and setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per system after the first")
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
        B, G, C, mu = map(int, text.split(","))
        setting = json.dumps({"prompts_per_step": B, "num_generations": G, "max_completion_len": C,
                              "num_iterations": mu, "beta": args.beta})
        workers = [Worker("nanotune", [sys.executable, str(HERE / "bench_grpo.py"), "--worker", setting])]
        if tunix_python.exists():
            workers.append(Worker("tunix", [str(tunix_python), str(HERE / "tunix_grpo_worker.py"), setting]))
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
        for name, rs in replies.items():  # medians in ms; lengths and reward spread: equal, real work
            median_ms = lambda key: statistics.median(r["phases"].get(key, 0.0) for r in rs) * 1000
            results.append({"system": name, "setting": (B, G, C, mu), "first_s": first[name],
                            "ms": statistics.median(r["seconds"] for r in rs) * 1000,
                            "phases": {k: median_ms(k) for k in rs[-1]["phases"]},
                            "lengths": sorted({n for r in rs for n in r["lengths"]}),
                            "zero_std_steps": sum(r["reward_std"] == 0 for r in rs),
                            "compiles": rs[-1].get("compiles")})
            print(f"{name:>9} B={B} G={G} C={C} mu={mu}: {results[-1]}", file=sys.stderr)

    print(f"\nGRPO step, random tiny Qwen 3 (f32), beta {args.beta}, prompt length 7 (padded to 8), EOS off, "
          f"median of {args.repeats} steps, {os.cpu_count()} CPU cores; phases: medians in ms, other = the rest\n")
    print("| B x G x C, mu | system | ms/step | first step (s) | rollout | ref + old log-probs | updates | other |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ph = r["phases"]
        logps = ph.get("ref_logps", 0) + ph.get("old_logps", 0)
        other = r["ms"] - ph["rollout"] - logps - ph["updates"]
        B, G, C, mu = r["setting"]
        print(f"| {B} x {G} x {C}, {mu} | {r['system']} | {r['ms']:.1f} | {r['first_s']:.1f} | "
              f"{ph['rollout']:.1f} | {logps:.1f} | {ph['updates']:.1f} | {other:.1f} |")
    print()
    for r in results:
        if r["system"] == "nanotune":
            peer = next((q for q in results if q["setting"] == r["setting"] and q["system"] == "tunix"), None)
            if peer:
                print(f"B x G x C, mu = {' x '.join(map(str, r['setting'][:3]))}, {r['setting'][3]}: "
                      f"nanotune = {peer['ms'] / r['ms']:.2f}x Tunix's speed")


if __name__ == "__main__":
    main()
