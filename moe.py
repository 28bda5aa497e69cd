"""moe.py — the mixture-of-experts MLP of Qwen 3 MoE (Qwen3-30B-A3B, Qwen3-235B-A22B), and its presets.

A sparse layer replaces the dense MLP by E small SwiGLU experts and a router that sends each token to k of them:

    p   = softmax(h W_router)                        # [M, E], float32 (M = B·T tokens)
    S   = the k experts of largest p                 # top-k, per token
    w_e = p_e                    (norm_topk_prob false: Qwen3-MoE's default)
    w_e = p_e / sum_{j in S} p_j (norm_topk_prob true: the published checkpoints)
    y   = sum_{e in S} w_e · (silu(h G_e) * (h U_e)) D_e

Dropless: every token reaches all of its k experts (no capacity factor), so two computations give the same
function and `experts` picks by size: `dense_experts` runs every expert on every token and weights the unchosen by
0 (E/k times the FLOPs, but plain einsums: the fast path for tiny CPU models); `grouped_experts` sorts the M·k
(token, expert) pairs by expert, runs one `jax.lax.ragged_dot` per projection over the sorted rows, and unsorts
(k/E of the FLOPs: the path for real sizes). Both are differentiable and equal to float rounding.

Which layers are sparse follows transformers' Qwen3MoeDecoderLayer: layer i is sparse when i is not in
`mlp_only_layers` and (i + 1) % decoder_sparse_step == 0; the others keep the dense MLP of width
intermediate_size. A model's per-layer parameters are stacked on L, so a mixed model stores both kinds for
every layer (the other kind's slots are zeros in a loaded checkpoint) and `mlp_or_experts` runs this layer's
kind; the published models are sparse everywhere and store no dense MLP at all.

Training adds the router's load-balancing loss (`load_balancing_loss`, transformers' formula) times
`--router-aux-loss-coef` (the checkpoint's router_aux_loss_coef, 0.001 by default) to each script's loss.

Sharding: the experts are split along D on the fsdp axis, like the dense MLP (shard.py), not across devices
by expert. Under FSDP a layer's weights are gathered where they are used, so either split leaves each device
1/n of every layer's experts at rest; splitting D keeps each device's tokens where they are (routing needs
no all-to-all, no capacity, nothing dropped) and runs the same dropless code on one device or many
(tests/test_shard.py: 8 simulated devices equal one, both paths). The price: each layer's whole expert stack
is gathered per step (Qwen3-30B-A3B: 3·128·2048·768 weights, 1.2 GB in bf16, per layer), where expert
parallelism would move only the routed tokens (B·T·k·D) — the better trade at large batches on real pods,
and the path not taken yet. Not here either: LoRA on the experts (run.load refuses it in one line).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Experts:
    """The sparse layers of a model.Config (`cfg.experts`; None: a dense model). HF names in comments."""
    n_experts: int  # E (num_experts; transformers 5 writes num_local_experts)
    top_k: int  # k experts per token (num_experts_per_tok)
    ffn_dim: int  # F of one expert (moe_intermediate_size)
    norm_topk_prob: bool  # renormalise the k chosen probabilities to sum to 1
    sparse_layers: tuple[bool, ...]  # per layer, True if its MLP is the experts
    router_aux_loss_coef: float = 0.001  # training's default weight of load_balancing_loss (router_aux_loss_coef)

    def __post_init__(self):
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k {self.top_k} must be between 1 and n_experts {self.n_experts}")


def sparse_layers(n_layers: int, decoder_sparse_step: int, mlp_only_layers=()) -> tuple[bool, ...]:
    """transformers' rule: layer i is sparse unless listed in mlp_only_layers or (i + 1) % step != 0."""
    return tuple(i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0 for i in range(n_layers))


