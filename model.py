"""model.py — one decoder-only Transformer for Gemma, Gemma 2, Gemma 3, Llama 3, Qwen 2, Qwen 3 (and Qwen 3 MoE).

The six families differ only in a handful of switches, all of them fields of `Config`: the MLP activation
(SwiGLU / GeGLU-tanh), the RMSNorm weight convention (`w` or `1 + w`), QK-norm, QKV bias, sandwich norms around
attention and MLP, soft-capping, sliding-window layers with their own RoPE base, RoPE scaling, and embedding
scaling. Everything else is the same pre-norm block:

    x = x + post_attn_norm(Attn(attn_norm(x)))      # post norms: Gemma 2/3 only
    x = x + post_ffw_norm(MLP(ffw_norm(x)))         # Qwen 3 MoE's sparse layers: moe.py's experts as the MLP

Parameters of all layers are stacked on a leading `L` axis. The forward pass scans over them (jit compiles one block)
or, given `layers=unstack_layers(model)`, runs them unrolled: faster on CPU for decoding and small models' training
steps (next_token_hidden picks it by size).

Einsum letters (as in Gemma's reference code): B batch, T query time, S key time, D model dim,
N query heads, K kv heads, G query heads per kv head, H head dim, F feed-forward dim, V vocab, L layers, E experts.

    from model import CONFIGS, Transformer
    model = Transformer(CONFIGS["tiny-qwen3"], nnx.Rngs(0))
    logits = model(tokens)                       # [B, T, V], float32
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import gemma4
import logprobs
import moe
from adapters import TARGETS, dequantize, lora_delta, lora_dropout, projection_shapes, weight
from logprobs import softcap
from rope import Rope, apply_rope, rope_inv_freq, rope_table


# The MLP is act(x W_gate) * (x W_up) W_down: SwiGLU with silu, GeGLU with gelu.
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class Config:
    family: str  # llama3 | qwen2 | qwen3 | gemma | gemma2 | gemma3 (the HF model_type family)
    vocab_size: int  # V
    dim: int  # D, the residual stream width
    n_layers: int  # L
    n_heads: int  # N query heads
    n_kv_heads: int  # K key/value heads (GQA when K < N)
    head_dim: int  # H, independent of dim / n_heads (Qwen 3 and Gemma)
    ffn_dim: int  # F
    act: str = "silu"  # MLP gate activation: silu (SwiGLU) | gelu_tanh (GeGLU) | gelu
    norm_eps: float = 1e-6  # RMSNorm epsilon
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w), weights stored as w
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen 3, Gemma 3)
    qkv_bias: bool = False  # bias on the q, k, v projections (Qwen 2)
    rope_theta: float = 10_000.0  # RoPE base of global (full-attention) layers
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3); None: rope_theta
    rope_scaling: str | None = None  # None | "linear" | "llama3", applied to global layers
    rope_factor: float = 1.0  # scaling factor (linear and llama3)
    rope_low_freq_factor: float = 1.0  # llama3 scaling
    rope_high_freq_factor: float = 4.0  # llama3 scaling
    rope_original_max_len: int = 8192  # llama3 scaling: original context length
    sliding_window: int | None = None  # W: a sliding layer's query sees its W most recent keys
    sliding_layers: tuple[bool, ...] = ()  # per layer, True if it slides (empty: none does)
    query_scale: float | None = None  # attention logit scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # logits <- c * tanh(logits / c) in attention (Gemma 2)
    final_softcap: float | None = None  # the same on the output logits (Gemma 2)
    post_norms: bool = False  # extra RMSNorm after attention and after the MLP (Gemma 2/3)
    embed_scale: bool = False  # multiply embeddings by sqrt(dim) (Gemma)
    tie_embeddings: bool = True  # output head reuses the input embedding
    max_seq_len: int = 8192  # longest sequence the checkpoint was trained for
    bos_id: int | None = None  # beginning-of-sequence token of the checkpoint's tokenizer
    eos_ids: tuple[int, ...] = ()  # end-of-sequence tokens
    pad_id: int | None = None  # padding token
    param_dtype: str = "float32"  # storage dtype of parameters
    dtype: str = "float32"  # compute dtype of activations and matmuls (bf16 on TPU)
    remat: bool = False  # backward pass keeps only each block's input (default: its projection outputs too)
    experts: moe.Experts | None = None  # Qwen 3 MoE: the sparse layers' experts (moe.py); None: a dense model
    gemma4: gemma4.Gemma4 | None = None  # Gemma 4's switches (gemma4.py: its layers are built and run there)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")
        if any(self.sliding_layers) and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.act!r} (known: {', '.join(ACTIVATIONS)})")

    def replace(self, **kw) -> Config:
        return dataclasses.replace(self, **kw)


def every_nth_global(n_layers: int, period: int) -> tuple[bool, ...]:
    """Layers slide except every `period`-th one: Gemma 3 (period 6: 5 local, 1 global), Gemma 2 (2)."""
    return tuple((i + 1) % period != 0 for i in range(n_layers))


_LLAMA3 = dict(family="llama3", vocab_size=128_256, norm_eps=1e-5, rope_theta=500_000.0, max_seq_len=131_072,
               bos_id=128_000, eos_ids=(128_001,), rope_scaling="llama3", rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, rope_original_max_len=8192)
_QWEN = dict(vocab_size=151_936, rope_theta=1_000_000.0, bos_id=151_643, eos_ids=(151_643,), pad_id=151_643)
_QWEN2 = dict(_QWEN, family="qwen2", qkv_bias=True)
_QWEN3 = dict(_QWEN, family="qwen3", eos_ids=(151_645,), head_dim=128, qk_norm=True, max_seq_len=40_960)
_GEMMA = dict(act="gelu_tanh", norm_plus_one=True, embed_scale=True, head_dim=256, bos_id=2, eos_ids=(1,), pad_id=0)
_GEMMA3 = dict(_GEMMA, family="gemma3", vocab_size=262_144, qk_norm=True, post_norms=True,
               query_scale=256 ** -0.5, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
               sliding_window=512, max_seq_len=32_768, eos_ids=(1, 106))

# The published shapes. Real vocabularies, eos ids and RoPE settings, so a random init has
# exactly the memory and FLOPs of the checkpoint it stands in for.
CONFIGS: dict[str, Config] = {
    "llama3.2-1b": Config(**_LLAMA3, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                          ffn_dim=8192, rope_factor=32.0),
    "llama3.2-3b": Config(**_LLAMA3, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128,
                          ffn_dim=8192, rope_factor=32.0),
    "llama3.1-8b": Config(**_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                          ffn_dim=14_336, rope_factor=8.0, tie_embeddings=False),
    "qwen2.5-0.5b": Config(**_QWEN2, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64, ffn_dim=4864,
                           max_seq_len=32_768),
    "qwen2.5-1.5b": Config(**_QWEN2, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128, ffn_dim=8960,
                           max_seq_len=131_072),
    "qwen3-0.6b": Config(**_QWEN3, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=3072),
    "qwen3-1.7b": Config(**_QWEN3, dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=6144),
    "qwen3-4b": Config(**_QWEN3, dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=9728),
    "qwen3-8b": Config(**_QWEN3, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=12_288, tie_embeddings=False),
    "gemma-2b": Config(**_GEMMA, family="gemma", vocab_size=256_000, dim=2048, n_layers=18,
                       n_heads=8, n_kv_heads=1, ffn_dim=16_384),
    "gemma2-2b": Config(**_GEMMA, family="gemma2", vocab_size=256_000, dim=2304, n_layers=26, n_heads=8, n_kv_heads=4,
                        ffn_dim=9216, post_norms=True, query_scale=256 ** -0.5, attn_softcap=50.0, final_softcap=30.0,
                        sliding_window=4096, sliding_layers=every_nth_global(26, 2)),
    "gemma3-270m": Config(**_GEMMA3, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, ffn_dim=2048,
                          sliding_layers=every_nth_global(18, 6)),
    "gemma3-1b": Config(**_GEMMA3, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, ffn_dim=6912,
                        sliding_layers=every_nth_global(26, 6)),
    "gemma3-4b": Config(**{**_GEMMA3, "vocab_size": 262_208, "sliding_window": 1024, "max_seq_len": 131_072},
                        dim=2560, n_layers=34, n_heads=8, n_kv_heads=4, ffn_dim=10_240,
                        rope_scaling="linear", rope_factor=8.0, sliding_layers=every_nth_global(34, 6)),
}

# Tiny presets for CPU demos and tests: the byte-level tokenizer's vocabulary (256 bytes
# + pad/bos/eos), two to four layers, every family switch of the real model kept on.
_TINY = dict(vocab_size=259, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=384,
             pad_id=256, bos_id=257, eos_ids=(258,), max_seq_len=1024)
CONFIGS.update({
    "tiny-llama3": Config(**{**_LLAMA3, **_TINY, "rope_original_max_len": 256}, rope_factor=8.0),
    "tiny-qwen2": Config(**_TINY, family="qwen2", qkv_bias=True, rope_theta=1e6),
    "tiny-qwen3": Config(**_TINY, family="qwen3", qk_norm=True, rope_theta=1e6),
    "tiny-qwen3-small": Config(**{**_TINY, "dim": 64, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 192}, family="qwen3",
                               qk_norm=True, rope_theta=1e6),  # distill.py's demo student
    "tiny-gemma": Config(**{**_GEMMA, **_TINY}, family="gemma"),
    "tiny-gemma2": Config(**{**_GEMMA, **_TINY}, family="gemma2", post_norms=True, query_scale=24 ** -0.5,
                          attn_softcap=50.0, final_softcap=30.0, sliding_window=32,
                          sliding_layers=every_nth_global(2, 2)),
    "tiny-gemma3": Config(**{**_GEMMA3, **_TINY, "n_layers": 3, "sliding_window": 32},
                          sliding_layers=every_nth_global(3, 3)),
})
CONFIGS.update({name: Config(**kw) for name, kw in moe.presets(_QWEN3, _TINY).items()})  # Qwen 3 MoE
CONFIGS.update({name: Config(**kw) for name, kw in gemma4.presets(_TINY, every_nth_global).items()})  # Gemma 4

ALIASES = {"llama3": "llama3.2-1b", "qwen2": "qwen2.5-0.5b", "qwen3": "qwen3-0.6b", "gemma": "gemma-2b",  # a default size
           "gemma2": "gemma2-2b", "gemma3": "gemma3-270m", "gemma4": "gemma4-e2b", "tiny": "tiny-qwen3"}  # per family


def get_config(name: str) -> Config:
    """A preset by name or family alias; ValueError listing the choices otherwise."""
    name = ALIASES.get(name, name)
    if name not in CONFIGS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: "
                         + ", ".join(sorted(CONFIGS) + sorted(ALIASES)))
    return CONFIGS[name]


# ----------------------------------------------------------------------------- building blocks

def matmul(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """The einsum `eq` ("BTD,DNH->BTNH": x's trailing letters contract with w's leading ones) as one 2D
    matmul with float32 accumulation: faster than a 3D einsum on CPU when decoding; bf16 needs f32 accumulation."""
    lhs, rhs = eq.split("->")[0].split(",")
    n_in = len(set(lhs) & set(rhs))
    assert lhs[-n_in:] == rhs[:n_in], eq
    lead, outs = x.shape[:-n_in], w.shape[n_in:]
    y = jnp.dot(x.reshape(math.prod(lead), -1), w.reshape(math.prod(w.shape[:n_in]), -1).astype(x.dtype),
                preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(*lead, *outs)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    """RMSNorm over the last axis; statistics and scaling in float32 whatever x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = 1.0 + w.astype(jnp.float32) if plus_one else w.astype(jnp.float32)
    return (x32 * scale).astype(x.dtype)


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
    """jax.nn.softmax on the last axis; backward p·(g − Σp·g), Σ a full-f32 dot (XLA CPU's reduce is ~5x slower)."""
    return jax.nn.softmax(x, axis=-1)


