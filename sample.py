"""sample.py — text out: prefill once, then decode in one jitted loop over a KV cache.

Prompts of different lengths are left-padded into one batch, so every row writes its
next token at the same cache slot; padding is segment 0 (never attended) and each row's
positions start at 0 after its padding, which makes a padded row compute exactly what it
would alone. The decode loop is a `lax.while_loop` that stops when every row has emitted
an end-of-sequence token; shapes are bucketed so a run compiles once per
(batch, prompt-length bucket, max_new_tokens, sampling settings). The loop runs the layers
unrolled, over per-layer weights and cache; prompts that repeat in runs (GRPO's groups) are
prefilled once per run. The file reads in that order: generate → prefill and the decode loop →
next_token; then beam search and the CLI (its flags from a Config, as the scripts'). At <= 4 rows the next token may come from
int8head.py, an int8 copy of the output head with a proof of which tokens can win (the same ids,
a quarter of the head's bytes): one call in `decide`, skippable on a first reading.

    python sample.py --model tiny-gemma3 --prompt "12+34=" --max-new-tokens 16
    python sample.py --ckpt path/to/gemma-3-270m --prompt "The capital of France is" --max-new-tokens 20
    python sample.py --ckpt DIR --chat --prompt "Write a haiku" --temperature 0.7 --top-p 0.9
    python sample.py --ckpt BASE --adapter runs/lora/adapter --prompt "123+456="   # LoRA, not merged
    python sample.py --ckpt runs/grpo/hf --chat --tools calculator --max-new-tokens 160 --prompt "123*456="

--chat --tools runs the model's tool calls while it answers (reply: each call and its result on stderr, the
answer on stdout), as grpo.py --tools trained it; without --prompt, a chat that does the same turn by turn.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import chat
import data
import flags
import int8head
import tokenizer
import tools
from data import MIN_PROMPT_BUCKET, left_pad
from model import KVCache, Transformer, repeat_rows, unstack_layers

def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_ids=None, return_logprobs: bool = False,
             num_beams: int = 1, length_penalty: float = 1.0, prompt_bucket: int = MIN_PROMPT_BUCKET,
             int8: bool | None = None):
    """New token ids for each prompt (ragged lists of ids), up to and including the first
    end-of-sequence token. With return_logprobs, also each sampled token's log-probability
    under softmax(logits / temperature) (plain log-softmax when greedy). num_beams > 1 runs
    beam search (deterministic; the best beam per prompt). int8: pick tokens with the int8 output
    head (the same ids, fewer bytes read; default: when it pays, int8head.pays; not with log-probs,
    top-k or top-p)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1 "
                         f"(got {temperature}, {top_k}, {top_p})")
    if int8 and (return_logprobs or top_k or top_p < 1.0):
        raise ValueError("the int8 head picks ids only: no log-probs, top-k or top-p with int8=True")
    if num_beams < 1 or (num_beams > 1 and (temperature > 0 or return_logprobs)):
        raise ValueError(f"num_beams must be >= 1, and beam search is greedy (got num_beams={num_beams}, "
                         f"temperature={temperature})")
    eos_ids = model.cfg.eos_ids if eos_ids is None else tuple(eos_ids)
    tokens, segment_ids, positions = left_pad(prompts, prompt_bucket)
    graphdef, state = nnx.split(model)
    if num_beams > 1:
        seqs, lengths = _beam_search(graphdef, state, tokens, segment_ids, positions,
                                     jnp.asarray(eos_ids, jnp.int32).reshape(-1), max_new_tokens=max_new_tokens,
                                     num_beams=num_beams, length_penalty=float(length_penalty))
        seqs, lengths = np.asarray(seqs), np.asarray(lengths)
        return [seqs[row, :lengths[row]].tolist() for row in range(len(prompts))]
    layers = unstack_layers(model, fuse=True)  # an unrolled decode step of fewer, larger matmuls is faster on CPU
    if int8 is None:
        int8 = not return_logprobs and top_k == 0 and top_p == 1.0 and int8head.pays(model, len(prompts))
    head8 = int8head.cached(model) if int8 else None
    out, out_lp = _generate(graphdef, state, layers, head8, tokens, segment_ids, positions,
                            jnp.asarray(eos_ids or (-2,), jnp.int32), jax.random.key(seed),
                            max_new_tokens=max_new_tokens, temperature=float(temperature),
                            top_k=int(top_k), top_p=float(top_p), group=prompt_runs(prompts))
    out, out_lp = np.asarray(out), np.asarray(out_lp)  # one host transfer at the end
    results, logprobs = [], []
    for row in range(len(prompts)):
        n = int(np.sum(out[row] >= 0))
        results.append(out[row, :n].tolist())
        logprobs.append(out_lp[row, :n].tolist())
    return (results, logprobs) if return_logprobs else results


