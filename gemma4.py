"""gemma4.py — what Gemma 4's text decoder (E2B, E4B, 31B, 26B-A4B) adds to model.py's Gemma 3, and its checkpoints.

Gemma 4 keeps Gemma 3's block (sandwich norms, GeGLU, QK-norm, 5 sliding layers to 1 global, soft-capped logits)
and changes six things, each a few lines below:

    per-layer embeddings (PLE)  every layer i also reads e_i [P], from the token and from the embedded context x0:
                                e_i = (norm((x0 W_ple / sqrt(D))_i) + sqrt(P) E_ple[token]_i) / sqrt(2),
                                gated into its residual stream after the MLP:
                                x += norm((gelu(x W_gate_i) * e_i) W_proj_i)
    KV sharing                  the last `kv_shared_layers` layers compute no keys or values: each attends to those
                                of the last earlier layer of its type (and stores no KV cache of its own)
    k = v                       full-attention layers may have one projection for both: v = k before k's norm/RoPE
    per-type attention shapes   full-attention layers have their own head dim (512) and, with k = v, kv heads
    proportional RoPE           full layers rotate only the first `global_rope_fraction` of frequencies (the
                                rest are 0: those dims pass unrotated); sliding layers use plain RoPE
    norms and scales            RMSNorm scales by w (not 1 + w); values are RMS-normed with no scale; the query
                                scale is 1 (QK-norm sets the logits' size); each layer ends with x *= layer_scalar

and 26B-A4B adds a mixture of experts in parallel with the dense MLP (`moe_block` below; moe.py's experts).

Because shapes differ between layers (head dim and kv heads by type, no k/v on shared layers, twice the MLP width
on E2B's shared layers), a Gemma 4 model keeps one parameter dict per layer (`model.layers[i]`, nnx.List) and
runs its layers unrolled in one jitted program (`run_layers`); everything else (embedding, head, masks, cache slots, sampling) is model.py's.
The transformers reference is models/gemma4 (Gemma4TextModel): names in comments are its config fields.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx

import moe
import rope


@dataclasses.dataclass(frozen=True)
class Gemma4:
    """model.Config.gemma4: the Gemma 4 switches (None for every other family). HF names in comments."""
    global_head_dim: int  # H of full-attention layers (global_head_dim); sliding layers use Config.head_dim
    global_kv_heads: int  # K of full-attention layers (num_global_key_value_heads, read only with k_eq_v)
    k_eq_v: bool = False  # full-attention layers: values from the key projection (attention_k_eq_v)
    kv_shared_layers: int = 0  # the last layers reuse earlier keys and values (num_kv_shared_layers)
    ple_dim: int = 0  # P, per-layer input width (hidden_size_per_layer_input); 0: no PLE
    ple_vocab: int = 0  # rows of the PLE table (vocab_size_per_layer_input)
    global_rope_fraction: float = 1.0  # proportional RoPE on full layers (partial_rotary_factor)
    double_wide_mlp: bool = False  # KV-shared layers' MLP is 2F wide (use_double_wide_mlp)
    experts: moe.Experts | None = None  # 26B-A4B: the MoE beside every layer's MLP (enable_moe_block)


# ----------------------------------------------------------------------------- per-layer structure

def kv_sources(cfg) -> tuple[int, ...]:
    """Per layer, the layer whose keys and values it attends to: itself, or for the last kv_shared_layers
    layers the last layer before them of the same type (transformers' kv_sharing_modes 'store' / 'reuse')."""
    L, first = cfg.n_layers, cfg.n_layers - cfg.gemma4.kv_shared_layers
    sliding = cfg.sliding_layers or (False,) * L
    sources = []
    for i in range(L):
        producers = [j for j in range(min(i + 1, first)) if sliding[j] == sliding[i]]
        if not producers:
            raise ValueError(f"layer {i} shares keys and values, but no earlier layer of its type computes them")
        sources.append(i if i < first else producers[-1])
    return tuple(sources)


def layer_config(cfg, i: int):
    """Layer i's model.Config: its type's head dim and kv heads, its MLP width."""
    g = cfg.gemma4
    full = not (cfg.sliding_layers and cfg.sliding_layers[i])
    wide = g.double_wide_mlp and kv_sources(cfg)[i] != i
    return cfg.replace(head_dim=g.global_head_dim if full else cfg.head_dim,
                       n_kv_heads=g.global_kv_heads if full else cfg.n_kv_heads, ffn_dim=cfg.ffn_dim * (1 + wide))


def layer_shapes(cfg, i: int) -> dict[str, tuple[int, ...]]:
    """Layer i's parameters and their shapes (no leading L: one dict per layer)."""
    c, g = layer_config(cfg, i), cfg.gemma4
    D, N, K, H, F = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim
    shapes = {"attn_norm": (D,), "q": (D, N, H), "q_norm": (H,), "o": (N, H, D), "post_attn_norm": (D,),
              "ffw_norm": (D,), "gate": (D, F), "up": (D, F), "down": (F, D), "post_ffw_norm": (D,),
              "layer_scalar": (1,)}
    if kv_sources(cfg)[i] == i:  # a layer that computes its own keys and values
        shapes.update(k=(D, K, H), k_norm=(H,))
        if not (g.k_eq_v and not (cfg.sliding_layers and cfg.sliding_layers[i])):  # k = v: full layers only
            shapes["v"] = (D, K, H)
    if g.ple_dim:
        shapes.update(ple_gate=(D, g.ple_dim), ple_proj=(g.ple_dim, D), ple_norm=(D,))
    if g.experts:
        E, Fe = g.experts.n_experts, g.experts.ffn_dim
        shapes.update(router=(D, E), router_scale=(D,), expert_scale=(E,), pre_ffw_norm_2=(D,),
                      expert_gate_up=(E, 2 * Fe, D), expert_down=(E, D, Fe),  # transformers' fused [E, out, in]
                      post_ffw_norm_1=(D,), post_ffw_norm_2=(D,))
    return shapes


ONES = ("layer_scalar", "router_scale", "expert_scale")  # with the norms (they scale by w), what starts at 1


class Block(nnx.Module):
    """One layer's parameters, shaped for its type (layer_shapes)."""

    def __init__(self, cfg, i: int, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.param_dtype)
        for name, shape in layer_shapes(cfg, i).items():
            if "norm" in name or name in ONES:
                value = jnp.ones(shape, dtype)
            else:  # LeCun normal over the fan in: o [N, H, D] over N·H, an expert [E, out, in] over its last axis
                fan_in = math.prod(shape[:2] if name == "o" else shape[2:] if "expert_" in name else shape[:1])
                value = fan_in ** -0.5 * jax.random.normal(rngs.params(), shape, dtype)
            setattr(self, name, nnx.Param(value))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: v[...] for name, v in vars(self).items() if isinstance(v, nnx.Variable)}