softmax.defvjp(lambda x: (jax.nn.softmax(x, axis=-1),) * 2,  # the output is the residual
               lambda p, g: (p * (g - jnp.einsum("...s,...s->...", p, g, precision="highest")[..., None]),))


def attention(q, k, v, mask, scale: float, cap: float | None) -> tuple[jax.Array, jax.Array]:
    """Grouped-query attention. q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] (True = may attend) → output
    [B,T,N,H] and the attention map averaged over heads [B,T,S] (XLA drops it where it is not used)."""
    (B, T, N, H), K = q.shape, k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    logits = softcap(logits, cap)
    # A large finite value, not -inf: a fully masked row (a padding query) stays finite.
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = softmax(logits).astype(v.dtype)  # softmax in float32
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype), jnp.mean(probs.astype(jnp.float32), axis=(1, 2))


class KVCache(NamedTuple):
    """Keys and values of every layer for prefill + decode. Slot s of a row holds its token at sequence index s;
    all rows write at one index (prompts left-padded), or with index [B] each at its own (engine.py's slots)."""
    k: jax.Array  # [L, B, S, K, H], or L arrays [B, S, K, H] (unrolled layers: each updated in place)
    v: jax.Array  # [L, B, S, K, H], or L arrays [B, S, K, H]
    segment_ids: jax.Array  # [B, S] int32, 0 for empty or padding slots
    index: jax.Array  # [] int32 (or [B]), the next slot to write

    @staticmethod
    def init(cfg: Config, batch: int, length: int, dtype=None) -> KVCache:
        if cfg.gemma4:  # a tuple of per-layer arrays of each layer's shape, None for KV-shared layers
            return gemma4.init_cache(cfg, batch, length, dtype)
        shape, dtype = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim), dtype or cfg.dtype
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(shape[1:3], jnp.int32), jnp.int32(0))