# ----------------------------------------------------------------------------- prefill, then the decode loop

class Decoding(NamedTuple):
    """The decode loop's state."""
    step: jax.Array  # [] int32, the next column of ids to write
    ids: jax.Array  # [B, max_new_tokens] int32, -1 after a row's end
    logprobs: jax.Array  # [B, max_new_tokens] float32, each id's log-probability (0 after the end)
    cache: KVCache  # per-layer keys and values of every token so far
    done: jax.Array  # [B] bool, the row has emitted an end-of-sequence id
    positions: jax.Array  # [B, 1] int32, RoPE position of the token fed next
    key: jax.Array  # sampling key


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "group"))
def _generate(graphdef, state, layers, head8, tokens, segment_ids, positions, eos_ids, key, *,
              max_new_tokens: int, temperature: float, top_k: int, top_p: float, group: int):
    """tokens/segment_ids/positions [B, P] left-padded → new ids [B, max_new_tokens], their
    log-probs (zeros with head8, the int8 head). Rows that finished keep emitting pad (-1).
    The prompts come in runs of `group` equal ones (prompt_runs): each run is prefilled once."""
    model = nnx.merge(graphdef, state)
    B, P = tokens.shape

    def decide(x, key):  # final-normed hidden states [B, D] (int8 head) or logits [B, V] → ids, log-probs
        if head8 is None:
            return next_token(x, key, temperature, top_k, top_p)
        return int8head.next_token(model, x, head8, key, temperature), jnp.zeros(B)

    cache = KVCache.init(model.cfg, B // group, P + max_new_tokens)
    cache = cache._replace(k=tuple(cache.k), v=tuple(cache.v))  # per layer: no [L, ...] copy per step
    h, cache = model(tokens[::group], positions=positions[::group], segment_ids=segment_ids[::group], cache=cache,
                     last=1, layers=layers, hidden=head8 is not None)
    h, cache = jnp.repeat(h, group, axis=0), repeat_rows(cache, group)
    key, sub = jax.random.split(key)
    first, first_lp = decide(h[:, -1], sub)
    ones = jnp.ones((B, 1), jnp.int32)
    loop = Decoding(step=jnp.int32(1), ids=jnp.full((B, max_new_tokens), -1, jnp.int32).at[:, 0].set(first),
                    logprobs=jnp.zeros((B, max_new_tokens), jnp.float32).at[:, 0].set(first_lp), cache=cache,
                    done=jnp.isin(first, eos_ids), positions=positions[:, -1:] + 1, key=key)

    def unfinished(s: Decoding):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def decode_one(s: Decoding) -> Decoding:  # the last token in, the next one out, for every row at once
        last = s.ids[:, s.step - 1][:, None]  # [B, 1]
        h, cache = model(jnp.maximum(last, 0), positions=s.positions, segment_ids=ones, cache=s.cache, layers=layers,
                         hidden=head8 is not None)
        key, sub = jax.random.split(s.key)
        ids, lp = decide(h[:, 0], sub)
        ids = jnp.where(s.done, -1, ids)
        logprobs = s.logprobs.at[:, s.step].set(jnp.where(s.done, 0.0, lp))
        return Decoding(s.step + 1, s.ids.at[:, s.step].set(ids), logprobs, cache, s.done | jnp.isin(ids, eos_ids),
                        s.positions + 1, key)

    loop = jax.lax.while_loop(unfinished, decode_one, loop)
    return loop.ids, loop.logprobs


def stream(model: Transformer, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, eos_ids=()):
    """generate() for one prompt, one token at a time as each is made (a chat's, a server's stream): the same
    prefill and decode step, driven from Python so each id can be shown at once. Yields ids, the
    end-of-sequence id included; greedy ids equal generate()'s."""
    tokens, segment_ids, positions = left_pad([prompt])
    graphdef, state = nnx.split(model)
    layers = unstack_layers(model, fuse=True)
    cache = KVCache.init(model.cfg, 1, tokens.shape[1] + max_new_tokens)
    cache = cache._replace(k=tuple(cache.k), v=tuple(cache.v))
    key, sampling = jax.random.key(seed), (float(temperature), int(top_k), float(top_p))
    token, cache, key = _stream_step(graphdef, state, layers, tokens, segment_ids, positions, cache, key, *sampling)
    for i in range(max_new_tokens):
        token_id = int(token[0])
        yield token_id
        if token_id in eos_ids or i + 1 == max_new_tokens:
            return
        token, cache, key = _stream_step(graphdef, state, layers, token[:, None], jnp.ones((1, 1), jnp.int32),
                                         positions[:, -1:] + 1 + i, cache, key, *sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"))
def _stream_step(graphdef, state, layers, tokens, segment_ids, positions, cache, key, temperature, top_k, top_p):
    """tokens [1, T] (the left-padded prompt, or the last id) in at positions [1, T] → the next id [1], cache, key."""
    logits, cache = nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                                                 last=1, layers=layers)
    key, sub = jax.random.split(key)
    return next_token(logits[:, -1], sub, temperature, top_k, top_p)[0], cache, key


# ----------------------------------------------------------------------------- the next token

def filter_logits(logits, temperature, top_k: int, top_p):
    """Temperature, then top-k, then top-p (nucleus) on logits [B, V]; masked entries -inf. temperature and top_p:
    floats, or one per row [B, 1] (the decode engine's slots; a row at top_p 1 is left whole)."""
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if not isinstance(top_p, float) or top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p (at least one)
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where((logits < cutoff) & (top_p < 1.0), -jnp.inf, logits)
    return logits


def first_argmax(x):
    """jnp.argmax over the last axis (ties: the lowest index) as a max and a min: two plain
    reductions run ~4x faster on CPU than argmax's (value, index) one on a [8, 262144] row block.
    XLA may compute x once for each of them, rounded differently in the last bit (seen with a
    division after a repeat), so that no entry equals the max: then jnp.argmax decides."""
    best = jnp.max(x, axis=-1, keepdims=True)
    ids = jnp.min(jnp.where(x == best, jnp.arange(x.shape[-1]), x.shape[-1]), axis=-1)
    return jax.lax.cond(jnp.any(ids == x.shape[-1]), lambda: jnp.argmax(x, axis=-1).astype(ids.dtype), lambda: ids)


def next_token(logits, key, temperature: float, top_k: int, top_p: float):
    """Sample (or argmax at temperature 0) from logits [B, V]; returns ids [B] and their
    log-probabilities under the temperature-scaled distribution before top-k/top-p."""
    if temperature == 0.0:
        ids = first_argmax(logits)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    else:  # the Gumbel-max trick, as jax.random.categorical draws
        filtered = filter_logits(logits, temperature, top_k, top_p)
        ids = first_argmax(filtered + jax.random.gumbel(key, filtered.shape, filtered.dtype))
        logprobs = jax.nn.log_softmax(logits / temperature, axis=-1)
    return ids.astype(jnp.int32), jnp.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- beam search

class Beams(NamedTuple):
    """Beam search's state: num_beams running and num_beams finished continuations per prompt."""
    g: jax.Array  # [] int32, tokens generated so far
    logits: jax.Array  # [B*nb, 1, V] of each running beam's next token
    cache: KVCache
    running: jax.Array  # [B, nb, G] int32 token ids
    running_score: jax.Array  # [B, nb] summed log-probs
    finished: jax.Array  # [B, nb, G] int32
    finished_score: jax.Array  # [B, nb] length-normalised
    finished_len: jax.Array  # [B, nb] int32
    is_finished: jax.Array  # [B, nb] bool: the slot holds a finished beam
    unsatisfied: jax.Array  # [B, 1] bool: a running beam could still beat the worst finished one
    all_ended: jax.Array  # [] bool


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "num_beams", "length_penalty"))
def _beam_search(graphdef, state, tokens, segment_ids, positions, eos_ids, *, max_new_tokens: int,
                 num_beams: int, length_penalty: float):
    """Beam search with transformers' rules (its default early_stopping=False heuristic): keep
    the num_beams best running continuations out of the top max(2, 1 + n_eos) * num_beams; a
    continuation that ends (EOS or length limit) and ranks in the top num_beams joins the
    finished set with score sum(logprob) / length ** length_penalty; stop once no running
    beam can beat the worst finished one. Returns the best finished beam [B, G] and lengths."""
    model = nnx.merge(graphdef, state)
    B, P = tokens.shape
    nb, G = num_beams, max_new_tokens
    K = max(2, 1 + eos_ids.shape[0]) * nb
    beams = lambda x: jnp.repeat(x, nb, axis=0)  # [B, ...] → [B*nb, ...], a row's beams adjacent
    cache = KVCache.init(model.cfg, B * nb, P + G + 1)
    logits, cache = model(beams(tokens), positions=beams(positions), segment_ids=beams(segment_ids), cache=cache,
                          last=1)  # [B*nb, 1, V]
    gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def body(b: Beams) -> Beams:
        g, logits, cache, run_seq, run_score, fin_seq, fin_score, fin_len, is_fin, unsat, _ = b
        V = logits.shape[-1]
        logprobs = jax.nn.log_softmax(logits[:, -1], axis=-1).reshape(B, nb, V) + run_score[:, :, None]
        top_lp, top_idx = jax.lax.top_k(logprobs.reshape(B, nb * V), K)  # [B, K], best first
        src, tok = top_idx // V, (top_idx % V).astype(jnp.int32)
        top_seq = gather(run_seq, src).at[:, :, g].set(tok)  # [B, K, G]
        ends = jnp.isin(tok, eos_ids) | (g + 1 >= G)
        # running beams: the best nb continuations that did not end
        run_score, keep = jax.lax.top_k(top_lp - 1e9 * ends, nb)
        run_seq, run_src = gather(top_seq, keep), gather(src, keep)
        # finished beams: merge the top-nb continuations that just ended, length-normalised
        just = ends & (jnp.arange(K) < nb)[None]
        cand = top_lp / (g + 1.0) ** length_penalty - 1e9 * ~unsat - 1e9 * ~just
        fin_score, pick = jax.lax.top_k(jnp.concatenate([fin_score, cand], 1), nb)
        fin_seq = gather(jnp.concatenate([fin_seq, top_seq], 1), pick)
        fin_len = gather(jnp.concatenate([fin_len, jnp.full((B, K), g + 1)], 1), pick)
        is_fin = gather(jnp.concatenate([is_fin, just], 1), pick)
        # reorder the cache to follow each running beam's source, then feed its new token
        flat_src = (jnp.arange(B)[:, None] * nb + run_src).reshape(-1)
        take = lambda x: jnp.take(x, flat_src, axis=x.ndim - 4)  # noqa: E731 ([L, B, S, K, H] or per layer [B, S, K, H])
        cache = KVCache(jax.tree.map(take, cache.k), jax.tree.map(take, cache.v), cache.segment_ids[flat_src], cache.index)
        pos = beams(positions[:, -1:]) + 1 + g
        logits, cache = model(run_seq[:, :, g].reshape(-1, 1), positions=pos,
                              segment_ids=jnp.ones((B * nb, 1), jnp.int32), cache=cache)
        g = g + 1
        best_possible = run_score[:, :1] / g.astype(jnp.float32) ** length_penalty
        worst_finished = jnp.where(is_fin, jnp.min(fin_score, axis=1, keepdims=True), -1e9)
        unsat = unsat & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        return Beams(g, logits, cache, run_seq, run_score, fin_seq, fin_score, fin_len, is_fin, unsat, jnp.all(ends))

    def cond(b: Beams):
        return (b.g < G) & jnp.any(b.unsatisfied) & ~b.all_ended

    run_score = jnp.where(jnp.arange(nb) == 0, 0.0, -1e9)[None].repeat(B, 0)  # identical beams: use the first
    beams_state = Beams(jnp.int32(0), logits, cache, jnp.zeros((B, nb, G), jnp.int32), run_score,
                        jnp.zeros((B, nb, G), jnp.int32), jnp.full((B, nb), -1e9), jnp.zeros((B, nb), jnp.int32),
                        jnp.zeros((B, nb), bool), jnp.ones((B, 1), bool), jnp.bool_(False))
    beams_state = jax.lax.while_loop(cond, body, beams_state)
    return beams_state.finished[:, 0], beams_state.finished_len[:, 0]


