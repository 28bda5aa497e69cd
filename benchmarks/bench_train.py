"""The training step at real sizes: nanotune's SFT/LoRA step vs Tunix's PeftTrainer, side by side.

One step = forward, backward, global-norm and AdamW update over a batch of B x T random tokens
(loss on every target), float32 parameters, one device. nanotune's step is sft.py's own
(`sft.make_train_step` with `run.adamw`: the step sft.py and lora.py run); Tunix's is the jitted
`_train_step` of its `PeftTrainer` (benchmarks/tunix_train_worker.py, optax.adamw). Settings:

    tiny   tiny-qwen3 (vocab 259, dim 128, 2 layers), 8 x 64
    mid    a Qwen 3 of 41.6M parameters (8 layers, dim 512, FFN 1536, 8 heads / 4 KV heads of 64,
           vocab 32000, tied), 8 x 256
    gemma  Gemma 3 270M (vocab 262144), 4 x 128: the real weights when tests/ has built them
           (~/.cache/nanotune-tests/gemma3-270m-hf; both systems load them), else random

Every measurement is a fresh process (its peak resident memory is counted from the end of
building through compilation and the timed steps), systems alternating A B A B. The matmul
roofline (f32 2048^3, and bf16 with f32 accumulation) is measured in this run, before and
after; MFU = model FLOPs per step / step time / f32 roofline, with model FLOPs = 6 (full) or 4
(LoRA: no weight gradients) x matmul parameters (head included) x tokens, plus dense attention.

    python benchmarks/bench_train.py                               # all settings, full and LoRA
    python benchmarks/bench_train.py --settings mid --modes full --repeats 3
    python benchmarks/bench_train.py --settings gemma --dtypes float32,bfloat16 --systems nanotune
    python benchmarks/bench_train.py --curve gemma      # scratch memory as batch x length doubles

--curve compiles (does not run) nanotune's full SFT step at B x T = 4x128, 4x256, 8x256, 8x512 and
reports XLA's own scratch-buffer size (memory_analysis().temp_size_in_bytes: everything the step
allocates beside its inputs and outputs) with the head in chunks and, for comparison, as one chunk
(logprobs.CHUNK_BYTES set past the whole [B, T, V] logits).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from worker import peak_rss, reset_peak

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TUNIX_PYTHON = HERE / ".tunix-venv" / "bin" / "python"
GEMMA_DIR = pathlib.Path(os.environ.get("NANOTUNE_TEST_CACHE", pathlib.Path.home() / ".cache" / "nanotune-tests")) \
    / "gemma3-270m-hf"
SHAPES = {"tiny": (8, 64), "mid": (8, 256), "gemma": (4, 128)}  # batch, length


def model_config(setting: str):
    import model as M
    if setting == "tiny":
        return M.CONFIGS["tiny-qwen3"]
    if setting == "mid":
        return M.Config(family="qwen3", vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64,
                        ffn_dim=1536, qk_norm=True, rope_theta=1e6)
    return M.CONFIGS["gemma3-270m"]


def step_flops(cfg, batch: int, length: int, mode: str) -> float:
    """Model FLOPs of one step: matmuls 2 (forward) + 2 (input gradients) + 2 (weight gradients, full only)
    per parameter per token, attention scores and values dense (as both systems compute them)."""
    D, N, K, H, F, L = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.n_layers
    matmul_params = L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F) + cfg.vocab_size * D
    attention = L * 2 * 2 * batch * length * length * N * H  # forward: QK^T and PV
    return (6 if mode == "full" else 4) * matmul_params * batch * length + 3 * attention


# ----------------------------------------------------------------------------- workers (own process)

def nanotune_worker(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np
    from flax import nnx

    import adapters
    import ckpt
    import run
    import sft
    from model import Transformer

    cfg = model_config(args.setting).replace(dtype=args.dtype)
    if args.setting == "gemma" and GEMMA_DIR.is_dir():
        model = ckpt.load_hf(GEMMA_DIR, dtype=args.dtype, param_dtype="float32")
    else:
        model = Transformer(cfg, nnx.Rngs(0))
    if args.mode == "lora":
        adapters.add_lora(model, args.rank, 2.0 * args.rank)
    B, T = SHAPES[args.setting]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, B, T)).astype(np.int32)  # [grad_accum, B, T]
    batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens), "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape).copy()}
    graphdef, params, frozen = nnx.split(model, nnx.Param if args.mode == "full" else adapters.LoRA, ...)
    tx, _ = run.adamw(sft.Config(), 1000)
    step = jax.jit(sft.make_train_step(graphdef, tx), donate_argnums=(0, 1))
    opt_state = tx.init(params)
    del model
    reset_peak()
    times = []
    for _ in range(args.steps + 1):  # the first compiles
        start = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, frozen, batch, jax.random.key(0))
        jax.block_until_ready((params, metrics["loss"]))
        times.append(time.perf_counter() - start)
        print(f"nanotune {args.setting} {args.mode} loss {float(metrics['loss']):.4f} {times[-1]:.3f}s",
              file=sys.stderr, flush=True)
    return {"step_s": times, "peak_rss_bytes": peak_rss(),
            "trainable": sum(x.size for x in jax.tree.leaves(params))}


def tunix_worker(args) -> dict:
    config = {"model": {"gemma": "gemma3-270m"}.get(args.setting, args.setting), "mode": args.mode,
              "batch": SHAPES[args.setting][0], "len": SHAPES[args.setting][1], "rank": args.rank,
              "dtype": args.dtype, "ckpt": str(GEMMA_DIR) if args.setting == "gemma" and GEMMA_DIR.is_dir() else None}
    proc = subprocess.run([str(TUNIX_PYTHON), str(HERE / "tunix_train_worker.py"), json.dumps(config)],
                          input=json.dumps({"steps": args.steps + 1}) + "\n", capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def roofline() -> dict:
    """f32 and bf16 (f32 accumulation) matmul GFLOP/s at 2048^3 on this machine, best of 5."""
    import jax
    import jax.numpy as jnp
    out = {}
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        a = jnp.ones((2048, 2048), dtype)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        f(a, a).block_until_ready()
        best = min(timed(lambda: f(a, a).block_until_ready()) for _ in range(5))
        out[name] = 2 * 2048 ** 3 / best / 1e9
    return out


def roofline_in_process() -> dict:
    """roofline() in a fresh process (nothing else of this run in its memory or threads)."""
    code = f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import bench_train; print(json.dumps(bench_train.roofline()))"
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scratch_curve(setting: str, shapes=((4, 128), (4, 256), (8, 256), (8, 512))):
    """XLA's scratch bytes of the full SFT step per B x T, chunked head vs one chunk."""
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import logprobs
    import run
    import sft
    from model import Transformer

    cfg = model_config(setting)
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx, _ = run.adamw(sft.Config(), 1000)
    opt_state = jax.eval_shape(tx.init, params)
    chunked = logprobs.CHUNK_BYTES
    print(f"{setting}: parameters + AdamW moments {3 * sum(x.size * 4 for x in jax.tree.leaves(params)) / 2**30:.2f} GiB "
          f"(inputs and outputs of the step, donated)\n")
    print("| B x T | logits [B, T, V] f32 (GiB) | scratch, chunked head (GiB) | scratch, one chunk (GiB) |")
    print("| --- | --- | --- | --- |")
    for B, T in shapes:
        tokens = jax.ShapeDtypeStruct((1, B, T), jnp.int32)
        batch = dict.fromkeys(("tokens", "loss_mask", "segment_ids", "positions"), tokens)
        temps = []
        for chunk_bytes in (chunked, 1 << 50):
            logprobs.CHUNK_BYTES = chunk_bytes
            step = jax.jit(sft.make_train_step(graphdef, tx), donate_argnums=(0, 1))
            compiled = step.lower(params, opt_state, frozen, batch, jax.random.key(0)).compile()
            temps.append(compiled.memory_analysis().temp_size_in_bytes / 2**30)
        logprobs.CHUNK_BYTES = chunked
        print(f"| {B} x {T} | {B * (T - 1) * cfg.vocab_size * 4 / 2**30:.2f} | {temps[0]:.2f} | {temps[1]:.2f} |",
              flush=True)