def init_params(model, cfg, rngs: nnx.Rngs) -> None:
    """The Gemma 4 parts of model.Transformer.__init__: one Block per layer, and the PLE tables."""
    model.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
    g, dtype = cfg.gemma4, jnp.dtype(cfg.param_dtype)
    if g.ple_dim:
        LP = cfg.n_layers * g.ple_dim
        model.ple_embed = nnx.Param(g.ple_dim ** -0.5 * jax.random.normal(rngs.params(), (g.ple_vocab, LP), dtype))
        model.ple_model_proj = nnx.Param(cfg.dim ** -0.5 * jax.random.normal(rngs.params(), (cfg.dim, LP), dtype))
        model.ple_norm = nnx.Param(jnp.ones((g.ple_dim,), dtype))


def layer_arrays(model) -> list[dict[str, jax.Array]]:
    """model.unstack_layers for Gemma 4: the per-layer dicts as they are (nothing to unstack)."""
    return [block.arrays() for block in model.layers]


# ----------------------------------------------------------------------------- the forward pass

def rope_tables(cfg, positions) -> tuple[rope.Rope, rope.Rope]:
    """(sliding, full) RoPE tables [B, T, H/2], each of its type's head dim: plain RoPE at rope_local_theta, and
    proportional RoPE at rope_theta (rope.py: only the first global_rope_fraction of the pairs rotate)."""
    g = cfg.gemma4
    local = rope.rope_inv_freq(cfg.replace(rope_scaling=None), cfg.rope_local_theta, scaled=False)
    full = rope.proportional_inv_freq(cfg.rope_theta, g.global_head_dim, g.global_rope_fraction)
    return rope.Rope(*rope.rope_table(positions, local)), rope.Rope(*rope.rope_table(positions, full))


