"""Decode speed on the real Gemma 3 270M (f32): nanotune vs transformers' generate() vs Tunix's Sampler.

Each system runs in its own process (Tunix in its own virtual environment) and answers
JSON requests on stdin, so the driver can alternate A B C A B C on a quiet machine and
report ratios from one run. For each batch size it times a 1-token request (prefill plus
one step) and a 64-token request; decode tok/s = batch * 63 / (t64 - t1). Greedy, EOS off.

    python benchmarks/bench_sample.py                        # builds the checkpoint if needed
    python benchmarks/bench_sample.py --ckpt DIR --batches 1 8 --repeats 5

Tunix runs when benchmarks/.tunix-venv exists (see benchmarks/RESULTS.md for its install).
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
PROMPT = "The capital of France is"


def nanotune_worker(ckpt_dir):
    sys.path.insert(0, str(ROOT))
    import ckpt
    import tokenizer
    import sample
    model, tok = ckpt.load_hf(ckpt_dir), tokenizer.load_tokenizer(ckpt_dir)

    def run(req):
        ids = [tok.encode(req["prompt"])] * req["batch"]
        start = time.perf_counter()
        out = sample.generate(model, ids, max_new_tokens=req["max_new_tokens"], eos_ids=())
        return time.perf_counter() - start, [tok.decode(o) for o in out]
    return run


def transformers_worker(ckpt_dir):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(ckpt_dir)

    def run(req):
        enc = tok([req["prompt"]] * req["batch"], return_tensors="pt")
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=req["max_new_tokens"], min_new_tokens=req["max_new_tokens"],
                                 do_sample=False)
        seconds = time.perf_counter() - start
        return seconds, tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return run


def read_bandwidth() -> float:
    """GB/s of a jitted sum over 1 GiB of float32: the memory roofline for batch-1 decoding."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((1 << 28,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return x.nbytes / statistics.median(times) / 1e9


def serve(run):
    for line in sys.stdin:
        seconds, texts = run(json.loads(line))
        print(json.dumps({"seconds": seconds, "texts": texts}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="HF directory of Gemma 3 270M (default: build the test one)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-size", type=int, default=128, help="Tunix's KV cache size")
    p.add_argument("--worker", choices=["nanotune", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        serve({"nanotune": nanotune_worker, "transformers": transformers_worker}[args.worker](args.ckpt))
        return
    if args.ckpt is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import gemma3_reference
        args.ckpt = str(gemma3_reference.build())

    me = [sys.executable, str(HERE / "bench_sample.py"), "--ckpt", args.ckpt, "--worker"]
    workers = [Worker("nanotune", me + ["nanotune"]), Worker("transformers", me + ["transformers"])]
    tunix_python = HERE / ".tunix-venv" / "bin" / "python"
    if tunix_python.exists():
        workers.append(Worker("tunix", [str(tunix_python), str(HERE / "tunix_worker.py"), args.ckpt,
                                        str(args.cache_size)]))
    else:
        print("(no benchmarks/.tunix-venv: Tunix skipped)", file=sys.stderr)

    N = args.new_tokens
    results = {}
    for batch in args.batches:
        for w in workers:  # warm-up: compile both shapes
            w(prompt=PROMPT, batch=batch, max_new_tokens=1)
            first = w(prompt=PROMPT, batch=batch, max_new_tokens=N)
            print(f"{w.name:>12} B={batch}: {first['texts'][0][:60]!r}", file=sys.stderr)
        times = {w.name: {1: [], N: []} for w in workers}
        for _ in range(args.repeats):  # alternate A B C A B C
            for w in workers:
                for n in (1, N):
                    times[w.name][n].append(w(prompt=PROMPT, batch=batch, max_new_tokens=n)["seconds"])
        for name, t in times.items():
            t1, tn = statistics.median(t[1]), statistics.median(t[N])
            results[(name, batch)] = (t1, batch * (N - 1) / (tn - t1))
    for w in workers:
        w.close()
    bandwidth = read_bandwidth()

    print(f"\nGemma 3 270M, f32, greedy, prompt {PROMPT!r}, {N} new tokens, median of {args.repeats}, "
          f"{os.cpu_count()} CPU cores\n")
    print("| system | batch | prefill + 1 token (ms) | decode tok/s |\n| --- | --- | --- | --- |")
    for (name, batch), (t1, tps) in results.items():
        print(f"| {name} | {batch} | {t1 * 1000:.0f} | {tps:.1f} |")
    print()
    weights_gb = sum(f.stat().st_size for f in pathlib.Path(args.ckpt).glob("*.safetensors")) / 1e9
    config = json.loads((pathlib.Path(args.ckpt) / "config.json").read_text())
    head_gb = config["vocab_size"] * config["hidden_size"] * 4 / 1e9  # the tied output head in f32
    int8_gb = weights_gb - head_gb + head_gb / 4  # what nanotune reads at batch <= 4: the head as int8
    ours_b1 = results.get(("nanotune", 1), (0, 0.0))[1]
    print(f"memory roofline: a jitted sum reads {bandwidth:.1f} GB/s here; {weights_gb:.2f} GB of f32 weights per "
          f"step → at most {bandwidth / weights_gb:.1f} tok/s at batch 1; nanotune's int8 head reads "
          f"{int8_gb:.2f} GB → at most {bandwidth / int8_gb:.1f} (nanotune batch 1: {ours_b1 * int8_gb / bandwidth:.0%} "
          f"of that)\n")
    for batch in args.batches:
        ours = results[("nanotune", batch)][1]
        ratios = [f"{ours / results[(w.name, batch)][1]:.2f}x {w.name}" for w in workers if w.name != "nanotune"]
        print(f"batch {batch}: nanotune decode = " + ", ".join(ratios))


if __name__ == "__main__":
    main()
