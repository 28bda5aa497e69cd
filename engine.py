"""engine.py — continuous batching: S slots decode together, and a slot whose request ends takes the next one.

sample.generate decodes a fixed batch until its longest row ends, so with skewed lengths (most answers stop
early, a few run to the limit) most rows idle. Here every slot is its own sequence: its KV-cache row with
its own write index, RoPE position, done flag, sampling settings (temperature, top-p), random key and output
buffer. The loop, as vLLM's and SGLang's schedulers run it:

    host:   waiting prompts → free slots (prefill each distinct prompt once, its keys and values written
            into every slot that asked for it: a GRPO group's prompt runs once for the group)
    device: up to `chunk` decode steps for every slot at once (a while_loop that returns early when a slot
            finishes while requests wait, so the slot is refilled at once)
    host:   read each slot's new ids (a server streams them), free the finished slots, repeat

Randomness is per request, not per batch: token t of request r is drawn with fold_in(fold_in(key(seed), r), t),
so what a request gets does not depend on its slot, the slot count, or what else is decoding. Greedy ids equal
sample.generate's (the same model call, one row at a time of it). Shapes are fixed, so compiles are few: one
decode chunk per engine, one prefill per (rows, prompt length) bucket, both powers of two.

    engine = Engine(model, slots=8, max_new_tokens=128, eos_ids=eos)
    outs = engine.generate(prompts, temperature=1.0, seed=0)          # as sample.generate
    rid = engine.add(prompt, max_new_tokens=64)                       # or drive it: a server
    for update in engine.step(): ...                                  # (rid, new ids, new log-probs, done)
"""
from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import MIN_PROMPT_BUCKET, left_pad
from model import KVCache, Transformer, unstack_layers
import sample
from sample import filter_logits, first_argmax


class Slots(NamedTuple):
    """Every slot's state on the device (S slots, cache length C, N = the most new tokens of any request)."""
    cache: KVCache  # per layer [S, C, K, H]; segment_ids [S, C] (0: empty); index [S], each row's next column
    last: jax.Array  # [S] int32, the id fed next
    positions: jax.Array  # [S] int32, its RoPE position
    count: jax.Array  # [S] int32, ids made so far
    limit: jax.Array  # [S] int32, the request's most new tokens
    done: jax.Array  # [S] bool: finished, or free
    keys: jax.Array  # [S] the request's random key
    temperature: jax.Array  # [S] float32, 0: greedy
    top_p: jax.Array  # [S] float32, 1: no nucleus cut
    ids: jax.Array  # [S, N] int32, -1 after the request's last id
    logprobs: jax.Array  # [S, N] float32, each id's log-probability under softmax(logits / temperature)


class Update(NamedTuple):
    request: int  # what add() returned
    ids: list[int]  # the ids made since the last update
    logprobs: list[float]
    done: bool  # the request ended (an end id, or its max_new_tokens): its slot is free


def pick(logits, keys, count, temperature, top_p, top_k: int):
    """Each row's next id from logits [S, V], as sample.next_token does for a batch, but with each row's own
    temperature, top-p and key (the request's, folded with the token's number `count`). Returns ids, log-probs."""
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    logprobs = jax.nn.log_softmax(logits / t, axis=-1)

    def sampled():
        x = jax.lax.cond(jnp.any(top_p < 1), lambda: filter_logits(logits, t, top_k, top_p[:, None]),
                         lambda: filter_logits(logits, t, top_k, 1.0))  # the nucleus's sort only when asked for
        noise = jax.vmap(lambda k, c: jax.random.gumbel(jax.random.fold_in(k, c), x.shape[1:], x.dtype))(keys, count)
        return jnp.where(temperature > 0, first_argmax(x + noise), first_argmax(logits))

    ids = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: first_argmax(logits)).astype(jnp.int32)
    return ids, jnp.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "top_k", "span"), donate_argnums=(3,))