def per_layer_inputs(model, tokens, x):
    """PLE: each layer's extra input [B, T, L, P] from the token (its row of the PLE table, times sqrt(P)) and
    the context (the scaled embeddings x [B, T, D] projected, times D^-1/2, RMS-normed per layer), averaged
    as (a + b) / sqrt(2)."""
    M, cfg = model_lib, model.cfg
    (B, T), L, P = tokens.shape, cfg.n_layers, cfg.gemma4.ple_dim
    by_token = model.ple_embed[...][tokens].astype(x.dtype) * jnp.asarray(math.sqrt(P), x.dtype)
    by_context = M.matmul("BTD,DE->BTE", x, model.ple_model_proj[...]) * cfg.dim ** -0.5
    by_context = M.rms_norm(by_context.reshape(B, T, L, P), model.ple_norm[...], cfg.norm_eps, False)
    return (by_context + by_token.reshape(B, T, L, P)) * 2 ** -0.5


def attention(p: dict, h, c, table: rope.Rope, mask, cache_kv, shared_kv, start, adapters):
    """Layer attention of h [B, T, D] (c: the layer's Config) → out [B, T, D], the keys and values it attended
    (for the layers that share them), its cache (k, v) [B, S, K, H] or (None, None), the head-averaged map.
    shared_kv: another layer's keys and values (a KV-shared layer computes none and caches none)."""
    M = model_lib
    norm = lambda y, w: M.rms_norm(y, w, c.norm_eps, False)  # noqa: E731
    q, = M.projections(p, ("q",), h, c, adapters)  # [B, T, N, H]
    q = rope.apply_rope(norm(q, p["q_norm"]), table.cos, table.sin)
    if shared_kv is not None:
        (k, v), cache_kv = shared_kv, (None, None)
    else:
        own_v = "v" in p or "v_codes" in p  # (stored as it is, or quantized)
        k, *v = M.projections(p, ("k", "v") if own_v else ("k",), h, c, adapters)  # [B, T, K, H]
        v = v[0] if v else k  # k = v: the values are the key projection, before k's norm and RoPE
        k = rope.apply_rope(norm(k, p["k_norm"]), table.cos, table.sin)
        v = norm(v, jnp.ones(v.shape[-1], jnp.float32))  # values RMS-normed, no learned scale
        if cache_kv[0] is not None:
            cache_kv = tuple(M.write_slots(cached, new, start) for cached, new in zip(cache_kv, (k, v)))
            k, v = (cached.astype(h.dtype) for cached in cache_kv)
    heads, attention_map = M.attention(q, k, v, mask, c.query_scale, c.attn_softcap)  # query scale 1
    out, = M.projections(p, ("o",), heads, c, adapters)
    return out, (k, v), cache_kv, attention_map


def block(x, p: dict, *, c, table, mask, ple, cache_kv, shared_kv, start, lora, drop_key):
    """One Gemma 4 layer on x [B, T, D]; ple [B, T, P] its per-layer input (None without PLE); lora: the adapters'
    LoRAConfig (None without), drop_key: dropout on their inputs (None: none)."""
    M = model_lib
    adapters = None if lora is None else M.Adapters(lora.scale, lora.dropout, drop_key)
    norm = lambda y, name: M.rms_norm(y, p[name], c.norm_eps, False)  # noqa: E731
    out, kv, cache_kv, attention_map = attention(p, norm(x, "attn_norm"), c, table, mask, cache_kv, shared_kv, start,
                                                 adapters)
    x = x + norm(out, "post_attn_norm")
    y = M.mlp(p, norm(x, "ffw_norm"), c, adapters)
    if c.gemma4.experts:  # 26B-A4B: the experts beside the MLP, each with its own norms, summed
        y = norm(y, "post_ffw_norm_1") + norm(moe_block(p, x, c), "post_ffw_norm_2")
    x = x + norm(y, "post_ffw_norm")
    if ple is not None:
        gated = M.ACTIVATIONS[c.act](M.matmul("BTD,DP->BTP", x, p["ple_gate"])) * ple  # [B, T, P]
        x = x + norm(M.matmul("BTP,PD->BTD", gated, p["ple_proj"]), "ple_norm")
    return x * p["layer_scalar"].astype(x.dtype), kv, cache_kv, attention_map


