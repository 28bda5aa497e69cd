"""int8head.py — the int8 output head: the float head's next-token ids from a quarter of its bytes.

A performance seam, out of sample.py's teaching path: `sample.generate` calls `pays` and
`next_token` here when decoding at <= 4 rows, and nothing else depends on it.

At batch 1 a decode step reads every weight once, and Gemma 3 270M's 262k x 640 output head is
63% of them. Greedy and Gumbel-max ids need only the largest logit, so we read the head as int8
rows (a quarter of the bytes) and prove which tokens can still win: with x~ the quantized input
and E~_v the int8 row, |x.E_v - x~.E~_v| <= |x - x~| |E_v| + |x~| |E_v - E~_v| (Cauchy-Schwarz,
per row). Only the tokens whose upper bound reaches the best lower bound are scored exactly, on
their float rows; when they fill more than CANDIDATE_BLOCKS blocks, the step uses the full head.
The ids are those of the float head (up to exact ties within float32 rounding, which any two
matmul kernels may break differently).

Building the int8 copy reads the whole head (~2 s on Gemma 3 270M), so `cached` keeps the one of
the last head decoded, while that head array lives: the only state in this module.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adapters import quantize
from model import Transformer, softcap

BLOCK, CANDIDATE_BLOCKS = 64, 16  # ids scored exactly: 16 blocks of 64 per row; more possible winners: full head
MIN_SIZE = 1 << 24  # V x D from which the int8 head pays (Gemma 3 270M: 168M)
MAX_ROWS = 4  # beyond this batch the float head's matmul is as fast (benchmarks/RESULTS.md)


class Int8Head(NamedTuple):
    rotation: jax.Array  # [D, D] float32, a random orthogonal R: x.E_v = (x R).(E_v R)
    codes: jax.Array  # [V, D] int8, round(E R / scale)
    scale: jax.Array  # [V] float32, a rotated row's absmax / 127
    norm: jax.Array  # [V] float32, |E_v R|
    err: jax.Array  # [V] float32, |E_v R - scale_v codes_v|


def build(table) -> Int8Head:
    """An output head [V, D] as int8 rows with one scale each, and the norms that bound its error.
    The rows are rotated first: a random rotation spreads a row's few large entries over all D,
    which halves Gemma 3's int8 rounding error (the error scales with a row's absmax)."""
    D = table.shape[1]
    rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((D, D)))[0].astype(np.float32)
    return _int8_table(table, jnp.asarray(rotation))


def _int8_rows(x):
    """x [N, D] → int8 codes [N, D] and scales [N, 1], one per row: adapters.quantize with a block of D."""
    codes, scales = quantize(x, "int8", block=x.shape[-1])
    return codes[:, 0], scales


@jax.jit
def _int8_table(table, rotation) -> Int8Head:
    table = jnp.dot(table.astype(jnp.float32), rotation, precision="highest")
    codes, scale = _int8_rows(table)
    err = jnp.linalg.norm(table - codes * scale, axis=1)
    return Int8Head(rotation, codes, scale[:, 0], jnp.linalg.norm(table, axis=1), err)


def candidates(model: Transformer, x, head8: Int8Head, noise, temperature: float):
    """For x [B, D] (final-normed) and noise [B, V] (Gumbel, or zeros when greedy): ids cand [B, K]
    that hold every token whose score softcap(x.E_v) / temperature + noise_v can be the highest,
    provided `fits` is true (else more blocks than CANDIDATE_BLOCKS could win)."""
    V = head8.codes.shape[0]
    x_rot = jnp.dot(x.astype(jnp.float32), head8.rotation, precision="highest")
    q1, s1 = _int8_rows(x_rot)
    q2, s2 = _int8_rows(x_rot - q1 * s1)  # x's own rounding error: a second int8 pass
    dots = jnp.einsum("VD,RD->RV", head8.codes, jnp.concatenate([q1, q2]), preferred_element_type=jnp.int32)
    x_q = q1 * s1 + q2 * s2  # what the int8 pass multiplied
    B = x.shape[0]
    approx = (dots[:B] * s1 + dots[B:] * s2) * head8.scale  # [B, V]; the int32 dots are exact
    x_err, x_norm = jnp.linalg.norm(x_rot - x_q, axis=-1, keepdims=True), jnp.linalg.norm(x_q, axis=-1, keepdims=True)
    # the Cauchy-Schwarz bound, widened for float32 rounding (of the rotation, and of the float
    # logits themselves: at most D 2^-24 |x| |E_v|, 4e-5 of it at D = 640)
    bound = 1.001 * (x_err * head8.norm + x_norm * head8.err) + 1e-4 * x_norm * head8.norm
    score = lambda logits: softcap(logits, model.cfg.final_softcap) / (temperature or 1.0) + noise
    upper, lower = score(approx + bound), score(approx - bound)  # softcap is monotone
    # Blocks of BLOCK consecutive ids that hold a possible winner, listed in order by a running
    # count (a top-k over the V ids would be a full sort inside XLA's CPU loop).
    blocks = -(-V // BLOCK)
    block_upper = jnp.pad(upper, ((0, 0), (0, blocks * BLOCK - V)), constant_values=-jnp.inf)
    hit = jnp.max(block_upper.reshape(B, blocks, BLOCK), axis=-1) >= jnp.max(lower, axis=-1, keepdims=True)
    slot = jnp.where(hit, jnp.cumsum(hit, axis=-1) - 1, CANDIDATE_BLOCKS)  # [B, blocks]; misses: a spare slot
    found = jnp.zeros((B, CANDIDATE_BLOCKS + 1), jnp.int32).at[jnp.arange(B)[:, None], slot].set(
        jnp.arange(blocks, dtype=jnp.int32), mode="drop")[:, :CANDIDATE_BLOCKS]  # unused slots: block 0
    fits = jnp.all(jnp.sum(hit, axis=-1) <= CANDIDATE_BLOCKS)
    return jnp.minimum(found[:, :, None] * BLOCK + jnp.arange(BLOCK), V - 1).reshape(B, -1), fits


def next_token(model: Transformer, x, head8: Int8Head, key, temperature: float):
    """The ids [B] that next_token draws from the logits of x [B, D] (argmax, or Gumbel-max at
    temperature > 0; top-k/top-p off), from exact scores of `candidates`' ids (or, when they do
    not fit, of the full head)."""
    V = head8.codes.shape[0]
    noise = jnp.zeros((x.shape[0], V)) if temperature == 0 else jax.random.gumbel(key, (x.shape[0], V))
    cand, fits = candidates(model, x, head8, noise, temperature)

    def exact(_):
        logits = jnp.einsum("BKD,BD->BK", model.head()[cand], x, preferred_element_type=jnp.float32)
        s = softcap(logits, model.cfg.final_softcap) / (temperature or 1.0) + jnp.take_along_axis(noise, cand, -1)
        return jnp.take_along_axis(cand, jnp.argmax(s, axis=-1)[:, None], axis=-1)[:, 0]  # ids ascend: ties, lowest

    def full(_):  # what sample.next_token computes (argmax: ties, the lowest id)
        return jnp.argmax(model.logits(x[:, None])[:, 0] / (temperature or 1.0) + noise, axis=-1)
    return jax.lax.cond(fits, exact, full, None).astype(jnp.int32)


_cache: dict = {}  # the int8 head of the last model decoded, while its head array lives


def _head_array(model: Transformer):
    """The output head's stored array, or None when it is stored quantized (dequantized per call)."""
    head = getattr(model, "embed" if model.cfg.tie_embeddings else "lm_head", None)
    return head[...] if isinstance(head, nnx.Param) else None


def cached(model: Transformer) -> Int8Head:
    """`build` of the model's output head, once per head array (quantizing reads all of it)."""
    array = _head_array(model)
    hit = _cache.get("head")
    if array is not None and hit is not None and hit[0]() is array:
        return hit[1]
    head8 = build(model.head())
    _cache.clear()
    if array is not None:  # a quantized head is dequantized afresh each call: nothing to key on
        _cache["head"] = (weakref.ref(array, lambda _: _cache.clear()), head8)
    return head8


def pays(model: Transformer, rows: int) -> bool:
    """Whether decoding `rows` rows reads fewer bytes this way: a large float head, at most MAX_ROWS rows."""
    return rows <= MAX_ROWS and model.cfg.vocab_size * model.cfg.dim >= MIN_SIZE and _head_array(model) is not None
