"""Served throughput: serve.py (continuous batching, engine.py) at 1, 4 and 16 concurrent clients beside
sample.generate's own batch decode of the same prompts, on the same model, in one run.

Each client sends one chat request (greedy, max_tokens new tokens) and, for the time to first token, one
streamed request. Served tokens/s = completion tokens of all clients / wall time from the first send to
the last answer; generate's = the same prompts decoded as one batch in this process (after a warm-up
call, so both sides are compiled), --repeats times alternated with the served runs, medians reported.
Latency = the median client's wall time for its non-streamed answer; time to first token the median
client's wall time to the first text of its streamed answer. The server is started once and warmed up
(three bursts) at each concurrency; its decoding flags (--slots, --chunk, --max-prompt-len,
--max-completion-len) are passed on when given, else it runs with its defaults.

    python benchmarks/bench_serve.py                                   # the real Gemma 3 270M (built if needed)
    python benchmarks/bench_serve.py --ckpt DIR --clients 1 4 16 --max-tokens 32
    python benchmarks/bench_serve.py --max-prompt-len 32 --max-completion-len 32   # the cache generate uses
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SERVER_FLAGS = ("slots", "chunk", "max_prompt_len", "max_completion_len")  # passed on to serve.py when given


def prompts(n):
    return [f"Give one fact about the number {7 * i + 3}." for i in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="checkpoint directory (default: the real Gemma 3 270M)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="served and generate runs, alternated (medians reported)")
    for name in SERVER_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="serve.py's (default: its own)")
    args = p.parse_args()
    import ckpt
    import data
    import tokenizer
    import sample
    from test_serve import Server
    ckpt_dir = pathlib.Path(args.ckpt) if args.ckpt else __import__("gemma3_reference").build()
    passed = [f for name in SERVER_FLAGS if getattr(args, name) is not None
              for f in ("--" + name.replace("_", "-"), str(getattr(args, name)))]
    server = Server("--ckpt", str(ckpt_dir), *passed)
    model, tok = ckpt.load_hf(ckpt_dir), tokenizer.load_tokenizer(ckpt_dir)
    family = model.cfg.family
    eos = tuple(i for i in (*tok.eos_ids, *model.cfg.eos_ids, tok.token_id(data.END_OF_TURN[family])) if i is not None)
    client_name = ckpt_dir.name
    rows = []
    try:
        for c in args.clients:
            texts, clients = prompts(c), [server.client() for _ in range(c)]

            def ask(i, out, stream):
                start = time.perf_counter()
                messages = [{"role": "user", "content": texts[i]}]
                reply = clients[i].chat.completions.create(model=client_name, messages=messages,
                                                           max_tokens=args.max_tokens, temperature=0, stream=stream)
                if stream:
                    first = None
                    for chunk in reply:
                        if first is None and chunk.choices and chunk.choices[0].delta.content:
                            first = time.perf_counter() - start
                    out[i] = first
                else:
                    out[i] = (reply.usage.completion_tokens, time.perf_counter() - start)

            def burst(stream):
                out = [None] * c
                threads = [threading.Thread(target=ask, args=(i, out, stream)) for i in range(c)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return out, time.perf_counter() - start
            ids = [tok.encode(data.apply_chat_template([{"role": "user", "content": t}], family), add_bos=False)
                   for t in texts]
            burst(False), burst(True), burst(False)  # compile the prefill shapes these arrivals make
            sample.generate(model, ids, max_new_tokens=args.max_tokens, eos_ids=eos)
            served, direct, ttft, latency = [], [], [], []
            for _ in range(args.repeats):  # alternated: a busy machine slows both sides alike
                answers, served_s = burst(False)
                served.append(sum(n for n, _ in answers) / served_s)
                latency += [s for _, s in answers]
                ttft += burst(True)[0]
                start = time.perf_counter()
                outs = sample.generate(model, ids, max_new_tokens=args.max_tokens, eos_ids=eos)
                direct.append(sum(len([t for t in o if t not in eos]) for o in outs) / (time.perf_counter() - start))
            rows.append({"clients": c, "served_tok_s": statistics.median(served),
                         "generate_tok_s": statistics.median(direct), "ttft_s_median": statistics.median(ttft),
                         "latency_s_median": statistics.median(latency), "served_runs": served, "generate_runs": direct,
                         "ttft_s": sorted(round(t, 2) for t in ttft),
                         "stats": server.stats()})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.close()
    print(f"\nserver flags: {' '.join(passed) or '(its defaults)'}")
    print("| clients | served tok/s | sample.generate tok/s | served / generate | median time to first token (s, "
          "streamed) | median latency (s, not streamed) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['clients']} | {r['served_tok_s']:.1f} | {r['generate_tok_s']:.1f} | "
              f"{r['served_tok_s'] / r['generate_tok_s']:.2f} | {r['ttft_s_median']:.2f} | "
              f"{r['latency_s_median']:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "")
    main()