# ----------------------------------------------------------------------------- prompts in, ids out

def prompt_runs(prompts: list[list[int]]) -> int:
    """g when the prompts come in runs of g equal ones (GRPO's groups: each prompt G times), else 1."""
    g = next((i for i in range(1, len(prompts)) if prompts[i] != prompts[0]), len(prompts))
    runs = len(prompts) % g == 0 and all(prompts[i] == prompts[i - i % g] for i in range(len(prompts)))
    return g if runs else 1


# ----------------------------------------------------------------------------- CLI

@dataclasses.dataclass
class LoadFlags:
    """The model a sampling command loads (serve.py's Config has them too)."""
    # -- model --
    model: str = "tiny-gemma3"  # preset or family alias (ignored with --ckpt)
    ckpt: str | None = None  # Hugging Face checkpoint directory
    adapter: str | None = None  # a PEFT LoRA adapter directory (ours or PEFT's), applied on the base, unmerged
    dtype: str = "float32"  # weights and compute: float32 or bfloat16


@dataclasses.dataclass
class Config(LoadFlags):
    # -- prompts --
    prompt: list[str] | None = None  # prompt text; repeat the flag for a batch (--chat without it: talk turn by turn)
    chat: bool = False  # wrap each prompt as a user turn in the family's chat template
    system: str | None = None  # system message for --chat
    # with --chat: functions the model may call (calculator, module:fn1,fn2 or file.py:fn); calls and results on stderr
    tools: str | None = None
    max_tool_calls: int = 4  # with --tools: the most calls one answer may make (a turn asking for more is the answer)
    # -- decoding --
    max_new_tokens: int = 32  # most new tokens per prompt (fewer when one of the stop tokens comes)
    temperature: float = 0.0  # sampling temperature (0: greedy)
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    top_p: float = 1.0  # nucleus sampling: the most likely tokens whose probabilities sum to top_p
    num_beams: int = 1  # beam search width (1: no beam search)
    seed: int = 0  # the sampling's random stream

    def __post_init__(self):
        flags.check([(self.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {self.dtype!r}"),
                     (self.max_new_tokens >= 1 and self.num_beams >= 1, "need --max-new-tokens >= 1, --num-beams >= 1"),
                     (self.temperature >= 0 and self.top_k >= 0 and 0 < self.top_p <= 1,
                      "need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1"),
                     (bool(self.prompt) or self.chat,
                      "the following arguments are required: --prompt (or --chat alone, to talk turn by turn)"),
                     (not self.tools or (self.chat and self.num_beams == 1 and self.max_tool_calls >= 0),
                      "--tools needs --chat, --num-beams 1 and --max-tool-calls >= 0")])
        self.tool_functions = tools.load(self.tools) if self.tools else []  # a bad spec: one line, exit 2


class Loaded(NamedTuple):
    model: Transformer
    tok: object  # tokenizer.load_tokenizer's
    source: str  # where the weights came from (and the adapter)
    eos_ids: tuple[int, ...]  # data.stop_ids: where completions end
    chat_template: bool  # the checkpoint ships one (data.has_chat_template); a tiny preset's model does not


def load(cfg: LoadFlags) -> Loaded:
    """The model of --ckpt (else of the --model preset), with --adapter applied, and its tokenizer."""
    import ckpt
    model, source, directory = ckpt.load_model(cfg.model, ckpt=cfg.ckpt, dtype=cfg.dtype)
    if cfg.adapter:
        model, source = ckpt.load_peft(model, cfg.adapter), f"{source} + adapter {cfg.adapter}"
    tok = tokenizer.load_tokenizer(directory)  # no directory: the byte-level tokenizer of the tiny presets
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    return Loaded(model, tok, source, data.stop_ids(tok, model.cfg), data.has_chat_template(directory))


def main(argv=None):
    cfg = flags.parse(Config, argv)
    with flags.user_errors():  # CheckpointError and TokenizerError are ValueErrors
        loaded = load(cfg)
        model, tok, source, eos, _ = loaded
        if cfg.chat and not cfg.prompt:
            return interactive_chat(loaded, cfg)
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        if cfg.tools:  # one conversation per prompt: its calls and results on stderr, its answer on stdout
            print(f"# model: {source}", file=sys.stderr)
            for text in cfg.prompt:
                print(reply(loaded, system + [{"role": "user", "content": text}], cfg, lambda piece: None), flush=True)
            return
        turn = lambda text: chat.apply_chat_template(system + [{"role": "user", "content": text}],  # noqa: E731
                                                     model.cfg.family)
        prompts = [tok.encode(turn(text), add_bos=False) if cfg.chat else tok.encode(text)  # the template holds BOS
                   for text in cfg.prompt]
        outs = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, eos_ids=eos, num_beams=cfg.num_beams)
    print(f"# model: {source}", file=sys.stderr)
    for text, ids in zip(cfg.prompt, outs):
        print(tok.decode(ids) if cfg.chat else text + tok.decode(ids))


