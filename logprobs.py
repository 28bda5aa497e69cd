"""logprobs.py — what learners read off the output head, a chunk of positions at a time.

Every learner needs a few numbers of the next-token distribution at each position: the log-prob
of the token that came next (sft, lora, dpo, grpo), the entropy (grpo), a divergence from a
teacher's distribution (distill). Made from whole logits [B, T, V] in float32 they cost B·T·V·4
bytes per tensor, and autodiff keeps several (the logits, the log-softmax, its gradient): at
Gemma's 262,144-token vocabulary, 4 × 128 positions are 0.5 GiB each.

Here the B·T positions go through the head [V, D] in chunks of at most `CHUNK_BYTES` of float32
logits. `per_position` makes one chunk's logits, reduces them with the caller's function to a few
numbers per position, and drops them; under `jax.grad` the chunk is made again in the backward
pass (jax.checkpoint) instead of being kept, so the vocabulary's share of the peak is a few
chunks whatever B·T is. The gradient of the head is summed over chunks inside the backward scan.
The numbers equal the unchunked computation's (tests/test_logprobs.py, 1e-5); with a single chunk
nothing is recomputed and the program is the plain one.

Cut Your Losses (Wijmans et al. 2024, arXiv 2411.09009) goes further and also blocks the vocabulary
inside a fused kernel; on CPU the position chunks already leave the head's matmuls large.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

CHUNK_BYTES = 64 << 20  # float32 logits made at once: 64 positions of a 262k vocabulary, 512 of a 32k one
MIN_ROWS, MAX_ROWS = 256, 1024  # weighted_nll: fewest rows a chunk of whole vocabulary rows has; most with blocks


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def chunk_rows(n_rows: int, vocab: int, chunk_bytes: int | None = None) -> tuple[int, int]:
    """(chunks, rows per chunk) covering n_rows with at most chunk_bytes (default CHUNK_BYTES) of float32
    logits per chunk (at least 8 rows), rows spread evenly so the padding is under one row per chunk."""
    most = max(8, (chunk_bytes or CHUNK_BYTES) // (4 * vocab))
    chunks = max(1, math.ceil(n_rows / most))
    return chunks, math.ceil(n_rows / chunks)


def flat_rows(a: jax.Array, lead: int, rows: int) -> jax.Array:
    """a [*lead axes, ...] → [rows, ...]: the positions along one axis, zero rows after them as padding."""
    flat = a.reshape(-1, *a.shape[lead:])
    return jnp.pad(flat, [(0, rows - flat.shape[0])] + [(0, 0)] * (flat.ndim - 1))


def per_position(fn, x: jax.Array, head: jax.Array, *rows: jax.Array, cap: float | None = None,
                 chunk_bytes: int | None = None):
    """fn(logits [c, V] float32, *row chunks [c, ...]) → arrays [c, ...] (a tuple, or a dict by name), applied
    to every position of x [..., D] (hidden states after the final norm) and the per-position arrays `rows`
    [..., ...] (targets, a teacher's numbers), chunk by chunk. logits = softcap(x · headᵀ, cap), with
    float32 accumulation whatever x's dtype. Returns fn's outputs shaped [..., ...]."""
    lead, V = x.shape[:-1], head.shape[0]
    n = math.prod(lead)
    flat = [a.reshape(n, *a.shape[len(lead):]) for a in (x, *rows)]

    def chunk(x_c, *rows_c):  # the head is cast here, so its gradient comes back in its own dtype
        logits = jnp.einsum("RD,VD->RV", x_c, head.astype(x_c.dtype), preferred_element_type=jnp.float32)
        out = fn(softcap(logits, cap), *rows_c)
        return out if isinstance(out, dict) else tuple(out)

    chunks, size = chunk_rows(n, V, chunk_bytes)
    if chunks == 1:
        outs = chunk(*flat)
    else:  # [chunks, size, ...], zero rows as padding; a scan keeps one chunk's logits alive at a time
        padded = [jnp.pad(a, [(0, chunks * size - n)] + [(0, 0)] * (a.ndim - 1)).reshape(chunks, size, *a.shape[1:])
                  for a in flat]
        outs = jax.lax.map(lambda args: jax.checkpoint(chunk)(*args), tuple(padded))
        outs = jax.tree.map(lambda o: o.reshape(chunks * size, *o.shape[2:])[:n], outs)
    return jax.tree.map(lambda o: o.reshape(*lead, *o.shape[1:]), outs)


def summed_terms(fn, x: jax.Array, head: jax.Array, weights: jax.Array, coefficients: dict, *rows: jax.Array,
                 cap: float | None = None, chunk_bytes: int | None = None):
    """A loss that is a weighted sum of per-position terms, its gradient taken inside the forward pass: fn(logits
    [c, V] float32, *row chunks) → {name: term [c]} at every position of x [..., D] (as per_position), and
    → (loss, sums): sums[name] = Σ weights · term over the positions (weights [...]: the loss mask), loss =
    Σ coefficients[name] · sums[name]. Each chunk's logits are made once: its terms and d loss / d logits come
    from one jax.vjp of fn there, then d x and d head (three matmuls with the head, none in the backward pass,
    as weighted_nll; per_position under jax.grad makes them twice). Only loss carries a gradient: sums are
    what is logged (their cotangents are dropped), and a term whose coefficient is a constant 0 is only logged
    (its gradient is not made). Same values and gradients as the per_position sums."""
    lead = x.shape[:-1]
    n = math.prod(lead)
    chunks, size = chunk_rows(n, head.shape[0], chunk_bytes)
    flat = [flat_rows(a, len(lead), chunks * size).reshape(chunks, size, *a.shape[len(lead):])
            for a in (x, weights, *rows)]  # [chunks, size, ...]
    live = {k: c for k, c in coefficients.items() if not (isinstance(c, (int, float)) and c == 0)}  # differentiated

    def forward(x, head, grads: tuple[bool, bool], weights, *rows):  # grads: (d x, d head) wanted
        def chunk(d_head, inputs):
            x_c, weight, *rows_c = inputs  # [c, D], [c], [c, ...]
            logits_of = lambda x_c, head: softcap(jnp.einsum(  # noqa: E731
                "RD,VD->RV", x_c, head.astype(x_c.dtype), preferred_element_type=jnp.float32), cap)

            def weighted(z):  # the chunk's share of loss, and of sums
                terms = fn(z, *rows_c)
                sums = {k: jnp.sum(jnp.where(weight != 0, weight * t, 0.0)) for k, t in terms.items()}  # padding: 0
                return sum((c * sums[k] for k, c in live.items()), jnp.zeros((), jnp.float32)), sums
            if not grads[0]:  # evaluation: the terms alone
                return d_head, (*weighted(logits_of(x_c, head)), None)
            z, head_vjp = jax.vjp(logits_of, x_c, head) if grads[1] else jax.vjp(lambda x_c: logits_of(x_c, head), x_c)
            loss, z_vjp, sums = jax.vjp(weighted, z, has_aux=True)
            d = head_vjp(z_vjp(jnp.ones_like(loss))[0])  # (d x_c,) or (d x_c, d head)
            return (d_head + d[1] if grads[1] else d_head), (loss, sums, d[0])
        d_head = jnp.zeros(head.shape, jnp.float32) if grads[1] else None
        if chunks == 1:  # no loop around a single chunk
            d_head, (loss, sums, d_x) = chunk(d_head, [a[0] for a in (x, weights, *rows)])
            d_x = None if d_x is None else d_x[None]
        else:
            d_head, (losses, sums, d_x) = jax.lax.scan(chunk, d_head, (x, weights, *rows))  # d_x [chunks, size, D]
            loss, sums = jnp.sum(losses), jax.tree.map(jnp.sum, sums)
        return (loss, sums), (d_x, None if d_head is None else d_head.astype(head.dtype))

    @jax.custom_vjp
    def fused(x, head, *rest):
        return forward(x, head, (False, False), *rest)[0]

    def fused_fwd(x, head, *rest):  # symbolic zeros: head.perturbed says if it trains (LoRA's head does not)
        out, grads = forward(x.value, head.value, (True, head.perturbed), *(r.value for r in rest))
        return out, grads

    def fused_bwd(grads, cotangents):
        g = cotangents[0]
        g = jnp.zeros((), jnp.float32) if isinstance(g, SymbolicZero) else g
        d_x, d_head = grads
        scaled = lambda d: None if d is None else (g * d).astype(d.dtype)  # noqa: E731
        return (scaled(d_x), scaled(d_head)) + (None,) * (1 + len(rows))

    fused.defvjp(fused_fwd, fused_bwd, symbolic_zeros=True)
    return fused(flat[0], head, *flat[1:])


def token_logps(x: jax.Array, head: jax.Array, targets: jax.Array, *, cap: float | None = None,
                temperature: float = 1.0, entropy: bool = False, chunk_bytes: int | None = None):
    """log π(target) [...] at each position of x [..., D], π = softmax(softcap(x · headᵀ) / temperature),
    and with `entropy` also H(π) [...]; targets [...] int. The log-softmax is written out (max-shifted,
    as jax.nn.log_softmax) so the numbers are the unchunked ones bit for bit. Past a vocabulary whose
    MIN_ROWS rows overflow a chunk (Llama 3's, Qwen's, Gemma's) the head runs in tiles of up to MAX_ROWS rows
    and a block of the vocabulary (nll_tiles; blocked_logps), equal to 1e-5."""
    lead = x.shape[:-1]
    n = math.prod(lead)
    chunks, rows, blocks = nll_tiles(n, head.shape[0], chunk_bytes)
    if blocks > 1:
        out = blocked_logps(flat_rows(x, len(lead), chunks * rows), head, flat_rows(targets, len(lead), chunks * rows),
                            cap, temperature, (chunks, blocks))
        out = tuple(o[:n].reshape(lead) for o in out)
        return out if entropy else out[0]

    def fn(logits, target):  # [c, V], [c]
        logits = logits if temperature == 1.0 else logits / temperature
        shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        logp_all = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))  # [c, V]
        logp = jnp.take_along_axis(logp_all, target[:, None], axis=-1)[:, 0]
        return (logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)) if entropy else (logp,)
    out = per_position(fn, x, head, targets, cap=cap, chunk_bytes=chunk_bytes)
    return out if entropy else out[0]


def nll_tiles(n_rows: int, vocab: int, chunk_bytes: int | None = None) -> tuple[int, int, int]:
    """How weighted_nll cuts n_rows x vocab logits into tiles of at most chunk_bytes (default CHUNK_BYTES):
    (row chunks, rows per chunk, vocabulary blocks). Whole vocabulary rows while a chunk still holds
    MIN_ROWS of them; past that (Gemma's 262k vocabulary) blocks of the vocabulary beside up to
    MAX_ROWS rows: a matmul with a few dozen rows against the whole head runs at a third of the speed."""
    budget = (chunk_bytes or CHUNK_BYTES) // 4
    if n_rows * vocab <= budget or vocab * MIN_ROWS <= budget:
        chunks, rows = chunk_rows(n_rows, vocab, chunk_bytes)
        return chunks, rows, 1
    chunks = math.ceil(n_rows / MAX_ROWS)
    rows = math.ceil(n_rows / chunks)
    return chunks, rows, math.ceil(vocab / max(1, budget // rows))


def weighted_nll(x: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, *, cap: float | None = None,
                 chunk_bytes: int | None = None) -> jax.Array:
    """Σ weights · (−log π(target)) over the positions of x [..., D], π = softmax(softcap(x · headᵀ)): the
    supervised loss (weights: the loss mask). Same value and gradients as
    −Σ weights · token_logps(x, head, targets). With more than one tile (nll_tiles) the gradient is taken
    inside the forward pass (Liger's fused linear cross-entropy): three matmuls with the head when
    whole vocabulary rows fit a chunk; with vocabulary blocks, a first pass finds each position's
    log-sum-exp and a second makes the gradients (four, as Cut Your Losses does)."""
    lead = x.shape[:-1]
    n = math.prod(lead)
    chunks, rows, blocks = nll_tiles(n, head.shape[0], chunk_bytes)
    if chunks == blocks == 1:  # the plain program (autodiff keeps this one chunk's logits)
        return -jnp.sum(weights * token_logps(x, head, targets, cap=cap, chunk_bytes=chunk_bytes))
    pad = lambda a: flat_rows(a, len(lead), chunks * rows)  # noqa: E731
    return _fused_nll(pad(x), head, pad(targets), pad(weights), cap, (chunks, blocks))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_nll(x, head, targets, weights, cap, tiles):  # x [n, D] etc., n = chunks · rows, padding has weight 0
    return _nll_and_gradients(x, head, targets, weights, cap, tiles, want_head=False)[0]


def _nll_and_gradients(x, head, targets, weights, cap, tiles, want_head: bool):
    """A scan over row chunks: the loss, d loss / dx per position, d loss / d head summed over chunks (when
    want_head), and d loss / d weights = the positions' NLL. Each chunk: `whole_rows` or `vocab_blocks`."""
    chunks, blocks = tiles
    n, D = x.shape
    by_chunk = lambda a: a.reshape(chunks, n // chunks, *a.shape[1:])  # noqa: E731
    per_chunk = whole_rows if blocks == 1 else functools.partial(vocab_blocks, blocks=blocks)

    def chunk(d_head, rows):
        x_c, target, weight = rows  # [c, D], [c], [c]
        nll, d_x, d_head_c = per_chunk(x_c, head, target, weight, cap, want_head)
        return (d_head + d_head_c if want_head else None), (jnp.sum(weight * nll), d_x, nll)

    d_head = jnp.zeros(head.shape, jnp.float32) if want_head else None
    d_head, (losses, d_x, nll) = jax.lax.scan(chunk, d_head, (by_chunk(x), by_chunk(targets), by_chunk(weights)))
    return jnp.sum(losses), (d_x.reshape(n, D), None if d_head is None else d_head.astype(head.dtype), nll.reshape(n))


def whole_rows(x_c, head, target, weight, cap, want_head):
    """One chunk of rows against the whole vocabulary: logits [c, V] once, the NLL and its gradients."""
    head = head.astype(x_c.dtype)
    z = softcap(jnp.einsum("RD,VD->RV", x_c, head, preferred_element_type=jnp.float32), cap)  # [c, V]
    shifted = z - jnp.max(z, axis=-1, keepdims=True)
    exps = jnp.exp(shifted)
    sum_exp = jnp.sum(exps, axis=-1)
    nll = jnp.log(sum_exp) - jnp.take_along_axis(shifted, target[:, None], axis=-1)[:, 0]  # [c]
    d_s = _d_logits(z, exps / sum_exp[:, None], jnp.arange(head.shape[0]) == target[:, None], weight, cap)
    d_x = jnp.einsum("RV,VD->RD", d_s.astype(x_c.dtype), head, preferred_element_type=jnp.float32)
    d_head = jnp.einsum("RV,RD->VD", d_s.astype(x_c.dtype), x_c, preferred_element_type=jnp.float32) \
        if want_head else None
    return nll, d_x.astype(x_c.dtype), d_head


def vocab_blocks(x_c, head, target, weight, cap, want_head, blocks: int):
    """One chunk of rows against the vocabulary in `blocks` blocks of Vb columns (block b starts at
    min(b·Vb, V − Vb); columns an earlier block covered are masked): pass 1 keeps a running max and
    sum of exponentials per row (the log-sum-exp) and picks up the target's logit; pass 2 makes each
    block's logits again and its gradients, writing the head's gradient block by block."""
    V, c = head.shape[0], x_c.shape[0]
    width = math.ceil(V / blocks)
    columns = jnp.arange(width)

    def log_sum_exp(carry, b):
        top, total, target_z = carry  # [c] each
        _, z, own, start = block_logits(x_c, head, b, width, cap)
        z = jnp.where(own, z, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(z, axis=-1))
        total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(z - new_top[:, None]), axis=-1)
        here = jnp.take_along_axis(z, jnp.clip(target - start, 0, width - 1)[:, None], axis=-1)[:, 0]
        target_z = jnp.where((target >= start) & (target < start + width) & (target >= b * width), here, target_z)
        return (new_top, total, target_z), None

    start = (jnp.full((c,), -jnp.inf), jnp.zeros((c,)), jnp.zeros((c,)))
    (top, total, target_z), _ = jax.lax.scan(log_sum_exp, start, jnp.arange(blocks))
    lse = top + jnp.log(total)

    def gradients(carry, b):
        head_b, z, own, start = block_logits(x_c, head, b, width, cap)
        p = jnp.where(own, jnp.exp(z - lse[:, None]), 0.0)
        d_s = _d_logits(z, p, (start + columns == target[:, None]) & own, weight, cap)
        return block_gradients(carry, d_s.astype(x_c.dtype), head_b, x_c, start, want_head), None

    d_head = jnp.zeros(head.shape, jnp.float32) if want_head else None
    (d_head, d_x), _ = jax.lax.scan(gradients, (d_head, jnp.zeros(x_c.shape, jnp.float32)), jnp.arange(blocks))
    return lse - target_z, d_x.astype(x_c.dtype), d_head


def block_logits(x_c, head, b, width: int, cap):
    """Vocabulary block b of width columns, starting at min(b·width, V − width) (the last overlaps the one before
    it): its head rows, softcap(x_c · head_bᵀ) [c, width] float32, which columns are its own, its first column."""
    start = jnp.minimum(b * width, head.shape[0] - width)
    head_b = jax.lax.dynamic_slice_in_dim(head, start, width).astype(x_c.dtype)
    z = softcap(jnp.einsum("RD,VD->RV", x_c, head_b, preferred_element_type=jnp.float32), cap)
    return head_b, z, start + jnp.arange(width) >= b * width, start


def block_gradients(carry, d_s, head_b, x_c, start, want_head: bool):
    """(d head, d x) after vocabulary block `start`'s share: d x += d_s · head_b and, when the head trains, its rows
    start.. += d_sᵀ · x_c (rows an earlier block already wrote get zeros added). d_s [c, Vb] in x_c's dtype."""
    d_head, d_x = carry
    d_x = d_x + jnp.einsum("RV,VD->RD", d_s, head_b, preferred_element_type=jnp.float32)
    if want_head:
        grad = jnp.einsum("RV,RD->VD", d_s, x_c, preferred_element_type=jnp.float32)
        d_head = jax.lax.dynamic_update_slice_in_dim(
            d_head, jax.lax.dynamic_slice_in_dim(d_head, start, head_b.shape[0]) + grad, start, 0)
    return d_head, d_x


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def blocked_logps(x, head, targets, cap, temperature, tiles):
    """token_logps in tiles: x [n, D], targets [n], n = chunks · rows → log π(target), H(π) [n]. The forward
    pass keeps per row a running max, Σ exp and Σ exp · u over the blocks (u = logits / τ); the backward pass
    makes each block's logits again (as per_position's backward makes each chunk's)."""
    return _blocked_forward(x, head, targets, cap, temperature, tiles)[0]


def _blocked_forward(x, head, targets, cap, temperature, tiles):
    chunks, blocks = tiles
    width = math.ceil(head.shape[0] / blocks)

    def chunk(_, rows):
        x_c, target = rows  # [c, D], [c]

        def block(carry, b):
            top, total, weighted, target_u = carry  # [c]: max u, Σ exp(u − top), Σ exp(u − top) · u, u_target
            _, z, own, start = block_logits(x_c, head, b, width, cap)
            u = jnp.where(own, z / temperature, -jnp.inf)
            new_top = jnp.maximum(top, jnp.max(u, axis=-1))
            scale, e = jnp.exp(top - new_top), jnp.exp(u - new_top[:, None])
            here = jnp.take_along_axis(u, jnp.clip(target - start, 0, width - 1)[:, None], axis=-1)[:, 0]
            mine = (target >= b * width) & (target < start + width)  # the target is one of its own columns
            return (new_top, total * scale + jnp.sum(e, -1), weighted * scale + jnp.sum(jnp.where(own, e * u, 0.0), -1),
                    jnp.where(mine, here, target_u)), None
        c = x_c.shape[0]
        init = (jnp.full((c,), -jnp.inf), jnp.zeros((c,)), jnp.zeros((c,)), jnp.zeros((c,)))
        (top, total, weighted, target_u), _ = jax.lax.scan(block, init, jnp.arange(blocks))
        lse, mean_u = top + jnp.log(total), weighted / total
        return None, (target_u - lse, lse - mean_u, lse, mean_u)
    by_chunk = lambda a: a.reshape(chunks, -1, *a.shape[1:])  # noqa: E731
    _, (logp, entropy, lse, mean_u) = jax.lax.scan(chunk, None, (by_chunk(x), by_chunk(targets)))
    return (logp.reshape(-1), entropy.reshape(-1)), (lse.reshape(-1), mean_u.reshape(-1))


def _blocked_fwd(x, head, targets, cap, temperature, tiles):
    out, (lse, mean_u) = _blocked_forward(x.value, head.value, targets.value, cap, temperature, tiles)
    trains = jnp.zeros(()) if head.perturbed else None  # (a residual's tree says it, not a Python bool)
    return out, (x.value, head.value, targets.value, lse, mean_u, trains)


def _blocked_bwd(cap, temperature, tiles, residuals, cotangents):
    """d u = g_logp · (one-hot − π) − g_H · π · (u − E_π[u]), then through / τ and the soft-cap to the
    head's matmul: d x and (when the head trains) d head, block by block."""
    x, head, targets, lse, mean_u, trains = residuals
    want_head = trains is not None
    g_logp, g_h = (jnp.zeros(lse.shape) if isinstance(g, SymbolicZero) else g for g in cotangents)
    chunks, blocks = tiles
    width = math.ceil(head.shape[0] / blocks)

    def chunk(d_head, rows):
        x_c, target, lse_c, mean_c, g_lp, g_ent = rows

        def block(carry, b):
            head_b, z, own, start = block_logits(x_c, head, b, width, cap)
            u = z / temperature
            p = jnp.where(own, jnp.exp(u - lse_c[:, None]), 0.0)
            is_target = (start + jnp.arange(width) == target[:, None]) & own
            d_u = g_lp[:, None] * (is_target.astype(jnp.float32) - p) - g_ent[:, None] * p * (u - mean_c[:, None])
            d_s = d_u / temperature if cap is None else d_u / temperature * (1 - (z / cap) ** 2)
            return block_gradients(carry, d_s.astype(x_c.dtype), head_b, x_c, start, want_head), None
        (d_head, d_x), _ = jax.lax.scan(block, (d_head, jnp.zeros(x_c.shape, jnp.float32)), jnp.arange(blocks))
        return d_head, d_x.astype(x_c.dtype)
    by_chunk = lambda a: a.reshape(chunks, -1, *a.shape[1:])  # noqa: E731
    d_head = jnp.zeros(head.shape, jnp.float32) if want_head else None
    d_head, d_x = jax.lax.scan(chunk, d_head, tuple(map(by_chunk, (x, targets, lse, mean_u, g_logp, g_h))))
    return d_x.reshape(x.shape), None if d_head is None else d_head.astype(head.dtype), None


blocked_logps.defvjp(_blocked_fwd, _blocked_bwd, symbolic_zeros=True)


def _d_logits(z, p, is_target, weight, cap):
    """d (weight · NLL) / d s for the pre-cap logits s: weight (p − one-hot), times dz/ds = 1 − (z / cap)²
    through the soft-cap z = cap · tanh(s / cap). z, p, is_target [c, V]; weight [c]."""
    d_z = weight[:, None] * (p - is_target)
    return d_z if cap is None else d_z * (1 - (z / cap) ** 2)


def _fused_nll_fwd(x, head, targets, weights, cap, tiles):  # symbolic zeros: head.perturbed says if it trains
    return _nll_and_gradients(x.value, head.value, targets.value, weights.value, cap, tiles, head.perturbed)


def _fused_nll_bwd(cap, tiles, residuals, g):
    d_x, d_head, nll = residuals
    if isinstance(g, SymbolicZero):
        g = jnp.zeros((), d_x.dtype)
    return g * d_x, None if d_head is None else g * d_head, None, g * nll


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd, symbolic_zeros=True)
