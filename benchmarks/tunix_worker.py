"""Tunix decode-speed worker: Gemma 3 270M (float32) behind a JSON-lines pipe.

Runs Google's Tunix (PyPI `google-tunix`) sampler on a plain Hugging Face
Gemma 3 270M directory so its generation speed can be compared with nanotune's.
It needs Tunix's own virtual environment, not nanotune's:

    benchmarks/.tunix-venv/bin/python benchmarks/tunix_worker.py HF_DIR [CACHE_SIZE]

HF_DIR holds config.json, model.safetensors, tokenizer.json and
tokenizer_config.json; CACHE_SIZE is the KV cache length (default 128). Tunix
pads the prompt to the next power of two, and that padded length plus
max_new_tokens must fit in the cache.

Protocol: one JSON object per stdin line, e.g.
    {"prompt": "The capital of France is", "batch": 8, "max_new_tokens": 64}
and one JSON line per request on stdout:
    {"seconds": ..., "texts": [...], "new_tokens": N}
where `seconds` is the wall time of the greedy Sampler call (its results are
already on the host when it returns), `texts` are the continuations without
the prompt, and `new_tokens` is the number of tokens generated per row (the
longest row; rows are identical copies here). Tunix stops early once every
row has emitted EOS, so it can be below max_new_tokens. The first call for a shape
includes XLA compilation. Everything else is logged to stderr; exits on EOF.
"""

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import transformers
from tunix.generate import sampler as sampler_lib
from tunix.models.gemma3 import model as gemma3_model
from tunix.models.gemma3 import params_safetensors


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def build_sampler(model_dir: str, cache_size: int) -> sampler_lib.Sampler:
    # Tunix's 270m config defaults to bfloat16 parameters; ask for float32.
    config = dataclasses.replace(
        gemma3_model.ModelConfig.gemma3_270m(), param_dtype=jnp.float32
    )
    model = params_safetensors.create_model_from_safe_tensors(
        model_dir, config, dtype=jnp.float32
    )
    # Sampler wraps a Hugging Face tokenizer in its own TokenizerAdapter.
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    cache_config = sampler_lib.CacheConfig(
        cache_size=cache_size,
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
    )
    return sampler_lib.Sampler(model, tokenizer, cache_config)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    model_dir = sys.argv[1]
    cache_size = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    log(f"tunix_worker: jax {jax.__version__} on {jax.devices()}, "
        f"cache_size={cache_size}")
    t0 = time.perf_counter()
    sampler = build_sampler(model_dir, cache_size)
    log(f"tunix_worker: model loaded in {time.perf_counter() - t0:.1f}s")

    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        prompts = [req["prompt"]] * int(req.get("batch", 1))
        t0 = time.perf_counter()
        out = sampler(
            prompts,
            max_generation_steps=int(req["max_new_tokens"]),
            temperature=0.0,  # no top_p / beam_size given: greedy argmax
            echo=False,
        )
        seconds = time.perf_counter() - t0  # out.tokens are numpy (host) arrays
        reply = {
            "seconds": seconds,
            "texts": list(out.text),
            "new_tokens": max(len(t) for t in out.tokens),
        }
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