def interactive_chat(loaded: Loaded, cfg: Config) -> None:
    """--chat without --prompt: each line read is a user turn; the answer is printed as it is generated
    (stream), and both join the history, which the family's chat template renders whole each turn (reply).
    A model without a chat template has no format for a second question after tool calls: with --tools each
    line starts a new conversation there. Ctrl-D or Ctrl-C ends the chat."""
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history, family = list(system), loaded.model.cfg.family
    print(f"chat with {family} ({cfg.ckpt or cfg.model}); Ctrl-D or Ctrl-C ends it"
          + (f"; tools: {', '.join(fn.__name__ for fn in cfg.tool_functions)} (calls on stderr)" if cfg.tools else ""),
          file=sys.stderr)
    try:
        while True:
            print("> ", end="", flush=True)  # on stdout: input()'s own prompt goes to stderr on a terminal
            try:
                line = input()
            except EOFError:
                break
            if cfg.tools and not loaded.chat_template:
                history = list(system)
            history.append({"role": "user", "content": line})
            reply(loaded, history, cfg, lambda piece: print(piece, end="", flush=True))
            print(flush=True)
    except KeyboardInterrupt:
        print()


def conversation_ids(messages: list[dict], tok, family: str, chat_template: bool, tools_listed=None) -> list[int]:
    """A conversation's ids up to the assistant's next turn (the chat here and serve.py's): the family's chat
    template, listing tools_listed (functions or JSON schemas; None: no list); but a checkpoint without a chat
    template (a byte-level tiny model) writes a conversation with tools or tool turns as grpo.py --tools trained
    it (chat.plain_conversation_ids: a plain prompt, no tool list)."""
    tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if not chat_template and (tools_listed or tool_turns):
        return chat.plain_conversation_ids(messages, tok, family)
    return tok.encode(chat.apply_chat_template(messages, family, tools=tools_listed), add_bos=False)