def moe_block(p: dict, x, c):
    """26B-A4B's experts on the residual stream x [B, T, D] (the MLP's input before its norm): the router reads
    norm(x) * router_scale / sqrt(D) with no learned norm weight, softmax over E in float32, top-k renormalised,
    each chosen weight times its expert's expert_scale; the experts read pre_ffw_norm_2(x)."""
    M, cfg = model_lib, c.gemma4.experts
    B, T, D = x.shape
    h = x.reshape(B * T, D)
    r = M.rms_norm(h, jnp.ones(D, jnp.float32), c.norm_eps, False) * p["router_scale"].astype(h.dtype) * D ** -0.5
    weights, chosen, *_ = moe.route(r, p["router"], cfg)  # [M, k] float32, renormalised (norm_topk_prob)
    weights = weights * p["expert_scale"].astype(jnp.float32)[chosen]
    h = M.rms_norm(h, p["pre_ffw_norm_2"], c.norm_eps, False)
    gate, up = jnp.split(jnp.swapaxes(p["expert_gate_up"], 1, 2), 2, axis=-1)  # [E, D, F] each: gate rows came first
    down = jnp.swapaxes(p["expert_down"], 1, 2)  # [E, F, D]
    grouped = gate.size * 3 >= 2**24 and jax.default_backend() != "cpu"  # moe.experts' rule: ragged_dot off CPU
    compute = moe.grouped_experts if grouped else moe.dense_experts
    y = compute(h, weights, chosen, gate, up, down, M.ACTIVATIONS[c.act])
    return y.reshape(B, T, D)


def forward(model, tokens, positions, segment_ids, cache, last, layers, hidden, taps, dropout_key):
    """model.Transformer.__call__ for Gemma 4 (same arguments and results): the
    layers unrolled, each with its own shapes, KV-shared layers reading their source layer's keys and values."""
    M, cfg = model_lib, model.cfg
    dtype = jnp.dtype(cfg.dtype)
    x = model.embed_rows(tokens).astype(dtype) * jnp.asarray(math.sqrt(cfg.dim), dtype)  # [B, T, D]
    ple = per_layer_inputs(model, tokens, x) if cfg.gemma4.ple_dim else None  # [B, T, L, P]
    start, k_segments, (global_mask, sliding_mask), _ = model.attention_inputs(positions, segment_ids, cache)
    sliding_rope, full_rope = rope_tables(cfg, positions)
    x, caches, tapped = run_layers(cfg, x, layer_arrays(model) if layers is None else layers, ple,
                                   {"sliding": sliding_mask, "full": global_mask},
                                   {"sliding": sliding_rope, "full": full_rope},
                                   None if cache is None else (cache.k, cache.v), start, tuple(taps),
                                   getattr(model, "lora", None), dropout_key)
    tapped.update({"router": None} if "router" in taps else {})  # no load-balancing loss: transformers' Gemma 4 has none

    x = x if last is None else x[:, -last:]
    x = M.rms_norm(x, model.final_norm[...], cfg.norm_eps, False)
    out = x if hidden else model.logits(x)
    if cache is not None:
        cache = M.KVCache(*(tuple(kv) for kv in zip(*caches)), k_segments, start + tokens.shape[1])
    if taps:
        return (out, tapped) if cache is None else (out, cache, tapped)
    return out if cache is None else (out, cache)