def decode_chunk(graphdef, state, layers, slots: Slots, eos_ids, return_early, *, chunk: int, top_k: int,
                 span: int) -> Slots:
    """Up to `chunk` decode steps of every slot; returns early when a slot finishes and `return_early` (requests
    wait for it). Finished and free slots run too (the shapes are fixed) but write nothing that is read. Only
    the cache's first `span` columns (every running slot's, and room for the chunk) are attended: a step reads
    what the requests hold, not the longest one the cache could."""
    model = nnx.merge(graphdef, state)
    S, N = slots.ids.shape
    done_before, full = slots.done, slots.cache
    window = lambda x: x[:, :span]  # noqa: E731
    slots = slots._replace(cache=KVCache(jax.tree.map(window, full.k), jax.tree.map(window, full.v),
                                         window(full.segment_ids), full.index))

    def one(carry):
        i, s = carry
        h, cache = model(s.last[:, None], positions=s.positions[:, None], segment_ids=jnp.ones((S, 1), jnp.int32),
                         cache=s.cache, layers=layers, last=1)  # [S, 1, V]
        ids, lp = pick(h[:, 0], s.keys, s.count, s.temperature, s.top_p, top_k)
        live = ~s.done
        column = jnp.where(live, s.count, N)  # N: out of bounds, dropped
        count = s.count + live
        done = s.done | (live & (jnp.isin(ids, eos_ids) | (count >= s.limit)))
        cache = cache._replace(index=jnp.where(live, cache.index, s.cache.index))  # a finished row stays full
        return i + 1, Slots(cache, jnp.where(live, ids, s.last), s.positions + live, count, s.limit, done, s.keys,
                            s.temperature, s.top_p, s.ids.at[jnp.arange(S), column].set(ids, mode="drop"),
                            s.logprobs.at[jnp.arange(S), column].set(lp, mode="drop"))

    def more(carry):
        i, s = carry
        return (i < chunk) & ~jnp.all(s.done) & ~(return_early & jnp.any(s.done & ~done_before))

    slots = jax.lax.while_loop(more, one, (jnp.int32(0), slots))[1]
    back = lambda big, small: jax.lax.dynamic_update_slice(big, small, (0,) * big.ndim)  # noqa: E731
    cache = slots.cache
    return slots._replace(cache=KVCache(jax.tree.map(back, full.k, cache.k), jax.tree.map(back, full.v, cache.v),
                                        back(full.segment_ids, cache.segment_ids), cache.index))


class Admission(NamedTuple):
    """Waiting requests going into free slots: M = S entries, the unused ones aimed at slot S (dropped)."""
    target: jax.Array  # [M] int32, the slot
    source: jax.Array  # [M] int32, its row of the prefilled prompts
    keys: jax.Array  # [M] the request's key
    temperature: jax.Array  # [M] float32
    top_p: jax.Array  # [M] float32
    limit: jax.Array  # [M] int32
    length: jax.Array  # [M] int32, the prompt's length (the first new token's position)


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"), donate_argnums=(3,))
def prefill(graphdef, state, layers, slots: Slots, tokens, segment_ids, positions, admit: Admission, eos_ids, *,
            top_k: int) -> Slots:
    """Prompts tokens [R, P] (left-padded) → their keys and values in columns 0..P-1 of each target slot, the
    first new id sampled for each, every other column of the slot emptied."""
    model = nnx.merge(graphdef, state)
    R, P = tokens.shape
    S, N = slots.ids.shape
    cache = KVCache.init(model.cfg, R, P)
    cache = cache._replace(k=tuple(cache.k), v=tuple(cache.v))
    logits, cache = model(tokens, positions=positions, segment_ids=segment_ids, cache=cache, last=1, layers=layers)
    ids, lp = pick(logits[admit.source, 0], admit.keys, jnp.zeros_like(admit.limit), admit.temperature, admit.top_p,
                   top_k)
    to = admit.target
    into = lambda big, new: big.at[to, :P].set(new[admit.source], mode="drop")  # noqa: E731 ([S, C, K, H])
    empty_row = jnp.zeros((len(to), slots.cache.segment_ids.shape[1]), jnp.int32)
    empty_row = empty_row.at[:, :P].set(segment_ids[admit.source])  # the prompt's columns, then nothing
    new_cache = KVCache(jax.tree.map(into, slots.cache.k, cache.k), jax.tree.map(into, slots.cache.v, cache.v),
                        slots.cache.segment_ids.at[to].set(empty_row, mode="drop"),
                        slots.cache.index.at[to].set(P, mode="drop"))
    put = lambda big, new: big.at[to].set(new, mode="drop")  # noqa: E731
    first_ids = jnp.full((len(to), N), -1, jnp.int32).at[:, 0].set(ids)
    first_lps = jnp.zeros((len(to), N), jnp.float32).at[:, 0].set(lp)
    done = jnp.isin(ids, eos_ids) | (admit.limit <= 1)
    return Slots(new_cache, put(slots.last, ids), put(slots.positions, admit.length), put(slots.count, 1),
                 put(slots.limit, admit.limit), put(slots.done, done), put(slots.keys, admit.keys),
                 put(slots.temperature, admit.temperature), put(slots.top_p, admit.top_p), put(slots.ids, first_ids),
                 put(slots.logprobs, first_lps))