def reply(loaded: Loaded, history: list[dict], cfg: Config, show) -> str:
    """The assistant's answer to the history, its turns appended to it, show(piece) given its text as it is made.
    With --tools, each turn's calls (tools.parse_tool_calls) run as tools.rollout runs them (checked against the
    schema, 10 s at most, a failure an "error: ..." result) and the model goes on after their results, until a
    turn calls nothing or asks for more than --max-tool-calls leaves; calls and results go to stderr. The history
    keeps each turn's text as the model wrote it, calls included, and is rendered whole for every turn."""
    family, fns, made = loaded.model.cfg.family, cfg.tool_functions, 0
    functions = {fn.__name__: fn for fn in fns}
    schemas = {name: tools.function_schema(fn) for name, fn in functions.items()}
    while True:
        ids = conversation_ids(history, loaded.tok, family, loaded.chat_template, fns or None)
        text, calls = stream_turn(loaded, ids, cfg, cfg.seed + len(history), show, bool(fns))
        history.append({"role": "assistant", "content": text})
        if calls and made + len(calls) > cfg.max_tool_calls:
            print(f"[tools] the answer asks for {len(calls)} more calls, past --max-tool-calls {cfg.max_tool_calls}: "
                  "none run", file=sys.stderr)
        if not calls or made + len(calls) > cfg.max_tool_calls:
            return text
        for call in calls:
            result = tools._run_call(call, functions, schemas, 10.0)
            asked = f"{call[0]}({json.dumps(call[1], ensure_ascii=False)})" if isinstance(call, tuple) else "?"
            print(f"[tool call] {asked} -> {result.text}", file=sys.stderr, flush=True)
            history.append({"role": "tool", "content": result.text})
        made += len(calls)