@functools.partial(jax.jit, static_argnames=("cfg", "taps", "lora"))
def run_layers(cfg, x, layers, ple, masks, tables, cache_kv, start, taps, lora=None, dropout_key=None):
    """Every layer on x [B, T, D] as one jitted program (called eagerly, an unrolled model would otherwise run
    op by op): x, each layer's cache (k, v) ((None, None) for a KV-shared layer, or without a cache), and the
    taps "hidden" [L + 1, B, T, D] and "attention" [L, B, T, S] asked for. lora: the adapters' LoRAConfig (their
    factors are in the layers' dicts); dropout_key: dropout on their inputs, a key per layer."""
    sources = kv_sources(cfg)
    policy = None if cfg.remat else jax.checkpoint_policies.dots_with_no_batch_dims_saveable  # as model.py's
    kvs, caches, hiddens, maps = {}, [], [], []
    for i, p in enumerate(layers):
        kind = "sliding" if cfg.sliding_layers and cfg.sliding_layers[i] else "full"
        step = jax.checkpoint(functools.partial(block, c=layer_config(cfg, i), lora=lora), policy=policy)
        drop = None if dropout_key is None or lora is None or not lora.dropout else jax.random.fold_in(dropout_key, i)
        hiddens.append(x)
        x, kvs[i], layer_cache, attention_map = step(
            x, p, table=tables[kind], mask=masks[kind], ple=None if ple is None else ple[:, :, i],
            cache_kv=(None, None) if cache_kv is None else (cache_kv[0][i], cache_kv[1][i]),
            shared_kv=None if sources[i] == i else kvs[sources[i]], start=start, drop_key=drop)
        caches.append(layer_cache)
        maps.append(attention_map)
    tapped = {name: jnp.stack(a) for name, a in (("hidden", hiddens + [x]), ("attention", maps)) if name in taps}
    return x, caches, tapped


def init_cache(cfg, batch: int, length: int, dtype=None):
    """model.KVCache for Gemma 4: one [B, S, K, H] array per layer of its own shape; None for a KV-shared layer,
    which attends to its source layer's cache (kv_cache_bytes measures what that saves)."""
    dtype, sources = dtype or cfg.dtype, kv_sources(cfg)
    shapes = [(batch, length, layer_config(cfg, i).n_kv_heads, layer_config(cfg, i).head_dim)
              if sources[i] == i else None for i in range(cfg.n_layers)]
    k = tuple(None if s is None else jnp.zeros(s, dtype) for s in shapes)
    v = tuple(None if s is None else jnp.zeros(s, dtype) for s in shapes)
    return model_lib.KVCache(k, v, jnp.zeros((batch, length), jnp.int32), jnp.int32(0))


def kv_cache_bytes(cfg, batch: int, length: int, dtype="bfloat16") -> tuple[int, int]:
    """(bytes the cache holds, bytes it would hold if every layer cached its own keys and values)."""
    size = jnp.dtype(dtype).itemsize * 2 * batch * length
    per_layer = [layer_config(cfg, i).n_kv_heads * layer_config(cfg, i).head_dim for i in range(cfg.n_layers)]
    sources = kv_sources(cfg)
    return size * sum(n for i, n in enumerate(per_layer) if sources[i] == i), size * sum(per_layer)


# ----------------------------------------------------------------------------- presets (model.CONFIGS)

