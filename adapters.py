"""adapters.py — LoRA adapters and the quantized (NF4 / int8) frozen weights they train beside.

The mechanism every script's --lora uses (lora.py's recipe, grpo.py --lora, ckpt.py's PEFT files,
sample.py): what is stored and how it is made. model.py's `projections` is where the forward pass
reads these forms; this file never imports model.py (the shapes come from the model's own arrays).

LoRA (Hu et al. 2021, arXiv 2106.09685) adds a trainable low-rank path beside a frozen weight:
    y = x W + (alpha / r) · (x A) B,   A [in, r], B [r, out], B = 0 at the start
(rsLoRA, Kalajievo 2023: alpha / sqrt(r)). QLoRA (Dettmers et al. 2023, arXiv 2305.14314) stores
the frozen W in 4 bits: blocks of 64 values share one absmax scale, and each value is the index
of the nearest of 16 "NormalFloat" levels, quantiles of a normal distribution. W is dequantized
inside the forward pass, layer by layer, so the full-precision copy never exists at once.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections an adapter can wrap
ATTENTION = ("q", "k", "v", "o")  # a mixture-of-experts model's (its experts take no adapters yet)
QUANT_FORMATS = ("nf4", "int8")
# numpy, not jax: a jax array made at import would start the runtime before jax.distributed can
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def projection_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """One layer's projection weights (model.Config cfg): the ones an adapter wraps or QLoRA quantizes."""
    D, N, K, H, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    return {"q": (D, N, H), "k": (D, K, H), "v": (D, K, H), "o": (N, H, D),
            "gate": (D, F), "up": (D, F), "down": (F, D)}


class LoRA(nnx.Param):
    """An adapter factor (A or B): a Param, and `nnx.split(model, LoRA, ...)` takes only adapters."""