def write_slots(cache, new, start):
    """cache [B, S, ...] with new [B, T, ...] written at slots start..start+T-1 (start [] or one per row [B])."""
    if jnp.ndim(start) == 0:
        return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, start) + (0,) * (cache.ndim - 2))
    rows, cols = jnp.arange(cache.shape[0])[:, None], start[:, None] + jnp.arange(new.shape[1])  # [B, 1], [B, T]
    return cache.at[rows, cols].set(new.astype(cache.dtype))


def attention_mask(q_slots, k_slots, q_segments, k_segments, window: int | None):
    """[B, T, S]: causal on slot index (q_slots [T] or [B, T]), same non-zero segment, and (if window) within it."""
    q_slots = jnp.broadcast_to(q_slots, q_segments.shape)[:, :, None]
    ok = (k_slots[None, None, :] <= q_slots) & (k_segments[:, None, :] != 0)
    ok &= q_segments[:, :, None] == k_segments[:, None, :]
    return ok & (q_slots - k_slots[None, None, :] < window) if window else ok


# ----------------------------------------------------------------------------- a block's weights
#
# A block reads its layer's parameters from a dict (its slice of the stacked Layers inside the scan,
# or one entry of unstack_layers). A projection's weight W is stored there in one of four forms, and
# `projections` below is the one place that reads them:
#     plain      p["q"]  [D, N, H]                                        Layers
#     quantized  p["q_codes"], p["q_scales"]: W as int8 / nf4 blocks       quantize_model (QLoRA)
#     adapted    p["q_lora_a"], p["q_lora_b"] beside either: W + s·A B      add_lora (LoRA)
#     fused      p["q+k+v"] [D, (N+2K)H], p["gate+up"] [D, 2F]: the projections of one input as
#                one matmul (unstack_layers(fuse=True): decoding only, never adapted or quantized)

