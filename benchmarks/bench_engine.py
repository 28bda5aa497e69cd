"""Continuous batching (engine.py) vs one static batch at a time (sample.generate) on a skewed workload.

Most requests want a few tokens, a few run long (as completions in RL on reasoning tasks, or a server's mixed
clients): R requests, 1 in 8 asking for --long new tokens, the rest for --short, greedy, EOS off, so every
request's length is its own limit and both sides make exactly the same ids (checked). The static side decodes
batches of S requests in arrival order, each batch until its longest request is done (what a fixed batch
must do); the engine decodes in S slots refilled as requests end. Both warmed up (compiled) first; the two
alternate, --repeats times, and the median wall time is reported.

    python benchmarks/bench_engine.py                          # tiny Qwen 3 and the real Gemma 3 270M
    python benchmarks/bench_engine.py --models tiny-qwen3 --slots 8 16
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def load(name):
    from flax import nnx

    import ckpt
    from model import CONFIGS, Transformer
    if name == "gemma3-270m":
        import gemma3_reference
        return ckpt.load_hf(gemma3_reference.build())
    return Transformer(CONFIGS[name], nnx.Rngs(0))


def workload(requests: int, short: int, long: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 250, rng.integers(4, 14)).tolist() for _ in range(requests)]
    limits = [long if i % 8 == 3 else short for i in range(requests)]
    return prompts, limits


def static_batches(model, prompts, limits, slots):
    import sample
    out = []
    for i in range(0, len(prompts), slots):
        batch, wants = prompts[i:i + slots], limits[i:i + slots]
        ids = sample.generate(model, batch, max_new_tokens=max(wants), eos_ids=())
        out += [row[:want] for row, want in zip(ids, wants)]
    return out


def continuous(model, prompts, limits, slots, chunk):
    import engine
    eng = engine.Engine(model, slots=slots, max_new_tokens=max(limits), max_prompt_len=max(map(len, prompts)),
                        chunk=chunk, eos_ids=())
    rids = [eng.add(p, max_new_tokens=n) for p, n in zip(prompts, limits)]
    got = {r: [] for r in rids}
    while eng.busy():
        for update in eng.step():
            got[update.request] += update.ids
    return [got[r] for r in rids]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny-qwen3", "gemma3-270m"])
    p.add_argument("--slots", type=int, nargs="+", default=[8])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--long", type=int, default=128)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    prompts, limits = workload(args.requests, args.short, args.long)
    rows = []
    for name in args.models:
        model = load(name)
        for slots in args.slots:
            sides = {"static batch": lambda: static_batches(model, prompts, limits, slots),
                     "engine": lambda: continuous(model, prompts, limits, slots, args.chunk)}
            outs = {side: run() for side, run in sides.items()}  # warm-up: every shape compiled
            assert outs["static batch"] == outs["engine"], f"{name}: the engine's ids differ from generate's"
            times = {side: [] for side in sides}
            for _ in range(args.repeats):
                for side, run in sides.items():
                    start = time.perf_counter()
                    run()
                    times[side].append(time.perf_counter() - start)
            static, cont = (statistics.median(times[s]) for s in sides)
            rows.append((name, slots, static, cont))
            print(f"{name} S={slots}: static {static:.2f} s, engine {cont:.2f} s", file=sys.stderr)
    tokens = sum(limits)
    print(f"\n{args.requests} requests, 1 in 8 of {args.long} new tokens, the rest {args.short} ({tokens} tokens), "
          f"greedy, EOS off, chunk {args.chunk}, median of {args.repeats}, {os.cpu_count()} CPU cores\n")
    print("| model | slots | static batches (s) | engine (s) | static tok/s | engine tok/s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, slots, static, cont in rows:
        print(f"| {name} | {slots} | {static:.2f} | {cont:.2f} | {tokens / static:.0f} | {tokens / cont:.0f} | "
              f"{static / cont:.2f}x |")


if __name__ == "__main__":
    main()