def presets(tiny: dict, every_nth_global) -> dict[str, dict]:
    """model.Config arguments of the Gemma 4 presets (model.py's tiny defaults and layer-pattern rule passed in).
    Shapes from the checkpoints' config.json text_config: E2B 35 layers of 1536, 8 heads / 1 kv head, MLP 6144 (12288
    on its 20 KV-shared layers), 4 sliding to 1 full, window 512; E4B 42 layers of 2560, 8 / 2 heads, 10240, 18
    shared; both PLE 256, no k = v. 31B: 60 layers of 5376, 32 heads, 16 kv heads sliding and 4 full with k = v,
    21504, window 1024. 26B-A4B: 30 layers of 2816, 16 / 8 heads (2 full, k = v), MLP 2112 beside 128 experts of
    704, top 8. All: head dim 256 sliding / 512 full, proportional RoPE 0.25 at 1e6 and 1e4 sliding, logits capped
    at 30, vocabulary 262144, tied embeddings."""
    base = dict(family="gemma4", vocab_size=262_144, head_dim=256, act="gelu_tanh", qk_norm=True, post_norms=True,
                embed_scale=True, query_scale=1.0, final_softcap=30.0, rope_theta=1e6, rope_local_theta=1e4,
                bos_id=2, eos_ids=(1, 106), pad_id=0)
    def sized(dim, n_layers, n_heads, n_kv_heads, ffn_dim, window, period, max_len, **gemma4):
        return dict(base, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
                    sliding_window=window, sliding_layers=every_nth_global(n_layers, period), max_seq_len=max_len,
                    gemma4=Gemma4(global_head_dim=512, global_rope_fraction=0.25, **gemma4))
    ple = dict(ple_dim=256, ple_vocab=262_144)
    return {
        "gemma4-e2b": sized(1536, 35, 8, 1, 6144, 512, 5, 131_072, global_kv_heads=1, kv_shared_layers=20,
                            double_wide_mlp=True, **ple),
        "gemma4-e4b": sized(2560, 42, 8, 2, 10_240, 512, 6, 131_072, global_kv_heads=2, kv_shared_layers=18, **ple),
        "gemma4-31b": sized(5376, 60, 32, 16, 21_504, 1024, 6, 262_144, global_kv_heads=4, k_eq_v=True),
        "gemma4-26b-a4b": sized(2816, 30, 16, 8, 2112, 1024, 6, 262_144, global_kv_heads=2, k_eq_v=True,
                                experts=moe.Experts(128, 8, 704, norm_topk_prob=True, sparse_layers=(True,) * 30)),
        # CPU demos: every Gemma 4 switch on in 4 layers (sliding, full, and one KV-shared layer of each type)
        "tiny-gemma4": dict(base, **{**tiny, "n_layers": 4}, sliding_window=32, sliding_layers=(True, False) * 2,
                            gemma4=Gemma4(global_head_dim=64, global_kv_heads=1, k_eq_v=True, kv_shared_layers=2,
                                          ple_dim=16, ple_vocab=tiny["vocab_size"], global_rope_fraction=0.25,
                                          double_wide_mlp=True)),
    }


# ----------------------------------------------------------------------------- checkpoints (ckpt.py's helpers)