def layer_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Shapes of one block's parameters (stacked on a leading L axis in the model)."""
    D, N, K, H = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    shapes = moe.with_expert_shapes(cfg, {"attn_norm": (D,), "ffw_norm": (D,), **projection_shapes(cfg)})
    if cfg.qkv_bias:
        shapes.update(q_bias=(N, H), k_bias=(K, H), v_bias=(K, H))
    if cfg.qk_norm:
        shapes.update(q_norm=(H,), k_norm=(H,))
    if cfg.post_norms:
        shapes.update(post_attn_norm=(D,), post_ffw_norm=(D,))
    return shapes


LETTERS = {"q": "BTD,DNH->BTNH", "k": "BTD,DKH->BTKH", "v": "BTD,DKH->BTKH", "o": "BTNH,NHD->BTD",
           "gate": "BTD,DF->BTF", "up": "BTD,DF->BTF", "down": "BTF,FD->BTD"}  # each projection's einsum


class Adapters(NamedTuple):
    """What a forward pass needs to apply LoRA adapters: their scale, and dropout on their inputs."""
    scale: float
    dropout: float
    key: jax.Array | None  # this layer's dropout key (training with dropout only)


def projections(p: dict, names: tuple[str, ...], h, cfg: Config, adapters: Adapters | None) -> list[jax.Array]:
    """h @ W for each projection in `names` (all of one input h, e.g. q, k, v), whatever W's storage form."""
    if len(names) > 1 and "+".join(names) in p:  # fused: one matmul, split after
        sizes = [math.prod(layer_shapes(cfg)[name][1:]) for name in names]
        parts = jnp.split(matmul("BTD,DE->BTE", h, p["+".join(names)]), list(itertools.accumulate(sizes))[:-1], -1)
        return [part.reshape(*h.shape[:-1], *layer_shapes(cfg)[name][1:]) for part, name in zip(parts, names)]
    out = []
    for name in names:
        y = matmul(LETTERS[name], h, weight(p, name, layer_shapes(cfg)[name], h.dtype))
        if f"{name}_lora_a" in p:
            h_in = h if adapters.key is None else \
                lora_dropout(h, jax.random.fold_in(adapters.key, TARGETS.index(name)), adapters.dropout)
            y = y + lora_delta(h_in, p[f"{name}_lora_a"], p[f"{name}_lora_b"], adapters.scale)
        out.append(y)
    return out


# ----------------------------------------------------------------------------- the block