def stream_turn(loaded: Loaded, ids: list[int], cfg: Config, seed: int, show, calls: bool) -> tuple[str, list]:
    """One assistant turn from ids, streamed (stream()): its text and, when calls, the calls it makes (none unless
    it ended with a stop id: a turn cut at --max-new-tokens runs nothing). show(piece) gets each new piece of text,
    never half a UTF-8 character; with calls the text keeps the family's call markers (tools._decode_turn) and
    show gets only what comes before a call (chat.call_start)."""
    family, made, shown, ended = loaded.model.cfg.family, [], "", False
    decode = functools.partial(tools._decode_turn, loaded.tok, family=family) if calls else loaded.tok.decode
    stops = chat.tool_stop_ids(loaded.tok, family, loaded.eos_ids) if calls else loaded.eos_ids  # Gemma 4 calls end
    for token in stream(loaded.model, ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        top_k=cfg.top_k, top_p=cfg.top_p, seed=seed, eos_ids=stops):
        if token in stops:
            ended = True
            break
        made.append(token)
        text = decode(made)
        visible = text[:chat.call_start(text, family)].rstrip() if calls else text
        if not visible.endswith("\ufffd") and len(visible) > len(shown):  # a character still being spelled out
            show(visible[len(shown):])
            shown = visible
    text = decode(made)
    found = tools.parse_tool_calls(text, family) if calls and ended else []
    show((text[:chat.call_start(text, family)].rstrip() if found else text)[len(shown):])
    return text, found


if __name__ == "__main__":
    main()