def config_from_hf(hf: dict):
    """model.Config from a gemma4_text config.json (ckpt.py unwraps a multimodal one's text_config). Per-type head dims
    and kv heads as the Hub writes them (global_head_dim, num_global_key_value_heads: read only with
    attention_k_eq_v, as transformers does) or as transformers 5 does (per_layer_config {layer: overrides});
    RoPE per layer type (rope_parameters), transformers' defaults where absent."""
    L, K, H = hf["num_hidden_layers"], hf.get("num_key_value_heads", 4), hf.get("head_dim", 256)
    types = list(hf.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(L)])
    types[-1] = "full_attention"  # transformers forces the last layer global
    sliding = tuple(t == "sliding_attention" for t in types)
    full_layers = [i for i in range(L) if not sliding[i]]
    k_eq_v = bool(hf.get("attention_k_eq_v", False))
    overrides = {int(k): v for k, v in (hf.get("per_layer_config") or {}).items()}
    if "per_layer_config" in hf:
        if set(overrides) - set(full_layers) or len({json_key(v) for v in overrides.values()}) > 1 \
                or any(set(v) - {"head_dim", "num_key_value_heads"} for v in overrides.values()):
            raise ValueError("per_layer_config other than one head_dim / num_key_value_heads for the full layers")
        first = overrides.get(full_layers[0], {}) if full_layers else {}
        Hg, Kg = first.get("head_dim", H), first.get("num_key_value_heads", K)
    else:
        Hg, Kg = hf.get("global_head_dim", 512), (hf.get("num_global_key_value_heads") if k_eq_v else None) or K
    by_type = hf.get("rope_parameters") or {}  # (a flat rope_theta is ignored: transformers' Gemma 4 reads only these)
    full_rope = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6,
                 **by_type.get("full_attention", {})}
    local_rope = {"rope_type": "default", "rope_theta": 1e4, **by_type.get("sliding_attention", {})}
    if full_rope["rope_type"] not in ("proportional", "default") or local_rope["rope_type"] != "default" \
            or full_rope.get("factor", 1.0) != 1.0:
        raise ValueError(f"unsupported Gemma 4 RoPE {full_rope} / {local_rope}")
    if hf.get("use_bidirectional_attention") or hf.get("attention_bias"):
        raise ValueError("bidirectional attention and attention biases are not supported")
    experts = None
    if hf.get("enable_moe_block"):
        experts = moe.Experts(hf["num_experts"], hf["top_k_experts"], hf["moe_intermediate_size"], norm_topk_prob=True,
                              sparse_layers=(True,) * L)
    act = {v: k for k, v in HF_ACT.items()}.get(hf.get("hidden_activation", "gelu_pytorch_tanh"))  # ACT2FN's names
    if act is None:
        raise ValueError(f"unsupported activation {hf.get('hidden_activation')!r}")
    ple_dim = hf.get("hidden_size_per_layer_input") or 0
    eos = hf.get("eos_token_id", 1)
    return model_lib.Config(
        family="gemma4", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=L,
        n_heads=hf["num_attention_heads"], n_kv_heads=K, head_dim=H, ffn_dim=hf["intermediate_size"], act=act,
        norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=True, rope_theta=float(full_rope["rope_theta"]),
        rope_local_theta=float(local_rope["rope_theta"]), sliding_window=hf.get("sliding_window", 512) if any(sliding)
        else None, sliding_layers=sliding if any(sliding) else (), query_scale=1.0,
        final_softcap=hf.get("final_logit_softcapping"), post_norms=True, embed_scale=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), max_seq_len=hf.get("max_position_embeddings", 131_072),
        bos_id=hf.get("bos_token_id", 2), eos_ids=tuple(eos) if isinstance(eos, list) else (eos,),
        pad_id=hf.get("pad_token_id", 0),
        gemma4=Gemma4(global_head_dim=Hg, global_kv_heads=Kg, k_eq_v=k_eq_v,
                      kv_shared_layers=hf.get("num_kv_shared_layers", 0), ple_dim=ple_dim,
                      ple_vocab=hf.get("vocab_size_per_layer_input", hf["vocab_size"]) if ple_dim else 0,
                      global_rope_fraction=float(full_rope.get("partial_rotary_factor", 1.0)),
                      double_wide_mlp=bool(hf.get("use_double_wide_mlp", False)), experts=experts))


HF_ACT = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu"}  # ours → transformers' (exact gelu)


def json_key(x) -> str:
    return repr(sorted(x.items()))