def with_expert_shapes(cfg, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """One block's parameter shapes (model.layer_shapes) with the router and experts added, and the dense
    MLP (gate, up, down) dropped when no layer uses it."""
    if cfg.experts is None:
        return shapes
    D, E, F = cfg.dim, cfg.experts.n_experts, cfg.experts.ffn_dim
    if cfg.act != "silu" or len(cfg.experts.sparse_layers) != cfg.n_layers:
        raise ValueError("Qwen 3 MoE experts are SwiGLU (act silu) and need one sparse_layers entry per layer")
    if all(cfg.experts.sparse_layers):
        shapes = {name: shape for name, shape in shapes.items() if name not in ("gate", "up", "down")}
    return {**shapes, "router": (D, E), "expert_gate": (E, D, F), "expert_up": (E, D, F), "expert_down": (E, F, D)}


# ----------------------------------------------------------------------------- the layer

def route(h, router, cfg: Experts) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h [M, D] → the weights [M, k] float32 and indices [M, k] of each token's k experts: softmax over the
    router logits in float32 (the logits rounded to h's dtype first, as transformers does), top-k, and
    renormalised to sum to 1 only with norm_topk_prob; and those logits [M, E] (float32), for the aux loss."""
    logits = jnp.einsum("MD,DE->ME", h, router.astype(h.dtype), preferred_element_type=jnp.float32)
    logits = logits.astype(h.dtype).astype(jnp.float32)
    weights, chosen = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.top_k)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, chosen, logits


def dense_experts(h, weights, chosen, gate, up, down, act: Callable) -> jax.Array:
    """Every expert on every token, the unchosen weighted by 0: h [M, D], weights/chosen [M, k] → [M, D]."""
    combine = jnp.einsum("MK,MKE->ME", weights, jax.nn.one_hot(chosen, gate.shape[0], dtype=weights.dtype))
    g = jnp.einsum("MD,EDF->MEF", h, gate.astype(h.dtype), preferred_element_type=jnp.float32)
    u = jnp.einsum("MD,EDF->MEF", h, up.astype(h.dtype), preferred_element_type=jnp.float32)
    y = jnp.einsum("MEF,EFD->MED", (act(g) * u).astype(h.dtype), down.astype(h.dtype),
                   preferred_element_type=jnp.float32)
    return jnp.einsum("ME,MED->MD", combine, y).astype(h.dtype)


def grouped_experts(h, weights, chosen, gate, up, down, act: Callable) -> jax.Array:
    """The chosen experts only: the M·k (token, expert) rows sorted by expert so each expert's rows are
    contiguous, one ragged_dot per projection (row block e times expert e's weight), then unsorted and
    summed over k with the weights. h [M, D], weights/chosen [M, k] → [M, D]."""
    M, k = chosen.shape
    E = gate.shape[0]
    flat = chosen.reshape(-1)  # [M·k], row r = (token r // k, its (r % k)-th expert)
    order = jnp.argsort(flat, stable=True)  # rows sorted by expert
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E] rows per expert
    x = h[order // k]  # [M·k, D], each row its token's input
    ragged = lambda a, w: jax.lax.ragged_dot(a, w.astype(h.dtype), group_sizes,  # noqa: E731
                                             preferred_element_type=jnp.float32)
    g, u = ragged(x, gate), ragged(x, up)  # [M·k, F]
    y = ragged((act(g) * u).astype(h.dtype), down)  # [M·k, D]
    y = y[jnp.argsort(order)].reshape(M, k, -1)  # unsorted: back to (token, its k-th expert)
    return jnp.einsum("MK,MKD->MD", weights, y).astype(h.dtype)


def experts(p: dict, h, cfg: Experts, act: Callable, grouped: bool | None = None) -> tuple[jax.Array, ...]:
    """The sparse MLP of h [B, T, D] → [B, T, D], and the router logits [B, T, E] float32, with this layer's
    p["router"] [D, E] and p["expert_gate"], p["expert_up"] [E, D, F], p["expert_down"] [E, F, D]. grouped
    None: by size and device, ragged_dot once a layer's experts hold 2^24 weights (the dense path's E/k extra
    FLOPs stop being cheaper than sorting) on an accelerator; on CPU always dense: XLA has no grouped kernel
    there and runs ragged_dot as a masked product over every expert, k times the dense path's work (E 128,
    top 8: 4.7x its time, 5x its memory; benchmarks/RESULTS.md, Qwen 3 MoE)."""
    B, T, D = h.shape
    h = h.reshape(B * T, D)  # [M, D]
    weights, chosen, logits = route(h, p["router"], cfg)  # [M, k] float32, int32; [M, E]
    if grouped is None:
        grouped = p["expert_gate"].size * 3 >= 2**24 and jax.default_backend() != "cpu"
    compute = grouped_experts if grouped else dense_experts
    y = compute(h, weights, chosen, p["expert_gate"], p["expert_up"], p["expert_down"], act)
    return y.reshape(B, T, D), logits.reshape(B, T, -1)


def mlp_or_experts(p: dict, h, cfg, sparse, dense: Callable[[], jax.Array]) -> tuple[jax.Array, jax.Array | None]:
    """A block's feed-forward of h [B, T, D] (model.Config cfg) and its router logits [B, T, E] (None in a
    dense model): the experts where `sparse` ([] bool, traced in the layer scan), else dense(), the model's
    MLP, with logits 0 (the aux loss skips those layers). A model sparse everywhere never builds the dense
    branch."""
    if cfg.experts is None:
        return dense(), None
    if all(cfg.experts.sparse_layers):
        return experts(p, h, cfg.experts, jax.nn.silu)
    no_router = jnp.zeros((*h.shape[:2], cfg.experts.n_experts), jnp.float32)
    return jax.lax.cond(sparse, lambda: experts(p, h, cfg.experts, jax.nn.silu), lambda: (dense(), no_router))


def aux_loss_coef(flag: float | None, cfg) -> float | None:
    """--router-aux-loss-coef for model.Config cfg: None for a dense model (no aux loss), else the flag, or
    when it is unset the checkpoint's router_aux_loss_coef (0.001: transformers' and TRL's default)."""
    return None if cfg.experts is None else cfg.experts.router_aux_loss_coef if flag is None else flag


