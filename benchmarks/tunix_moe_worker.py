"""Tunix MoE-layer worker: Tunix's Qwen 3 `MoELayer` forward and backward behind a JSON-lines pipe.

Builds one `tunix.models.qwen3.model.MoELayer` (float32, `ModelConfig` with embed_dim D, hidden_dim F,
num_experts E, num_experts_per_tok k; the attention fields unused) and copies in bench_moe.layer_arrays'
weights (numpy seed 0: router.kernel [D, E], gate_proj and up_proj [E, D, F], down_proj [E, F, D], the layouts
Tunix's checkpoint loader writes), the same arrays nanotune's side gets. No mesh and a CPU device: the layer
takes its dense fallback (one-hot dispatch of every token to all E experts, a Python loop of E expert SwiGLUs,
combine with the renormalised top-k weights). One step = the jitted `jax.value_and_grad` of
sum(layer(h) * c) w.r.t. the layer's parameters (nnx.split's state) and h [1, M, D], timed until the loss, y
and the gradients are ready, as benchmarks/bench_moe.py's nanotune side times moe.experts.

It needs Tunix's own virtual environment, not nanotune's:

    benchmarks/.tunix-venv/bin/python benchmarks/tunix_moe_worker.py '{"experts": 8, "top_k": 2,
        "tokens": 1024, "dim": 256, "ffn": 128}'

Protocol: after building, one JSON line per request on stdin, {"steps": N}; one reply per request on stdout:
{"step_s": [seconds of each step], "peak_rss_bytes": VmHWM since the reset after building, "params": the
layer's}. The first step of the first request compiles. With "dump": PATH in the config, the first request's
last step writes y, dh and the weight gradients (in moe.py's names) to PATH (.npz) for bench_moe's check.
Everything else is logged to stderr; exits on EOF.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.models.qwen3 import model as qwen3

from bench_moe import layer_arrays
from worker import peak_rss, reset_peak

TUNIX_NAMES = {"router": ("router", "kernel"), "expert_gate": ("gate_proj",), "expert_up": ("up_proj",),
               "expert_down": ("down_proj",)}  # moe.py's name → the path in Tunix's MoELayer state


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def build_layer(cfg: dict) -> tuple[nnx.Module, dict]:
    """(Tunix's MoELayer with bench_moe's weights copied in, the arrays)."""
    E, k, M, D, F = cfg["experts"], cfg["top_k"], cfg["tokens"], cfg["dim"], cfg["ffn"]
    config = qwen3.ModelConfig(num_layers=1, vocab_size=1, embed_dim=D, hidden_dim=F, num_heads=1, head_dim=1,
                               num_kv_heads=1, rope_theta=1_000_000, norm_eps=1e-6, num_experts=E,
                               num_experts_per_tok=k, dtype=jnp.float32, param_dtype=jnp.float32)
    layer = qwen3.MoELayer(config, rngs=nnx.Rngs(0))
    arrays = layer_arrays(E, M, D, F)
    for name, path in TUNIX_NAMES.items():
        variable = layer
        for attr in path:
            variable = getattr(variable, attr)
        assert variable[...].shape == arrays[name].shape, (name, variable[...].shape, arrays[name].shape)
        variable[...] = jnp.asarray(arrays[name])
    return layer, arrays


def tunix_grads(state) -> dict:
    """The weight gradients of an nnx.State in moe.py's names."""
    out = {}
    for name, path in TUNIX_NAMES.items():
        x = state
        for attr in path:
            x = x[attr]
        out[name] = np.asarray(x[...] if isinstance(x, nnx.Variable) else x)
    return out


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cfg = json.loads(sys.argv[1])
    import tunix
    log(f"tunix_moe_worker: tunix {getattr(tunix, '__version__', '?')}, jax {jax.__version__} on {jax.devices()}, "
        f"{cfg}")
    layer, arrays = build_layer(cfg)
    graphdef, state = nnx.split(layer)
    h, c = jnp.asarray(arrays["h"]), jnp.asarray(arrays["c"])

    def loss(state, h):
        y = nnx.merge(graphdef, state)(h)
        return jnp.sum(y * c), y
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    dump = cfg.get("dump")
    reset_peak()  # the peak-RSS count restarts here
    for line in sys.stdin:
        if not line.strip():
            continue
        times = []
        for _ in range(int(json.loads(line)["steps"])):
            start = time.perf_counter()
            (value, y), (dstate, dh) = jax.block_until_ready(step(state, h))
            times.append(time.perf_counter() - start)
            log(f"tunix_moe_worker: loss {float(value):.4f} {times[-1]:.3f}s")
        if dump:
            np.savez(dump, y=np.asarray(y), dh=np.asarray(dh), **tunix_grads(dstate))
            dump = None
        print(json.dumps({"step_s": times, "peak_rss_bytes": peak_rss(), "params": total}), flush=True)


if __name__ == "__main__":
    main()
