"""Served throughput: `sample.py --serve` at 1, 4 and 16 concurrent clients beside sample.generate's own
batch decode of the same prompts, on the same model, in one run.

Each client sends one chat request (greedy, max_tokens new tokens) and, for the time to first token, one
streamed request. Served tokens/s = completion tokens of all clients / wall time from the first send to
the last answer; generate's = the same prompts decoded as one batch in this process (after a warm-up
call, so both sides are compiled). The server is started once and warmed up at each concurrency.

    python benchmarks/bench_serve.py                                   # the real Gemma 3 270M (built if needed)
    python benchmarks/bench_serve.py --ckpt DIR --clients 1 4 16 --max-tokens 32
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


def prompts(n):
    return [f"Give one fact about the number {7 * i + 3}." for i in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="checkpoint directory (default: the real Gemma 3 270M)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    import ckpt
    import data
    import tokenizer
    import sample
    from test_serve import Server
    ckpt_dir = pathlib.Path(args.ckpt) if args.ckpt else __import__("gemma3_reference").build()
    server = Server("--ckpt", str(ckpt_dir))
    model, tok = ckpt.load_hf(ckpt_dir), tokenizer.load_tokenizer(ckpt_dir)
    family = model.cfg.family
    eos = tuple(i for i in (*tok.eos_ids, *model.cfg.eos_ids, tok.token_id(data.END_OF_TURN[family])) if i is not None)
    client_name = ckpt_dir.name
    rows = []
    try:
        for c in args.clients:
            texts = prompts(c)

            def ask(i, out, stream):
                client = server.client()
                start = time.perf_counter()
                reply = client.chat.completions.create(model=client_name, messages=[{"role": "user", "content": texts[i]}],
                                                       max_tokens=args.max_tokens, temperature=0, stream=stream)
                if stream:
                    first = None
                    for chunk in reply:
                        if first is None and chunk.choices and chunk.choices[0].delta.content:
                            first = time.perf_counter() - start
                    out[i] = first
                else:
                    out[i] = reply.usage.completion_tokens

            def burst(stream):
                out = [None] * c
                threads = [threading.Thread(target=ask, args=(i, out, stream)) for i in range(c)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return out, time.perf_counter() - start
            burst(False)  # compile this batch shape
            tokens, served_s = burst(False)
            ttft, _ = burst(True)
            ids = [tok.encode(data.apply_chat_template([{"role": "user", "content": t}], family), add_bos=False)
                   for t in texts]
            sample.generate(model, ids, max_new_tokens=args.max_tokens, eos_ids=eos)
            start = time.perf_counter()
            outs = sample.generate(model, ids, max_new_tokens=args.max_tokens, eos_ids=eos)
            direct_s = time.perf_counter() - start
            direct_tokens = sum(len([t for t in o if t not in eos]) for o in outs)
            rows.append({"clients": c, "served_tok_s": sum(tokens) / served_s, "generate_tok_s": direct_tokens / direct_s,
                         "ttft_s_median": statistics.median(ttft), "stats": server.stats()})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.close()
    print("\n| clients | served tok/s | sample.generate tok/s | served / generate | median time to first token (s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['clients']} | {r['served_tok_s']:.1f} | {r['generate_tok_s']:.1f} | "
              f"{r['served_tok_s'] / r['generate_tok_s']:.2f} | {r['ttft_s_median']:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "")
    main()
