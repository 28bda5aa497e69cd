"""The Qwen 3 MoE layer and step: moe.py's grouped and dense paths vs Tunix's Qwen 3 MoELayer, and the SFT
step of tiny-qwen3-moe vs the dense tiny Qwen 3 with the same active parameters.

Part 1, the layer (`--parts layer`): one step = forward and backward of M tokens through one sparse layer
(router [D, E], SwiGLU experts gate/up [E, D, F], down [E, F, D], top-k, the k weights renormalised), the
loss sum(y * c) for a fixed random c [1, M, D], its gradient w.r.t. the input and every weight (router
included), float32, one CPU device, one jitted `jax.value_and_grad` timed until the loss, y and the
gradients are ready. Every system gets the same arrays (`layer_arrays`, numpy seed 0) at M x D x F =
`--layer-shape` (default 1024 x 256 x 128) and E experts, top-k, per setting (default E8k2, E32k8, E128k8):

    grouped  nanotune: `moe.experts(p, h, cfg, silu, grouped=True)`: (token, expert) rows sorted by
             expert, one `jax.lax.ragged_dot` per projection, unsorted
    dense    nanotune: the same with grouped=False: every expert on every token, the unchosen weighted by 0
    tunix    Tunix 0.1.7's `tunix.models.qwen3.model.MoELayer` (benchmarks/tunix_moe_worker.py, Tunix's venv)
             with the same weights copied in; without a mesh, or on CPU, it runs its dense fallback
             (one-hot dispatch, a Python loop over all E experts on all tokens, combine)

moe.py's `norm_topk_prob=True`, as Tunix always renormalises. In the first round every system writes y and
its gradients, and the driver prints each one's largest difference from Tunix's (from the first system's
without Tunix), relative to the largest value of that array: the same function, or exit status 1 past 1e-4.

Part 2, the step (`--parts step`): sft.py's training step (`sft.make_train_step` with `run.adamw` and the
model's router aux loss coefficient, as bench_train.py runs it: forward, backward, global norm, AdamW) over
B x T random tokens per setting (default 8x64 and 16x256), float32, for

    moe          tiny-qwen3-moe (model.CONFIGS: vocab 259, dim 128, 2 layers, both sparse, 4 experts of
                 width 128, top-2); at this size `moe.experts` picks the dense path
    moe-grouped  the same with the grouped path forced (moe.experts patched to grouped=True in the worker)
    dense        the same Qwen 3 with no experts and ffn_dim 256 (= top-2 x 128): the same active parameters

Every measurement is a fresh process (peak resident memory from after building through compilation and
the timed steps), systems alternating A B C A B C. The first step compiles and is left out; a process's step
time is the median of the others, a system's the median over its processes. MFU is model FLOPs per step /
step time / the f32 matmul roofline (2048^3, bench_train.roofline) measured in this run before and after,
with model FLOPs counting the active experts only (k of E): 3 x 2 x (D E + 3 k D F) per token for the layer,
bench_train.step_flops of the dense twin (+ the routers) for the step; the dense paths do E / k times that.

    python benchmarks/bench_moe.py                                    # both parts, all systems
    python benchmarks/bench_moe.py --parts layer --repeats 3 --steps 2
    python benchmarks/bench_moe.py --parts step --step-settings 8x64 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time

from worker import last_json, peak_rss, reset_peak

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TUNIX_PYTHON = HERE / ".tunix-venv" / "bin" / "python"
GRAD_NAMES = ("router", "expert_gate", "expert_up", "expert_down")  # moe.py's names, Tunix's in its worker
TOLERANCE = 1e-4  # largest difference allowed between two systems' y or gradients, relative to the array's max


def parse_layer(setting: str) -> tuple[int, int]:
    """'E32k8' → (E, k)."""
    match = re.fullmatch(r"E(\d+)k(\d+)", setting)
    if not match:
        raise ValueError(f"layer setting {setting!r}: not E<experts>k<top-k>")
    return int(match[1]), int(match[2])


def parse_shape(text: str) -> tuple[int, ...]:
    """'1024x256x128' → (1024, 256, 128)."""
    return tuple(int(x) for x in text.split("x"))


def layer_arrays(E: int, M: int, D: int, F: int) -> dict:
    """The layer's input h [1, M, D], cotangent c [1, M, D] and weights in moe.py's names and layouts
    (router [D, E], expert_gate/up [E, D, F], expert_down [E, F, D]), float32, numpy seed 0: both workers
    build the same ones."""
    import numpy as np
    rng = np.random.default_rng(0)
    normal = lambda shape, scale: rng.normal(0.0, scale, shape).astype(np.float32)  # noqa: E731
    return {"h": normal((1, M, D), 1.0), "c": normal((1, M, D), 1.0), "router": normal((D, E), D ** -0.5),
            "expert_gate": normal((E, D, F), D ** -0.5), "expert_up": normal((E, D, F), D ** -0.5),
            "expert_down": normal((E, F, D), F ** -0.5)}


def layer_flops(E: int, k: int, M: int, D: int, F: int) -> float:
    """Model FLOPs of one layer step: forward, input and weight gradients (3 x 2 per weight per token) of the
    router and the k active experts."""
    return 3 * 2 * M * (D * E + 3 * k * D * F)


def timed_steps(fn, args, steps: int, label: str) -> tuple[list[float], object]:
    """steps + 1 calls of fn(*args) (the first compiles), each timed until its outputs are ready: (the
    seconds of each, the last call's outputs)."""
    import jax
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
        print(f"{label} {times[-1]:.3f}s", file=sys.stderr, flush=True)
    return times, out


# ----------------------------------------------------------------------------- workers (own process)

def layer_worker(setting: str, system: str, shape: str, steps: int, dump: str | None) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np

    import moe

    if system not in ("grouped", "dense"):
        raise ValueError(f"layer system {system!r}: grouped or dense")
    (E, k), (M, D, F) = parse_layer(setting), parse_shape(shape)
    arrays = {name: jnp.asarray(x) for name, x in layer_arrays(E, M, D, F).items()}
    h, c = arrays.pop("h"), arrays.pop("c")
    cfg = moe.Experts(n_experts=E, top_k=k, ffn_dim=F, norm_topk_prob=True, sparse_layers=(True,))

    def loss(p, h):
        y, _ = moe.experts(p, h, cfg, jax.nn.silu, grouped=system == "grouped")
        return jnp.sum(y * c), y
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    reset_peak()
    times, ((_, y), (dp, dh)) = timed_steps(step, (arrays, h), steps, f"nanotune {system} {setting}")
    if dump:
        np.savez(dump, y=y, dh=dh, **dp)
    return {"step_s": times, "peak_rss_bytes": peak_rss(), "params": sum(x.size for x in arrays.values())}


def step_config(system: str):
    """model.Config of a step system: tiny-qwen3-moe, or its dense twin with ffn_dim = top_k x the expert width."""
    import model as M
    cfg = M.CONFIGS["tiny-qwen3-moe"]
    if system == "dense":
        return cfg.replace(experts=None, ffn_dim=cfg.experts.top_k * cfg.experts.ffn_dim)
    if system not in ("moe", "moe-grouped"):
        raise ValueError(f"step system {system!r}: moe, moe-grouped or dense")
    return cfg


def step_worker(setting: str, system: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import functools

    import jax
    import numpy as np
    from flax import nnx

    import moe
    import run
    import sft
    from model import Transformer

    cfg = step_config(system)
    if system == "moe-grouped":  # model.py reaches the experts through moe.mlp_or_experts → moe.experts
        moe.experts = functools.partial(moe.experts, grouped=True)
    B, T = parse_shape(setting)
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, B, T)).astype(np.int32)  # [grad_accum, B, T]
    batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens), "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape).copy()}
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx, _ = run.adamw(sft.Config(), 1000)
    step = jax.jit(sft.make_train_step(graphdef, tx, moe.aux_loss_coef(None, cfg)), donate_argnums=(0, 1))
    opt_state = tx.init(params)
    del model
    reset_peak()
    times = []
    for _ in range(steps + 1):  # the first compiles
        start = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, frozen, batch, jax.random.key(0))
        jax.block_until_ready((params, metrics["loss"]))
        times.append(time.perf_counter() - start)
        print(f"nanotune {system} {setting} loss {float(metrics['loss']):.4f} {times[-1]:.3f}s", file=sys.stderr,
              flush=True)
    return {"step_s": times, "peak_rss_bytes": peak_rss(), "params": sum(x.size for x in jax.tree.leaves(params))}


