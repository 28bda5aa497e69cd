"""rope.py — rotary position embeddings (Su et al. 2021, arXiv 2104.09864), as model.py and gemma4.py use them.

A head's dimensions form H/2 pairs (i, i + H/2: the HF "rotate_half" layout); pair j turns by the angle
position · f_j, with f_j = theta^(-2j/H) and a checkpoint's scaling rule on top:

    default       f_j = theta^(-2j/H)
    linear        f_j / factor                                              (Gemma 3 4B's global layers)
    llama3        low frequencies stretched by factor, high ones kept, a blend between   (Llama 3.1 / 3.2)
    proportional  the first fraction of the pairs as default, the others 0 (not rotated) (Gemma 4's global layers)

Angles, cos and sin are float32 whatever the compute dtype (bf16 angles are already wrong at position 256).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Rope(NamedTuple):
    cos: jax.Array  # [B, T, H/2] float32
    sin: jax.Array  # [B, T, H/2]


def rope_inv_freq(cfg, theta: float, scaled: bool) -> jax.Array:
    """Inverse frequencies [H/2] of one RoPE table (model.Config cfg), with the checkpoint's scaling rule."""
    inv = 1.0 / theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim)
    if not scaled or cfg.rope_scaling is None:
        return inv
    if cfg.rope_scaling == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_scaling == "llama3":  # Llama 3.1: stretch low frequencies, keep high, blend between
        wavelen = 2 * math.pi / inv
        low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
        smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * inv / cfg.rope_factor + smooth * inv
        return jnp.where(wavelen > low_wavelen, inv / cfg.rope_factor, jnp.where(wavelen < high_wavelen, inv, blended))
    raise ValueError(f"unknown rope_scaling {cfg.rope_scaling!r}")


def proportional_inv_freq(theta: float, head_dim: int, fraction: float) -> jax.Array:
    """Gemma 4's global layers (transformers' "proportional" RoPE): [H/2] frequencies of which the first
    int(fraction · H/2) are theta^(-2j/H), over the whole head dim H, and the rest 0: cos 1, sin 0, those pairs
    pass unrotated (no position information in them)."""
    rotated = int(fraction * head_dim // 2)
    inv = 1.0 / theta ** (jnp.arange(0, 2 * rotated, 2, dtype=jnp.float32) / head_dim)
    return jnp.concatenate([inv, jnp.zeros(head_dim // 2 - rotated, jnp.float32)])


def rope_table(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, H/2] in float32 (bf16 angles are already wrong at position 256)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + H/2) of x [B, T, N, H] (the HF "rotate_half" layout)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