def load_balancing_loss(router_logits, mask, cfg) -> jax.Array:
    """transformers' load_balancing_loss_func (Switch Transformer's eqs. 4-6) pooled over the sparse layers
    (model.Config cfg; 0.0 for a dense model): router_logits [L, B, T, E] (model's "router" tap), mask [B, T]
    (1 on real tokens, 0 on padding), p^l = softmax(router_logits^l), S^l the top-k of p^l, and

        f_e = sum_l sum_n m_n [e in S^l_n] / (L_sparse sum_n m_n)     # share of routed slots, sums to k
        P_e = sum_l sum_n m_n p^l_ne       / (L_sparse sum_n m_n)     # mean router probability
        aux = E sum_e f_e P_e                                         # k when routing is uniform

    The gradient reaches the router through P only (top-k is not differentiable)."""
    if cfg.experts is None:
        return jnp.zeros((), jnp.float32)
    x = cfg.experts
    p = jax.nn.softmax(router_logits[np.flatnonzero(x.sparse_layers)], axis=-1)  # [L_sparse, B, T, E]
    _, chosen = jax.lax.top_k(p, x.top_k)  # [L_sparse, B, T, k]
    m = mask.astype(jnp.float32)[None, :, :, None]  # [1, B, T, 1]
    slots = jnp.sum(jax.nn.one_hot(chosen, x.n_experts, dtype=jnp.float32), axis=-2)  # [L_sparse, B, T, E]
    rows = jnp.maximum(p.shape[0] * jnp.sum(mask), 1.0)
    f, P = jnp.sum(slots * m, axis=(0, 1, 2)) / rows, jnp.sum(p * m, axis=(0, 1, 2)) / rows  # [E] each
    return x.n_experts * jnp.sum(f * P)


# ----------------------------------------------------------------------------- checkpoints (ckpt.py's helpers)

EXPERT_PARAMS = ("router", "expert_gate", "expert_up", "expert_down")


def experts_from_hf(hf: dict) -> Experts | None:
    """cfg.experts from a qwen3_moe config.json, as the Hub writes it (num_experts) or transformers 5
    (num_local_experts); the other fields' defaults are Qwen3MoeConfig's."""
    n_experts = hf.get("num_experts", hf.get("num_local_experts")) or 0
    if hf.get("model_type") != "qwen3_moe" or not n_experts:
        return None
    layers = sparse_layers(hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or ())
    return Experts(n_experts=n_experts, top_k=hf["num_experts_per_tok"], ffn_dim=hf["moe_intermediate_size"],
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)), sparse_layers=layers,
                   router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def experts_to_hf(cfg) -> dict:
    """config.json's MoE fields in the Hub's names (model.Config cfg; {} for a dense model)."""
    x = cfg.experts
    if x is None:
        return {}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": x.n_experts,
            "num_experts_per_tok": x.top_k, "moe_intermediate_size": x.ffn_dim, "norm_topk_prob": x.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": [i for i, s in enumerate(x.sparse_layers) if not s],
            "router_aux_loss_coef": x.router_aux_loss_coef}


def layers_using(cfg, name: str) -> tuple[bool, ...]:
    """Per layer, whether it uses the stacked parameter `name` (model.Config cfg): a sparse layer has no
    dense MLP (gate, up, down), a dense layer no router or experts; everything else every layer uses."""
    sparse = cfg.experts.sparse_layers if cfg.experts else (False,) * cfg.n_layers
    needs_sparse = True if name in EXPERT_PARAMS else False if name in ("gate", "up", "down") else None
    return tuple(needs_sparse is None or s == needs_sparse for s in sparse)