def config_to_hf(cfg) -> dict:
    """config.json as the Hub writes Gemma 4 text models (global_head_dim, rope_parameters per layer type); a full
    layer's kv head count that only transformers 5's per_layer_config can say (no k = v) goes there."""
    g, x = cfg.gemma4, cfg.gemma4.experts
    hf = {"architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
          "global_head_dim": g.global_head_dim, "attention_k_eq_v": g.k_eq_v,
          "num_global_key_value_heads": g.global_kv_heads if g.k_eq_v else None,
          "num_kv_shared_layers": g.kv_shared_layers, "hidden_size_per_layer_input": g.ple_dim,
          "vocab_size_per_layer_input": g.ple_vocab or cfg.vocab_size, "use_double_wide_mlp": g.double_wide_mlp,
          "hidden_activation": HF_ACT[cfg.act], "rms_norm_eps": cfg.norm_eps,
          "layer_types": ["sliding_attention" if s else "full_attention"
                          for s in cfg.sliding_layers or (False,) * cfg.n_layers],
          "sliding_window": cfg.sliding_window or 512, "final_logit_softcapping": cfg.final_softcap,
          "rope_parameters": {"full_attention": {"rope_type": "proportional", "rope_theta": cfg.rope_theta,
                                                 "partial_rotary_factor": g.global_rope_fraction},
                              "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}},
          "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
          "bos_token_id": cfg.bos_id, "pad_token_id": cfg.pad_id, "torch_dtype": cfg.param_dtype,
          "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else cfg.eos_ids[0],
          "enable_moe_block": x is not None, "num_experts": x and x.n_experts, "top_k_experts": x and x.top_k,
          "moe_intermediate_size": x and x.ffn_dim}
    if not g.k_eq_v and g.global_kv_heads != cfg.n_kv_heads:
        hf["per_layer_config"] = {str(i): {"head_dim": g.global_head_dim, "num_key_value_heads": g.global_kv_heads}
                                  for i, s in enumerate(hf["layer_types"]) if s == "full_attention"}
    return {k: v for k, v in hf.items() if v is not None}


# Our per-layer parameter → its transformers name under model.layers.{i}., and n_in (ckpt.py's name table: None the
# same shape, 1 or 2 an HF Linear weight [out, in] whose `in` is our first n_in axes).
LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", None), "q": ("self_attn.q_proj.weight", 1),
    "k": ("self_attn.k_proj.weight", 1), "v": ("self_attn.v_proj.weight", 1), "o": ("self_attn.o_proj.weight", 2),
    "q_norm": ("self_attn.q_norm.weight", None), "k_norm": ("self_attn.k_norm.weight", None),
    "post_attn_norm": ("post_attention_layernorm.weight", None), "ffw_norm": ("pre_feedforward_layernorm.weight", None),
    "gate": ("mlp.gate_proj.weight", 1), "up": ("mlp.up_proj.weight", 1), "down": ("mlp.down_proj.weight", 1),
    "post_ffw_norm": ("post_feedforward_layernorm.weight", None), "layer_scalar": ("layer_scalar", None),
    "ple_gate": ("per_layer_input_gate.weight", 1), "ple_proj": ("per_layer_projection.weight", 1),
    "ple_norm": ("post_per_layer_input_norm.weight", None),
    "router": ("router.proj.weight", 1), "router_scale": ("router.scale", None),
    "expert_scale": ("router.per_expert_scale", None), "pre_ffw_norm_2": ("pre_feedforward_layernorm_2.weight", None),
    "expert_gate_up": ("experts.gate_up_proj", None), "expert_down": ("experts.down_proj", None),  # fused, as stored
    "post_ffw_norm_1": ("post_feedforward_layernorm_1.weight", None),
    "post_ffw_norm_2": ("post_feedforward_layernorm_2.weight", None),
}
GLOBAL_NAMES = [("model.embed_tokens_per_layer.weight", "ple_embed", None),  # PLE: [V_ple, L·P]
                ("model.per_layer_model_projection.weight", "ple_model_proj", 1),  # [L·P, D]
                ("model.per_layer_projection_norm.weight", "ple_norm", None)]
# Multimodal checkpoints: what is not the text model (skipped, with one line saying so)
TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def name_table(cfg, global_names) -> list[tuple[str, str, int | None]]:
    """ckpt.name_table for Gemma 4: (HF name, our dotted name, n_in), one row per layer and tensor."""
    table = [row for row in global_names if row[1] != "lm_head" or not cfg.tie_embeddings]
    table += [row for row in GLOBAL_NAMES if cfg.gemma4.ple_dim]
    for i in range(cfg.n_layers):
        table += [(f"model.layers.{i}.{LAYER_NAMES[name][0]}", f"layers.{i}.{name}", LAYER_NAMES[name][1])
                  for name in layer_shapes(cfg, i)]
    return table


def say_skipped_towers(hf: dict) -> None:
    """One line on stderr when a multimodal Gemma 4 checkpoint's vision or audio tower is left out."""
    towers = [name for name in ("vision", "audio") if hf.get(f"{name}_config")]
    if hf.get("model_type") == "gemma4" and towers:
        print(f"gemma4: loading the text model only; the {' and '.join(towers)} tower{'s' * (len(towers) > 1)} "
              "skipped (text only)", file=sys.stderr)


HUB_REPOS = {"gemma4-e2b": "google/gemma-4-E2B", "gemma4-e4b": "google/gemma-4-E4B", "gemma4-31b": "google/gemma-4-31B",
             "gemma4-26b-a4b": "google/gemma-4-26B-A4B"}  # ckpt.HF_REPOS


# model.py imports this module for Config.gemma4 and the presets; this import comes last so that either file can be
# imported first (the functions above read model_lib only when they run).
import model as model_lib  # noqa: E402