# ----------------------------------------------------------------------------- driver

def measure(args, part: str, setting: str, system: str, dump: str | None = None) -> dict:
    """One measurement in a fresh process; its step time the median of the timed steps."""
    if system == "tunix":
        (E, k), (M, D, F) = parse_layer(setting), parse_shape(args.layer_shape)
        config = {"experts": E, "top_k": k, "tokens": M, "dim": D, "ffn": F, "dump": dump}
        out = last_json([TUNIX_PYTHON, HERE / "tunix_moe_worker.py", json.dumps(config)],
                        json.dumps({"steps": args.steps + 1}) + "\n")
    else:
        extra = [f"--dump={dump}"] if dump else []
        out = last_json([sys.executable, __file__, f"--steps={args.steps}", f"--layer-shape={args.layer_shape}",
                         f"--worker={part},{setting},{system}", *extra])
    out["step"] = statistics.median(out["step_s"][1:])
    return out


def agreement(dumps: dict) -> dict:
    """{system: largest |difference| from the reference system's y, dh and weight gradients, relative to the
    reference array's largest |value|}; the reference is Tunix when it ran, else the first system."""
    import numpy as np
    if not dumps:
        return {}
    ref_name = "tunix" if "tunix" in dumps else next(iter(dumps))
    ref = np.load(dumps[ref_name])
    errors = {}
    for system, path in dumps.items():
        if system != ref_name:
            got = np.load(path)
            errors[system] = max(float(np.max(np.abs(got[n] - ref[n])) / np.max(np.abs(ref[n]))) for n in ref.files)
    return {"reference": ref_name, **errors}