def self_attention(p: dict, h, cfg: Config, rope: Rope, mask, kv, start, adapters):
    """Grouped-query self-attention of h [B, T, D] → [B, T, D], the keys and values, the head-averaged map
    [B, T, S]. kv: this layer's cached keys and values [B, S, K, H] (None without a cache): this call's are
    written at slot `start`, then all are attended."""
    eps = (cfg.norm_eps, cfg.norm_plus_one)
    q, k, v = projections(p, ("q", "k", "v"), h, cfg, adapters)  # [B, T, N, H], [B, T, K, H] x 2
    if cfg.qkv_bias:
        q, k, v = (x + p[f"{name}_bias"].astype(h.dtype) for x, name in zip((q, k, v), "qkv"))
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], *eps), rms_norm(k, p["k_norm"], *eps)
    q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
    cache_k, cache_v = kv
    if cache_k is not None:
        cache_k, cache_v = write_slots(cache_k, k, start), write_slots(cache_v, v, start)
        k, v = cache_k.astype(h.dtype), cache_v.astype(h.dtype)
    scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim ** -0.5
    heads, attention_map = attention(q, k, v, mask, scale, cfg.attn_softcap)
    out, = projections(p, ("o",), heads, cfg, adapters)
    return out, (cache_k, cache_v), attention_map


def mlp(p: dict, h, cfg: Config, adapters) -> jax.Array:
    """act(h W_gate) * (h W_up) W_down: h [B, T, D] → [B, T, F] → [B, T, D]."""
    gate, up = projections(p, ("gate", "up"), h, cfg, adapters)
    down, = projections(p, ("down",), ACTIVATIONS[cfg.act](gate) * up, cfg, adapters)
    return down


def block(x, p: dict, cfg: Config, rope: Rope, mask, kv, start, adapters, sparse=False):
    """One pre-norm block on the residual stream x [B, T, D] (post norms: Gemma 2/3 only) → x, the layer's
    keys and values, its head-averaged attention map [B, T, S], its router logits [B, T, E] (None in a dense
    model). sparse: its MLP is the experts (moe.py)."""
    norm = lambda y, name: rms_norm(y, p[name], cfg.norm_eps, cfg.norm_plus_one)  # noqa: E731
    post = lambda y, name: norm(y, name) if cfg.post_norms else y  # noqa: E731
    out, kv, attention_map = self_attention(p, norm(x, "attn_norm"), cfg, rope, mask, kv, start, adapters)
    x = x + post(out, "post_attn_norm")
    h = norm(x, "ffw_norm")
    y, router_logits = moe.mlp_or_experts(p, h, cfg, sparse, lambda: mlp(p, h, cfg, adapters))
    return x + post(y, "post_ffw_norm"), kv, attention_map, router_logits


# ----------------------------------------------------------------------------- the model

