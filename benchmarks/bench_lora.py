"""Step time and peak memory of full SFT, LoRA and QLoRA (nf4, int8) on the same model, in one run.

Each measurement is a fresh subprocess; its peak resident memory is counted from the end of
loading (which reads float32 weights before quantizing) through the timed steps. The modes
alternating A B C D A B C D; the train step is the scripts' own (`sft.make_train_step`, which
lora.py trains with), AdamW, float32 master weights, one micro-batch.

    python benchmarks/bench_lora.py                        # Gemma 3 270M shapes, random weights
    python benchmarks/bench_lora.py --ckpt ~/.cache/nanotune-tests/gemma3-270m-hf --batch 4 --len 128
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODES = ("sft", "lora", "qlora-nf4", "qlora-int8")


def worker(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np
    import optax
    from flax import nnx

    import ckpt
    import adapters
    import model as M
    import sft

    model = ckpt.load_model(args.model, ckpt=args.ckpt, param_dtype="float32").model
    if args.mode != "sft":
        adapters.add_lora(model, args.rank, 2.0 * args.rank)
        if args.mode.startswith("qlora"):
            adapters.quantize_model(model, args.mode.split("-")[1])
    param_bytes = M.param_bytes(model)
    tx = optax.adamw(1e-5)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.cfg.vocab_size, (1, args.batch, args.len)).astype(np.int32)
    batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens), "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(args.len, dtype=np.int32), tokens.shape).copy()}
    # lora.py trains with sft.py's step; only what is split off as trainable differs
    graphdef, params, frozen = nnx.split(model, nnx.Param if args.mode == "sft" else adapters.LoRA, ...)
    step = jax.jit(sft.make_train_step(graphdef, tx), donate_argnums=(0, 1))
    run = lambda p, o: step(p, o, frozen, batch, jax.random.key(0))  # noqa: E731
    del model
    opt_state = tx.init(params)
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/clear_refs", "w") as f:  # Linux: restart the peak-RSS count (VmHWM) here
        f.write("5")
    times = []
    for i in range(args.steps + 1):  # the first step compiles
        start = time.perf_counter()
        params, opt_state, metrics = run(params, opt_state)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return {"mode": args.mode, "step_s": statistics.median(times[1:]), "param_bytes": param_bytes,
            "trainable": sum(x.size for x in jax.tree.leaves(params)),
            "load_peak_rss_bytes": load_peak, "peak_rss_bytes": vm_hwm()}


def vm_hwm() -> int:
    """Peak resident memory since the last clear_refs, from /proc/self/status."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    results = {m: [] for m in MODES}
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("mode", "repeats") and v is not None]
    for r in range(args.repeats):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, *flags, "--mode", mode], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{mode} failed: {out.stderr.strip().splitlines()[-1]}")
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {mode}: {results[mode][-1]}", file=sys.stderr)
    base = statistics.median(x["step_s"] for x in results["sft"])
    base_rss = statistics.median(x["peak_rss_bytes"] for x in results["sft"])
    print(f"\n{args.model}{' (' + args.ckpt + ')' if args.ckpt else ''}, batch {args.batch} x {args.len} tokens, "
          f"rank {args.rank}, median of {args.repeats} runs x {args.steps} steps\n")
    print("| mode | trainable params | parameter memory (MiB) | training peak RSS (MiB) | load peak RSS (MiB) "
          "| step (s) | step vs SFT |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        x = results[mode]
        step = statistics.median(r["step_s"] for r in x)
        rss = statistics.median(r["peak_rss_bytes"] for r in x)
        print(f"| {mode} | {x[0]['trainable'] / 1e6:.2f}M | {x[0]['param_bytes'] / 2**20:.0f} | "
              f"{rss / 2**20:.0f} ({rss / base_rss:.2f}x) | "
              f"{statistics.median(r['load_peak_rss_bytes'] for r in x) / 2**20:.0f} | {step:.2f} | {step / base:.2f}x |")


if __name__ == "__main__":
    main()