def run_part(args, part: str, settings: list[str], systems: list[str], failed: list) -> list:
    """Every (setting, system) `repeats` times, systems alternating; in the layer part's first round each
    system dumps y and its gradients and `agreement` compares them. [(setting, {system: [outs]}, agree)]."""
    rows = []
    for setting in settings:
        results, dumps = {s: [] for s in systems}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                for system in systems:
                    dump = f"{tmp}/{system}.npz" if part == "layer" and r == 0 else None
                    try:
                        out = measure(args, part, setting, system, dump)
                    except (RuntimeError, ValueError) as e:  # the others still run; the exit status says so
                        print(f"{system} {part} {setting}: {e}", file=sys.stderr)
                        failed.append(f"{system} {part} {setting}")
                        continue
                    results[system].append(out)
                    dumps.update({system: dump} if dump else {})
                    print(f"round {r + 1} {system} {part} {setting}: step {out['step'] * 1e3:.1f} ms (first "
                          f"{out['step_s'][0]:.1f}s), peak RSS {out['peak_rss_bytes'] / 2**30:.2f} GiB",
                          file=sys.stderr, flush=True)
            agree = agreement(dumps)
        bad = [s for s, e in agree.items() if s != "reference" and not e <= TOLERANCE]
        failed.extend(f"{s} {setting} differs from {agree['reference']} by {agree[s]:.1e}" for s in bad)
        rows.append((setting, results, agree))
    return rows


def medians(runs: list) -> tuple[float, float]:
    """(step seconds, peak RSS GiB): medians over a system's processes."""
    return statistics.median(x["step"] for x in runs), statistics.median(x["peak_rss_bytes"] for x in runs) / 2**30