def zero_unused(cfg, name: str, value: jax.Array) -> jax.Array:
    """A freshly initialised [L, ...] parameter with the layers that never read it zeroed (a mixed model's
    dense layers' experts, its sparse layers' dense MLP): what a loaded checkpoint holds there too."""
    used = jnp.asarray(layers_using(cfg, name), value.dtype)
    return value * used.reshape(-1, *(1,) * (value.ndim - 1))


class FusedExpert(NamedTuple):
    """One expert's tensor inside transformers 5's fused ones, as its models hold them in memory (and a file
    saved from their state_dict): mlp.experts.gate_up_proj [E, 2F, D] (gate rows, then up) and
    mlp.experts.down_proj [E, D, F]. save_pretrained (5.23) writes one tensor per expert, the Hub's layout."""
    name: str  # the stored fused tensor
    expert: int  # e
    half: int | None  # 0: gate, 1: up, None: down_proj (not split)

    def read(self, file) -> np.ndarray:  # a view, no copy: [F, D] or [D, F], an HF Linear weight [out, in]
        x = file.get(self.name)[self.expert]
        return x if self.half is None else np.split(x, 2)[self.half]


def unfused(files: dict, cfg) -> dict:
    """ckpt.tensor_index's {name: (file, stored name)} with each fused expert tensor replaced by the Hub's
    per-expert names, {model.layers.i.mlp.experts.e.gate_proj.weight: (file, FusedExpert(...)), ...}."""
    out = {}
    for name, (file, stored) in files.items():
        prefix, _, kind = name.rpartition(".")
        if cfg.experts is None or not prefix.endswith(".mlp.experts") or kind not in ("gate_up_proj", "down_proj"):
            out[name] = (file, stored)
            continue
        parts = (("gate_proj", 0), ("up_proj", 1)) if kind == "gate_up_proj" else (("down_proj", None),)
        for e in range(cfg.experts.n_experts):
            for proj, half in parts:
                out[f"{prefix}.{e}.{proj}.weight"] = (file, FusedExpert(stored, e, half))
    return out


def stacked_rows(cfg, hf: str, name: str) -> list[tuple[tuple[int, ...], str]]:
    """Each HF tensor of a per-layer name-table row (hf with {i}, and {e} for one expert's) with its place in
    our stacked parameter `name` ([L, ...] or [L, E, ...]): [((i,) or (i, e), HF name)], for the layers that
    use it (layers_using)."""
    layers = [i for i, used in enumerate(layers_using(cfg, name.split(".")[-1])) if used]
    if "{e}" not in hf:
        return [((i,), hf.format(i=i)) for i in layers]
    return [((i, e), hf.format(i=i, e=e)) for i in layers for e in range(cfg.experts.n_experts)]


# ----------------------------------------------------------------------------- presets (model.CONFIGS)

def presets(qwen3: dict, tiny: dict) -> dict[str, dict]:
    """model.Config arguments of the MoE presets, from model.py's Qwen 3 and tiny defaults. Shapes from the
    checkpoints' config.json (Qwen/Qwen3-30B-A3B: 48 layers, hidden 2048, 32 heads / 4 kv heads, 128 experts,
    8 per token, moe_intermediate_size 768, intermediate_size 6144; Qwen/Qwen3-235B-A22B: 94 layers, hidden
    4096, 64 / 4 heads, 128 experts, 8 per token, 1536, 12288; both norm_topk_prob true, decoder_sparse_step 1,
    mlp_only_layers [], untied embeddings, max_position_embeddings 40960, rope_theta 1e6)."""
    def published(n_layers, ffn_dim):
        return Experts(128, 8, ffn_dim, norm_topk_prob=True, sparse_layers=(True,) * n_layers)
    return {
        "qwen3-30b-a3b": dict(qwen3, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, ffn_dim=6144,
                              tie_embeddings=False, experts=published(48, 768)),
        "qwen3-235b-a22b": dict(qwen3, dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, ffn_dim=12_288,
                                tie_embeddings=False, experts=published(94, 1536)),
        # CPU demos: both layers sparse, 4 experts of width 128, top-2 (mixed models: tests/test_moe.py)
        "tiny-qwen3-moe": dict(tiny, family="qwen3", qk_norm=True, rope_theta=1e6,
                               experts=Experts(4, 2, 128, norm_topk_prob=True, sparse_layers=(True, True))),
    }