class Layers(nnx.Module):
    """All blocks' parameters, each stacked as [L, ...] so the forward pass can scan."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.param_dtype)
        for name, shape in layer_shapes(cfg).items():
            shape = (cfg.n_layers, *shape)
            if name.endswith(("norm", "bias")):  # zero biases; norms are the identity in both conventions
                value = (jnp.ones if name.endswith("norm") and not cfg.norm_plus_one else jnp.zeros)(shape, dtype)
            else:  # fan in: o [L, N, H, D] over N·H, an expert [L, E, D or F, ...] over D or F, others axis 1
                fan_in = math.prod(shape[1:3] if name == "o" else shape[2:3] if "expert_" in name else shape[1:2])
                value = fan_in ** -0.5 * jax.random.normal(rngs.params(), shape, dtype)  # LeCun normal
            setattr(self, name, nnx.Param(moe.zero_unused(cfg, name, value)))  # mixed MoE models: 0 where unused

    def arrays(self) -> dict[str, jax.Array]:
        """name → stacked array: weights, and (when present) LoRA factors and quantized codes/scales."""
        return {name: getattr(self, name)[...] for name in vars(self) if isinstance(getattr(self, name), nnx.Variable)}


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.param_dtype)
        # Rows of unit norm, so tied logits can reach order sqrt(D): the usual 0.02 caps a D=128
        # model's logits near 2.6, too flat to learn through when only adapters train.
        self.embed = nnx.Param(cfg.dim ** -0.5 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim), dtype))
        if cfg.gemma4:  # one parameter dict per layer (their shapes differ), and the per-layer embeddings
            gemma4.init_params(self, cfg, rngs)
        else:
            self.layers = Layers(cfg, rngs)
        self.final_norm = nnx.Param(jnp.zeros((cfg.dim,), dtype) if cfg.norm_plus_one else jnp.ones((cfg.dim,), dtype))
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim), dtype))

    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 last: int | None = None, layers: list[dict] | None = None, dropout_key: jax.Array | None = None,
                 hidden: bool = False, taps: tuple[str, ...] = ()):
        """tokens [B, T] int32 → logits [B, T, V] float32 (and the updated cache if one is given).

        positions [B, T]: RoPE positions (default 0..T-1; left-padded rows start at 0 after their padding).
        segment_ids [B, T]: attention stays within equal ids and never sees id 0 (padding), which makes
        left-padded and packed batches exact (default all 1).
        cache: the tokens are written at slots index..index+T-1 and attend to all earlier slots.
        last: the last `last` positions only, [B, last, V] (a prefill needs one, a learner the completion's: the
        output head is a small model's largest matmul). hidden: final-normed hidden states [B, T, D], not logits.
        layers: the block parameters as separate per-layer arrays (`unstack_layers`), run unrolled, not scanned,
        at the price of compiling every layer: on CPU decoding ~1.5x and a GRPO update ~1.7x faster (RESULTS.md).
        dropout_key: LoRA dropout on the adapters' inputs (training only; None: no dropout).
        taps: also return {"hidden": the residual stream after 0..L blocks [L + 1, B, T, D] (HF's hidden_states
        but the last, not final-normed here), "attention": each layer's head-averaged attention map [L, B, T, S]
        (distill.py), "router": each layer's router logits [L, B, T, E] (moe.load_balancing_loss; None in a
        dense model)}, those named: (out, taps), with a cache (out, cache, taps)."""
        cfg, (B, T) = self.cfg, tokens.shape
        dtype = jnp.dtype(cfg.dtype)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if positions is None else positions
        segment_ids = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
        if cfg.gemma4:  # its layers, unrolled, each of its own shape
            return gemma4.forward(self, tokens, positions, segment_ids, cache, last, layers, hidden, taps,
                                  dropout_key)

        x = self.embed_rows(tokens).astype(dtype)  # [B, T, D]
        if cfg.embed_scale:  # Gemma rounds sqrt(D) to the compute dtype, as HF does
            x = x * jnp.asarray(math.sqrt(cfg.dim), dtype)

        start, k_segments, (global_mask, sliding_mask), (global_rope, local_rope) = self.attention_inputs(
            positions, segment_ids, cache)
        sliding = jnp.asarray(cfg.sliding_layers or (False,) * cfg.n_layers)  # [L]
        sparse = jnp.asarray(cfg.experts.sparse_layers if cfg.experts else (False,) * cfg.n_layers)  # [L]
        lora = getattr(self, "lora", None)
        drop_keys = None if dropout_key is None or not lora or not lora.dropout else \
            jax.random.split(dropout_key, cfg.n_layers)

        def layer_step(x, layer):  # one block, choosing this layer's attention pattern
            p, (is_sliding, is_sparse), layer_k, layer_v, drop_key = layer
            rope = Rope(*(jnp.where(is_sliding, a, b) for a, b in zip(local_rope, global_rope)))
            mask = jnp.where(is_sliding, sliding_mask, global_mask)
            adapters = Adapters(lora.scale, lora.dropout, drop_key) if lora else None
            y, kv, attention_map, router = block(x, p, cfg, rope, mask, (layer_k, layer_v), start, adapters, is_sparse)
            tapped = (("hidden", x), ("attention", attention_map), ("router", router))
            return y, (kv, {name: a for name, a in tapped if name in taps})

        # The backward pass reads each block's projection outputs (matmuls without batch dimensions) from the forward
        # pass and recomputes the rest (norms, RoPE, attention, activations): on Gemma 3 270M this halves what the
        # forward keeps, and the CPU step is faster for it (fewer fresh pages). cfg.remat keeps each block's input.
        policy = None if cfg.remat else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        layer_step = jax.checkpoint(layer_step, policy=policy)
        cache_kv = (cache.k, cache.v) if cache is not None else (None, None)
        if layers is None:
            x, ((new_k, new_v), tapped) = jax.lax.scan(layer_step, x,
                                                       (self.layers.arrays(), (sliding, sparse), *cache_kv, drop_keys))
        else:
            new_kv, tapped = [], []
            for i, p in enumerate(layers):
                per_layer = (c if c is None else c[i] for c in (*cache_kv, drop_keys))
                x, (kv, tap) = layer_step(x, (p, (sliding[i], sparse[i]), *per_layer))
                new_kv, tapped = [*new_kv, kv], [*tapped, tap]
            tapped = jax.tree.map(lambda *a: jnp.stack(a), *tapped)
            new_k, new_v = (None, None) if cache is None else [  # a per-layer cache stays per layer
                tuple(kvs) if isinstance(cache.k, tuple) else jnp.stack(kvs) for kvs in zip(*new_kv)]
        if "hidden" in taps:
            tapped["hidden"] = jnp.concatenate([tapped["hidden"], x[None]])

        x = x if last is None else x[:, -last:]
        x = rms_norm(x, self.final_norm[...], cfg.norm_eps, cfg.norm_plus_one)
        out = x if hidden else self.logits(x)
        cache = None if cache is None else KVCache(new_k, new_v, k_segments, start + T)
        if taps:
            return (out, tapped) if cache is None else (out, cache, tapped)
        return out if cache is None else (out, cache)

    def attention_inputs(self, positions, segment_ids, cache: KVCache | None):
        """What every layer's attention shares: the first query slot, the key slots' (the cache's, else this
        call's) segment ids, the (global, sliding-window) masks [B, T, S], the (global, local) RoPE tables."""
        cfg, T = self.cfg, positions.shape[1]
        if cache is None:
            start, k_segments, k_slots = 0, segment_ids, jnp.arange(T)
        else:
            start, k_slots = cache.index, jnp.arange(cache.segment_ids.shape[1])
            k_segments = write_slots(cache.segment_ids, segment_ids, start)
        q_slots = jnp.asarray(start)[..., None] + jnp.arange(T)  # [T], or [B, T] with a per-row index
        masks = tuple(attention_mask(q_slots, k_slots, segment_ids, k_segments, window)
                      for window in (None, cfg.sliding_window))
        global_rope = Rope(*rope_table(positions, rope_inv_freq(cfg, cfg.rope_theta, scaled=True)))
        local_rope = global_rope if cfg.rope_local_theta is None else \
            Rope(*rope_table(positions, rope_inv_freq(cfg, cfg.rope_local_theta, scaled=False)))
        return start, k_segments, masks, (global_rope, local_rope)

    def head(self, dtype=None) -> jax.Array:
        """The output head [V, D] (the embedding when tied) in `dtype`, default the compute dtype."""
        return self.table("embed" if self.cfg.tie_embeddings else "lm_head", jnp.dtype(dtype or self.cfg.dtype))

    def logits(self, x) -> jax.Array:
        """Final-normed hidden states x [B, T, D] → logits [B, T, V] float32."""
        small = x.shape[0] * x.shape[1] <= 16  # decoding: on CPU the head streams ~1.2x faster as [V, D] @ [D, B·T]
        logits = jnp.einsum("VD,BTD->VBT", self.head(), x, preferred_element_type=jnp.float32).transpose(1, 2, 0) \
            if small else jnp.einsum("BTD,VD->BTV", x, self.head(), preferred_element_type=jnp.float32)
        return softcap(logits, self.cfg.final_softcap)

    def embed_rows(self, tokens) -> jax.Array:
        """Embedding rows of tokens [B, T] → [B, T, D] (only those rows dequantized if quantized)."""
        if isinstance(getattr(self, "embed", None), nnx.Param):
            return self.embed[...][tokens]
        codes, scales = self.embed_codes[...][tokens], self.embed_scales[...][tokens]
        return dequantize(codes, scales, (*tokens.shape, self.cfg.dim), jnp.dtype(self.cfg.dtype))

    def table(self, name: str, dtype) -> jax.Array:
        """A [V, D] table (embed or lm_head), dequantized if stored quantized."""
        if isinstance(getattr(self, name, None), nnx.Param):
            return getattr(self, name)[...].astype(dtype)
        codes, scales = getattr(self, f"{name}_codes")[...], getattr(self, f"{name}_scales")[...]
        return dequantize(codes, scales, (self.cfg.vocab_size, self.cfg.dim), dtype)


# ----------------------------------------------------------------------------- what learners call

def unstack_layers(model: Transformer, fuse: bool = False) -> list[dict[str, jax.Array]]:
    """The stacked [L, ...] block parameters as L dicts of separate arrays (one jitted copy): the model's `layers=`
    argument, an unrolled forward (on CPU faster for decoding and for small models' training). fuse: q/k/v and
    gate/up as one weight each: fewer, larger matmuls, ~5% faster per decode step on Gemma 3 270M (not with
    adapters or quantized weights)."""
    if model.cfg.gemma4:
        return gemma4.layer_arrays(model)
    stacked = model.layers.arrays()
    fuse = fuse and "up" in stacked and not any(name.endswith(("_lora_a", "_codes")) for name in stacked)  # MoE: no up
    return _unstack(stacked, model.cfg.n_layers, fuse)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unstack(stacked: dict[str, jax.Array], n_layers: int, fuse: bool) -> list[dict[str, jax.Array]]:
    layers = [{name: x[i] for name, x in stacked.items()} for i in range(n_layers)]
    for p in layers if fuse else ():
        D = p["up"].shape[0]  # joined on a middle axis: on CPU a concatenate along the last one is 3x slower
        p["q+k+v"] = jnp.concatenate([p.pop("q"), p.pop("k"), p.pop("v")], axis=1).reshape(D, -1)  # [D, N+2K, H]
        p["gate+up"] = jnp.stack([p.pop("gate"), p.pop("up")], axis=1).reshape(D, -1)  # [D, 2, F]
    return layers


def unrolled_if_small(model: Transformer):
    """unstack_layers below 64 MiB of weights, else None (the scan): on CPU a tiny model's training step
    runs 1.7x faster unrolled, while at 270M parameters the scan is ~5% faster and copies no weights."""
    return unstack_layers(model) if param_bytes(model) < 2**26 else None


def repeat_rows(cache: KVCache, group: int) -> KVCache:
    """Each row of a cache `group` times: a prompt's keys and values, computed once, for all its rows."""
    rows = lambda x: jnp.repeat(x, group, axis=x.ndim - 4)  # noqa: E731 ([L, B, S, K, H] or per layer [B, S, K, H])
    return KVCache(jax.tree.map(rows, cache.k), jax.tree.map(rows, cache.v), jnp.repeat(cache.segment_ids, group, 0),
                   cache.index)


def next_token_hidden(model: Transformer, tokens, positions, segment_ids, last: int, group: int = 1, layers=None,
                      dropout_key=None, taps: tuple[str, ...] = ()):
    """Final-normed hidden states [B, C, D] predicting the last C = `last` tokens of each row of tokens [B, T]:
    what model(tokens[:, :-1], ..., last=C, hidden=True) gives. group > 1: rows come in runs of `group` that
    share their first T - C tokens (a GRPO group's prompt); those run once per run, into a KV cache that the run's
    rows attend to, so the prompt's work is done once, not `group` times (gradients flow through the cache: the
    run's contributions add up). taps: (hidden, the model's taps of tokens[:, :-1]); group > 1 taps "router" only (the
    prompt's rows repeated, as if each row ran whole). layers None: unrolled_if_small's choice."""
    C, P = last, tokens.shape[1] - last
    layers = unrolled_if_small(model) if layers is None else layers
    # Every token goes in and the last one's outputs are dropped: the layers run at the batch's own length (a
    # bucket: 64, 256), not one short of it (63, 255), where XLA's CPU kernels are slower (bench_distill.py's
    # tiny step 10%). Causal attention leaves every kept output as it was; taps are cut to the same positions.
    if group == 1 or C == 1:
        out = model(tokens, positions=positions, segment_ids=segment_ids, last=C + 1, layers=layers,
                    dropout_key=dropout_key, hidden=True, taps=taps)
        return (out[0][:, :-1], without_last(out[1])) if taps else out[:, :-1]
    run = functools.partial(model, layers=layers, dropout_key=dropout_key, hidden=True, taps=taps)
    cache = KVCache.init(model.cfg, tokens.shape[0] // group, P + C)
    first, cache, *first_taps = run(tokens[::group, :P], positions=positions[::group, :P],
                                    segment_ids=segment_ids[::group, :P], cache=cache, last=1)  # [B/G, 1, D]
    rest, _, *rest_taps = run(tokens[:, P:], positions=positions[:, P:], segment_ids=segment_ids[:, P:],
                              cache=repeat_rows(cache, group))
    rest_taps = [without_last(t) for t in rest_taps]
    x = jnp.concatenate([jnp.repeat(first, group, axis=0), rest[:, :-1]], axis=1)  # [B, C, D]
    return (x, jax.tree.map(lambda a, b: jnp.concatenate([jnp.repeat(a, group, axis=1), b], axis=2),  # [L, B, T, E]
                            first_taps[0], rest_taps[0])) if taps else x


def without_last(taps: dict) -> dict:
    """The model's taps of T positions cut to the first T − 1 (those of tokens[:, :-1]): hidden [L + 1, B, T, D],
    router [L, B, T, E] on the position axis, attention [L, B, T, S] on both (the last key is masked for the
    others: their maps are unchanged)."""
    cut = {"hidden": lambda a: a[:, :, :-1], "router": lambda a: a[:, :, :-1], "attention": lambda a: a[:, :, :-1, :-1]}
    return {name: None if a is None else cut[name](a) for name, a in taps.items()}


def token_logps(model: Transformer, batch: dict, last: int | None = None, group: int = 1, temperature: float = 1.0,
                entropy: bool = False, dropout_key=None):
    """log π(x_t | x_<t) [B, C] of the last C = `last` tokens of each row (default: every token after the
    first), π = softmax(logits / temperature); with `entropy`, also π's entropy there [B, C].
    batch: tokens, positions, segment_ids [B, T]; group as in next_token_hidden. The output head runs
    a chunk of positions at a time (logprobs.py): no [B, C, V] float32 tensor, forward or backward."""
    tokens, C = batch["tokens"], batch["tokens"].shape[1] - 1 if last is None else last
    x = next_token_hidden(model, tokens, batch["positions"], batch["segment_ids"], C, group, dropout_key=dropout_key)
    return logprobs.token_logps(x, model.head(model.cfg.param_dtype), tokens[:, -C:], cap=model.cfg.final_softcap,
                                temperature=temperature, entropy=entropy)


def param_bytes(model: nnx.Module) -> int:  # every stored parameter, trainable or frozen, quantized or not
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