# ----------------------------------------------------------------------------- driver

def measure(system: str, args, setting: str, mode: str, dtype: str) -> dict:
    if system == "tunix":
        args = argparse.Namespace(**{**vars(args), "setting": setting, "mode": mode, "dtype": dtype})
        return tunix_worker(args)
    flags = [f"--steps={args.steps}", f"--rank={args.rank}", f"--worker={setting},{mode},{dtype}"]
    proc = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="tiny,mid,gemma")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--systems", default="nanotune,tunix")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one that compiles)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per system and setting")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--curve", metavar="SETTING", help="scratch memory of the step as B x T doubles")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # setting,mode,dtype: run nanotune's step here
    args = parser.parse_args()
    if args.curve:
        scratch_curve(args.curve)
        return
    if args.worker:
        args.setting, args.mode, args.dtype = args.worker.split(",")
        print(json.dumps(nanotune_worker(args)))
        return
    systems = [s for s in args.systems.split(",") if s != "tunix" or TUNIX_PYTHON.exists()]
    if len(systems) < len(args.systems.split(",")):
        print("no benchmarks/.tunix-venv: Tunix skipped (benchmarks/RESULTS.md says how to install it)", file=sys.stderr)
    roof = [roofline_in_process()]
    print(f"roofline before: {roof[0]}", file=sys.stderr)
    rows, failed = [], []
    for setting in args.settings.split(","):
        sys.path.insert(0, str(ROOT))
        cfg = model_config(setting)
        for mode in args.modes.split(","):
            for dtype in args.dtypes.split(","):
                results = {s: [] for s in systems}
                for r in range(args.repeats):
                    for system in systems:
                        try:
                            out = measure(system, args, setting, mode, dtype)
                        except RuntimeError as e:  # the others still run; the exit status says so at the end
                            print(f"{system} {setting} {mode} {dtype}: {e}", file=sys.stderr)
                            failed.append((system, f"{setting} {mode} {dtype}"))
                            continue
                        out["step"] = statistics.median(out["step_s"][1:])
                        results[system].append(out)
                        print(f"round {r + 1} {system} {setting} {mode} {dtype}: step {out['step']:.3f}s "
                              f"(first {out['step_s'][0]:.1f}s), peak RSS {out['peak_rss_bytes'] / 2**30:.2f} GiB",
                              file=sys.stderr, flush=True)
                rows.append((setting, mode, dtype, cfg, results))
    roof.append(roofline_in_process())
    f32 = statistics.mean(r["f32"] for r in roof)
    print(f"\nmatmul roofline (2048^3, best of 5) before / after: f32 {roof[0]['f32']:.0f} / {roof[1]['f32']:.0f} GFLOP/s, "
          f"bf16 (f32 accumulation) {roof[0]['bf16']:.0f} / {roof[1]['bf16']:.0f}; MFU against f32 {f32:.0f}\n")
    print("| setting | mode | dtype | system | step (s) | tokens/s | MFU | peak RSS (GiB) | vs Tunix |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting, mode, dtype, cfg, results in rows:
        B, T = SHAPES[setting]
        step = {s: statistics.median(x["step"] for x in v) for s, v in results.items() if v}
        for system, runs in results.items():
            if not runs:
                continue
            mfu = step_flops(cfg, B, T, mode) / step[system] / (f32 * 1e9)
            ratio = f"**{step['tunix'] / step[system]:.2f}x**" if "tunix" in step and system != "tunix" else ""
            rss = statistics.median(x["peak_rss_bytes"] for x in runs) / 2**30
            print(f"| {setting} {B}x{T} | {mode} | {dtype} | {system} | {step[system]:.3f} | {B * T / step[system]:.0f} | "
                  f"{mfu:.0%} | {rss:.2f} | {ratio} |")
    if failed:  # after the table: a benchmark that broke must not pass for one that ran
        print(f"{len(failed)} measurement(s) failed: {', '.join(f'{s} {x}' for s, x in failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