def layer_table(args, rows: list, f32: float) -> None:
    M, D, F = parse_shape(args.layer_shape)
    print(f"\nThe layer: M = {M} tokens, D = {D}, F = {F}, float32, forward + backward (input and weights)\n")
    print("| E, top-k | system | step (ms) | tokens/s | MFU (active) | peak RSS (GiB) | vs Tunix | max rel. diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting, results, agree in rows:
        E, k = parse_layer(setting)
        step = {s: medians(v)[0] for s, v in results.items() if v}
        for system, runs in results.items():
            if not runs:
                continue
            mfu = layer_flops(E, k, M, D, F) / step[system] / (f32 * 1e9)
            ratio = f"**{step['tunix'] / step[system]:.2f}x**" if "tunix" in step and system != "tunix" else ""
            diff = f"{agree[system]:.1e}" if system in agree else "reference" if agree.get("reference") == system \
                else ""
            print(f"| E {E}, k {k} | {system} | {step[system] * 1e3:.1f} | {M / step[system]:.0f} | {mfu:.1%} | "
                  f"{medians(runs)[1]:.2f} | {ratio} | {diff} |")


def step_table(rows: list, f32: float) -> None:
    sys.path.insert(0, str(ROOT))
    import bench_train
    dense, moe_cfg = step_config("dense"), step_config("moe")
    print("\nThe SFT step: tiny-qwen3-moe vs its dense twin (ffn_dim 256), float32\n")
    print("| B x T | system | step (ms) | tokens/s | MFU | peak RSS (GiB) | vs dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for setting, results, _ in rows:
        B, T = parse_shape(setting)
        flops = bench_train.step_flops(dense, B, T, "full")
        step = {s: medians(v)[0] for s, v in results.items() if v}
        for system, runs in results.items():
            if not runs:
                continue
            router = 0 if system == "dense" else 6 * dense.n_layers * dense.dim * moe_cfg.experts.n_experts * B * T
            ratio = f"**{step['dense'] / step[system]:.2f}x**" if "dense" in step and system != "dense" else ""
            print(f"| {B}x{T} | {system} | {step[system] * 1e3:.1f} | {B * T / step[system]:.0f} | "
                  f"{(flops + router) / step[system] / (f32 * 1e9):.1%} | {medians(runs)[1]:.2f} | {ratio} |")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="layer,step")
    parser.add_argument("--layer-settings", default="E8k2,E32k8,E128k8", help="E<experts>k<top-k>, comma-separated")
    parser.add_argument("--layer-shape", default="1024x256x128", help="tokens M x dim D x expert width F")
    parser.add_argument("--layer-systems", default="grouped,dense,tunix")
    parser.add_argument("--step-settings", default="8x64,16x256", help="B x T, comma-separated")
    parser.add_argument("--step-systems", default="moe,moe-grouped,dense")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one that compiles)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per system and setting")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # part,setting,system: run nanotune's side here
    parser.add_argument("--dump", help=argparse.SUPPRESS)  # the layer worker writes y and its gradients here
    return parser.parse_args()


def main():
    args = parse_args()
    if args.worker:
        part, setting, system = args.worker.split(",")
        out = layer_worker(setting, system, args.layer_shape, args.steps, args.dump) if part == "layer" \
            else step_worker(setting, system, args.steps)
        print(json.dumps(out))
        return
    sys.path.insert(0, str(ROOT))
    from bench_train import roofline_in_process
    layer_systems = [s for s in args.layer_systems.split(",") if s != "tunix" or TUNIX_PYTHON.exists()]
    if len(layer_systems) < len(args.layer_systems.split(",")):
        print("no benchmarks/.tunix-venv: Tunix skipped (RESULTS.md says how to install it)", file=sys.stderr)
    roof, failed = [roofline_in_process()], []
    parts = args.parts.split(",")
    layer_rows = run_part(args, "layer", args.layer_settings.split(","), layer_systems, failed) \
        if "layer" in parts else []
    step_rows = run_part(args, "step", args.step_settings.split(","), args.step_systems.split(","), failed) \
        if "step" in parts else []
    roof.append(roofline_in_process())
    f32 = statistics.mean(r["f32"] for r in roof)
    print(f"\nmatmul roofline (f32 2048^3, best of 5) before / after: {roof[0]['f32']:.0f} / {roof[1]['f32']:.0f} "
          f"GFLOP/s; MFU against {f32:.0f}")
    if layer_rows:
        layer_table(args, layer_rows, f32)
    if step_rows:
        step_table(step_rows, f32)
    if failed:  # after the tables: a benchmark that broke must not pass for one that ran
        print(f"{len(failed)} measurement(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