class Quantized(nnx.Variable):
    """Codes or scales of a quantized frozen weight: not a Param, so never trained or counted."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int  # r
    alpha: float  # scale numerator
    targets: tuple[str, ...] = TARGETS
    dropout: float = 0.0  # on the adapter's input, training only
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def add_lora(model, rank: int, alpha: float, targets=None, dropout: float = 0.0, rslora: bool = False,
             seed: int = 0):
    """Attach adapters in place: A [L, in..., r] with PEFT's init (uniform, bound 1/sqrt(in)) and
    B [L, r, out...] = 0, so the model computes exactly what it did until B trains. targets None: every
    projection the model has (a mixture-of-experts model: the attention's, as PEFT's default for Qwen MoE).
    Gemma 4 (one parameter dict per layer): A [in..., r] and B [r, out...] in each layer that has the weight."""
    cfg, key = model.cfg, jax.random.key(seed)
    targets = (ATTENTION if cfg.experts is not None else TARGETS) if targets is None else targets
    if rank < 1 or not targets or set(targets) - set(TARGETS):
        raise ValueError(f"LoRA needs rank >= 1 and targets among {', '.join(TARGETS)} (got {rank}, {targets})")
    if cfg.experts is not None and set(targets) - set(ATTENTION):
        raise ValueError(f"LoRA on a mixture-of-experts model takes q,k,v,o: its experts take no adapters yet "
                         f"(targets {','.join(targets)})")
    if cfg.gemma4:  # a KV-shared layer has no k or v, a k = v layer no v: their adapters are absent too
        owners = [(block, {n: getattr(block, n).shape for n in TARGETS if hasattr(block, n)},
                   jax.random.fold_in(key, layer)) for layer, block in enumerate(model.layers)]
    else:
        owners = [(model.layers, {n: (cfg.n_layers, *shape) for n, shape in projection_shapes(cfg).items()}, key)]
    for owner, shapes, owner_key in owners:
        for i, name in enumerate(TARGETS):
            if name not in targets or name not in shapes:
                continue
            lead = shapes[name][:0 if cfg.gemma4 else 1]  # () or (L,)
            n_in = len(lead) + (2 if name == "o" else 1)
            ins, outs = shapes[name][len(lead):n_in], shapes[name][n_in:]
            bound = 1.0 / math.sqrt(math.prod(ins))
            a = jax.random.uniform(jax.random.fold_in(owner_key, i), (*lead, *ins, rank), jnp.float32, -bound, bound)
            setattr(owner, f"{name}_lora_a", LoRA(a.astype(cfg.param_dtype)))
            setattr(owner, f"{name}_lora_b", LoRA(jnp.zeros((*lead, rank, *outs), cfg.param_dtype)))
    model.lora = LoRAConfig(rank, float(alpha), tuple(t for t in TARGETS if t in targets), dropout, rslora)
    return model


def factor_vars(model, name: str, factor: str) -> list[tuple[list[int], nnx.Variable, bool]]:
    """Where target `name`'s LoRA factor ("a" or "b") lives: (layer indices, the variable, whether it is stacked
    with a leading L) — one stacked [L, ...] variable, or for Gemma 4 one per layer that has the weight."""
    attr = f"{name}_lora_{factor}"
    if model.cfg.gemma4:
        return [([i], getattr(block, attr), False) for i, block in enumerate(model.layers) if hasattr(block, attr)]
    return [(list(range(model.cfg.n_layers)), getattr(model.layers, attr), True)]


def lora_delta(x, a, b, scale: float) -> jax.Array:
    """scale · (x A) B for x [..., in...], a [in..., r], b [r, out...] → [..., out...]."""
    r, n_in = a.shape[-1], a.ndim - 1
    lead = x.shape[:x.ndim - n_in]
    xa = jnp.dot(x.reshape(math.prod(lead), -1), a.reshape(-1, r).astype(x.dtype), preferred_element_type=jnp.float32)
    y = jnp.dot(xa.astype(x.dtype), b.reshape(r, -1).astype(x.dtype), preferred_element_type=jnp.float32)
    return (scale * y).astype(x.dtype).reshape(*lead, *b.shape[1:])


def lora_dropout(x, key, rate: float) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype) if rate else x


def quantize(w, fmt: str, block: int = 64) -> tuple[jax.Array, jax.Array]:
    """w [A, ...] → (codes, scales [A, n_blocks] float32); blocks of `block` run along the
    flattened trailing axes. int8: codes [A, n, block] = round(127 w / absmax). nf4: the index of
    the nearest NF4 level to w / absmax, two 4-bit indices per byte: codes [A, n, block/2] uint8."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose {' or '.join(QUANT_FORMATS)}")
    if math.prod(w.shape[1:]) % block:
        raise ValueError(f"shape {tuple(w.shape)} does not split into blocks of {block}")
    w = jnp.asarray(w, jnp.float32).reshape(w.shape[0], -1, block)
    scales = jnp.max(jnp.abs(w), axis=-1) / (127.0 if fmt == "int8" else 1.0)  # absmax
    x = w / jnp.where(scales == 0, 1.0, scales)[..., None]
    if fmt == "int8":
        return jnp.round(x).astype(jnp.int8), scales
    idx = jnp.searchsorted((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2, x).astype(jnp.uint8)  # nearest level
    return (idx[..., 0::2] << 4) | idx[..., 1::2], scales


def dequantize(codes, scales, shape: tuple[int, ...], dtype) -> jax.Array:
    """The inverse of `quantize` (the format is in the codes' dtype), reshaped to `shape`."""
    x = codes.astype(jnp.float32) if codes.dtype == jnp.int8 else \
        jnp.asarray(NF4_LEVELS)[jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(*codes.shape[:-1], -1)]  # 2 per byte
    return (x * scales[..., None]).astype(dtype).reshape(shape)


def weight(p: dict, name: str, shape: tuple[int, ...], dtype) -> jax.Array:
    """A block's weight from its parameter dict: the array itself, or dequantized codes."""
    return p[name] if name in p else dequantize(p[f"{name}_codes"], p[f"{name}_scales"], shape, dtype)


def quantize_model(model, fmt: str, block: int = 64, tables: bool = True):
    """Replace the frozen projection weights (and, with `tables`, the embedding and output head:
    62% of Gemma 3 270M) by quantized codes and scales, in place. Gemma 4's per-layer weights get a
    leading axis of 1 in their codes (quantize's first axis is never blocked)."""
    per_layer = model.cfg.gemma4 is not None
    layers = list(model.layers) if per_layer else [model.layers]
    targets = [(owner, name) for owner in layers for name in TARGETS if hasattr(owner, name)]
    if tables:
        targets += [(model, name) for name in ("embed", "lm_head") if hasattr(model, name)]
    for owner, name in targets:
        w = getattr(owner, name)[...]
        codes, scales = quantize(w[None] if per_layer and owner is not model else w, fmt, block)
        delattr(owner, name)
        setattr(owner, f"{name}_codes", Quantized(codes))
        setattr(owner, f"{name}_scales", Quantized(scales))
    return model


def merge_lora(model):
    """A plain model.Transformer computing what `model` does: W + scale · A B in every adapted weight,
    quantized weights dequantized (in param_dtype). The input model is left as it is."""
    cfg = model.cfg
    graphdef, state = nnx.split(nnx.eval_shape(lambda: type(model)(cfg, nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(state))
    lora = getattr(model, "lora", None)
    per_layer = [block.arrays() for block in model.layers] if cfg.gemma4 else None  # Gemma 4: a dict per layer
    stacked = None if cfg.gemma4 else model.layers.arrays()
    for path, var in flat.items():
        if path[0] == "layers":
            p, name = (per_layer[path[1]], path[2]) if cfg.gemma4 else (stacked, path[1])  # "q", "attn_norm", ...
            value = weight(p, name, var.shape, jnp.float32).astype(jnp.float32)
            if f"{name}_lora_a" in p:
                a, b = (p[f"{name}_lora_{f}"].astype(jnp.float32) for f in "ab")
                a, b = (a[None], b[None]) if cfg.gemma4 else (a, b)  # [L, in..., r], [L, r, out...]
                delta = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, lora.rank),
                                   b.reshape(b.shape[0], lora.rank, -1))
                value = value + lora.scale * delta.reshape(value.shape)
        elif path[0] in ("embed", "lm_head"):
            value = model.table(path[0], jnp.float32)
        else:
            value = getattr(model, path[0])[...]
        var.set_value(value.astype(var.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