class Request(NamedTuple):
    prompt: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_p: float
    key: jax.Array


class Engine:
    """S slots over one model (its weights as they are now: make a new Engine after a training step).

    slots: sequences decoded at once; max_new_tokens: the most any request may ask; max_prompt_len: the longest
    prompt (both fix the cache's length); chunk: decode steps between two visits of the host (a new request
    waits at most this many steps to join); top_k: one cut for every request (0: none); eos_ids: where
    requests end (default the model's)."""

    def __init__(self, model: Transformer, *, slots: int = 8, max_new_tokens: int = 256, max_prompt_len: int = 512,
                 chunk: int = 16, top_k: int = 0, eos_ids=None):
        if slots < 1 or max_new_tokens < 1 or max_prompt_len < 1 or chunk < 1 or top_k < 0:
            raise ValueError("need slots, max_new_tokens, max_prompt_len, chunk >= 1 and top_k >= 0")
        self.graphdef, self.state = nnx.split(model)
        self.layers = unstack_layers(model, fuse=True)  # decoding runs the layers unrolled, as sample.generate
        self.S, self.N, self.chunk, self.top_k = slots, max_new_tokens, chunk, top_k
        self.max_prompt = left_pad([[0] * max_prompt_len])[0].shape[1]  # the largest prompt bucket
        eos = model.cfg.eos_ids if eos_ids is None else tuple(eos_ids)
        self.eos = jnp.asarray(eos or (-2,), jnp.int32)
        self.C = self.max_prompt + max_new_tokens  # cache columns per slot
        cache = KVCache.init(model.cfg, slots, self.C)
        cache = KVCache(tuple(cache.k), tuple(cache.v), cache.segment_ids, jnp.zeros(slots, jnp.int32))
        S, N = slots, max_new_tokens
        self.slots = Slots(cache, jnp.zeros(S, jnp.int32), jnp.zeros(S, jnp.int32), jnp.zeros(S, jnp.int32),
                           jnp.zeros(S, jnp.int32), jnp.ones(S, bool), jax.random.split(jax.random.key(0), S),
                           jnp.zeros(S), jnp.ones(S), jnp.full((S, N), -1, jnp.int32), jnp.zeros((S, N)))
        self.waiting: collections.deque[int] = collections.deque()
        self.requests: dict[int, Request] = {}
        self.owner: list[int | None] = [None] * S  # the request in each slot
        self.sent = [0] * S  # ids of the slot's request already handed out
        self.prompt_len = [0] * S  # the slot's prompt bucket: its first columns
        self.next_id = 0
        self.stats = {"chunks": 0, "prefills": 0, "tokens": 0}

    def add(self, prompt: list[int], *, max_new_tokens: int | None = None, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0, index: int = 0) -> int:
        """Queue a request; returns its id. Its draws come from (seed, index) alone."""
        max_new_tokens = self.N if max_new_tokens is None else max_new_tokens
        if not prompt or len(prompt) > self.max_prompt:
            raise ValueError(f"a prompt needs 1 .. {self.max_prompt} tokens, got {len(prompt)}")
        if not 1 <= max_new_tokens <= self.N:
            raise ValueError(f"max_new_tokens must be in 1 .. {self.N} (the engine's), got {max_new_tokens}")
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        rid, self.next_id = self.next_id, self.next_id + 1
        key = jax.random.fold_in(jax.random.key(seed), index)
        self.requests[rid] = Request(tuple(prompt), max_new_tokens, float(temperature), float(top_p), key)
        self.waiting.append(rid)
        return rid

    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.owner)

    def admitting(self) -> bool:
        """Whether the next step puts waiting requests into free slots."""
        return bool(self.waiting) and None in self.owner

    def step(self, steps: int | None = None) -> list[Update]:
        """Fill free slots with waiting requests, decode one chunk (`steps` decode steps, default --chunk; a server
        asks for 1 when admitting, so new requests' first ids come back right after their prefill), return
        what every running request made."""
        chunk = steps or self.chunk
        self.admit()
        if all(r is None for r in self.owner):
            return []
        # the columns written so far (a slot's prompt bucket, then one per id after its first) and the chunk's
        held = max(self.prompt_len[s] + max(self.sent[s], 1) - 1 for s, r in enumerate(self.owner) if r is not None)
        span = min(self.C, 1 << (held + chunk - 1).bit_length())  # a power of two: few shapes
        self.slots = decode_chunk(self.graphdef, self.state, self.layers, self.slots, self.eos,
                                  jnp.bool_(bool(self.waiting)), chunk=chunk, top_k=self.top_k, span=span)
        self.stats["chunks"] += 1
        count, done = np.asarray(self.slots.count), np.asarray(self.slots.done)
        ids, logprobs = np.asarray(self.slots.ids), np.asarray(self.slots.logprobs)
        updates = []
        for s, rid in enumerate(self.owner):
            if rid is None:
                continue
            n = int(count[s])
            updates.append(Update(rid, ids[s, self.sent[s]:n].tolist(), logprobs[s, self.sent[s]:n].tolist(),
                                  bool(done[s])))
            self.sent[s] = n
            if done[s]:
                self.owner[s] = None
                del self.requests[rid]
        self.stats["tokens"] += sum(len(u.ids) for u in updates)
        return updates

    def admit(self) -> None:
        """Waiting requests into free slots: one prefill of their distinct prompts, in buckets of rows and length."""
        free = [s for s, r in enumerate(self.owner) if r is None]
        taken = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        if not taken:
            return
        prompts = list(dict.fromkeys(self.requests[r].prompt for r in taken))  # distinct, in order
        rows = 1 << (len(prompts) - 1).bit_length()  # a power of two: few shapes
        tokens, segment_ids, positions = left_pad([list(p) for p in prompts] + [[0]] * (rows - len(prompts)))
        reqs = [self.requests[r] for r in taken]
        pad = self.S - len(taken)
        admit = Admission(
            target=jnp.asarray(free[:len(taken)] + [self.S] * pad, jnp.int32),
            source=jnp.asarray([prompts.index(r.prompt) for r in reqs] + [0] * pad, jnp.int32),
            keys=jnp.stack([r.key for r in reqs] + [reqs[0].key] * pad),
            temperature=jnp.asarray([r.temperature for r in reqs] + [0.0] * pad, jnp.float32),
            top_p=jnp.asarray([r.top_p for r in reqs] + [1.0] * pad, jnp.float32),
            limit=jnp.asarray([r.max_new_tokens for r in reqs] + [1] * pad, jnp.int32),
            length=jnp.asarray([len(r.prompt) for r in reqs] + [0] * pad, jnp.int32))
        self.slots = prefill(self.graphdef, self.state, self.layers, self.slots, tokens, segment_ids, positions, admit,
                             self.eos, top_k=self.top_k)
        self.stats["prefills"] += 1
        for s, rid in zip(free, taken):
            self.owner[s], self.sent[s], self.prompt_len[s] = rid, 0, tokens.shape[1]

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, return_logprobs: bool = False):
        """sample.generate's answer for these prompts (request r draws from (seed, r)), decoded in the slots."""
        rids = [self.add(p, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, index=i)
                for i, p in enumerate(prompts)]
        out = {r: ([], []) for r in rids}
        while self.busy():
            for u in self.step():
                if u.request in out:
                    out[u.request][0].extend(u.ids)
                    out[u.request][1].extend(u.logprobs)
        results = [out[r][0] for r in rids]
        return (results, [out[r][1] for r in rids]) if return_logprobs else results


def generate(model: Transformer, prompts: list[list[int]], *, slots: int, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_ids=None,
             return_logprobs: bool = False, chunk: int = 16):
    """sample.generate's call and answer, decoded in `slots` slots (request r draws from (seed, r)); slots 0: one
    static batch, sample.generate itself (what a script's --rollout-slots 0 asks for)."""
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    return_logprobs=return_logprobs)
    if not slots:
        return sample.generate(model, prompts, top_k=top_k, eos_ids=eos_ids, **sampling)
    eng = Engine(model, slots=slots, max_new_tokens=max_new_tokens, max_prompt_len=max(map(len, prompts)), chunk=chunk,
                 top_k=top_k, eos_ids=eos_ids)
    return eng.generate(prompts, **sampling)
