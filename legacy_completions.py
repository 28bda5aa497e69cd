"""legacy_completions.py — what /v1/completions takes and gives beyond text in, text out: OpenAI's legacy API.

Evaluation harnesses (lm-evaluation-harness's `local-completions`, HELM's) score multiple-choice answers through
it: they send the prompt as token ids, ask for `echo` (the prompt comes back in the text and in the log-probs),
`logprobs: N` and `max_tokens` 0 or 1, and read each prompt token's log-probability. So:

- prompt: a string, a list of strings, a list of token ids or a list of lists of ids (prompt_ids). Ids are
  taken as they are, with no BOS added: lm-eval's already start with the model's BOS (Gemma needs it, and
  `add_bos_token=True` in lm-eval's model_args); text gets the tokenizer's BOS as any other request does.
- logprobs (OpenAI's shape, choice_logprobs): {"tokens": each token's text, "token_logprobs": its log-prob,
  "top_logprobs": {text: log-prob} of the N most likely tokens there and the chosen one (up to N + 1),
  "text_offset": where each token starts, in characters, in the prompt's text followed by the completion's}.
  The first prompt token has no log-prob (null, as OpenAI and vLLM give it): nothing predicts it.
- The numbers are log softmax of the model's logits, temperature 1 and no top-p cut (the model's own
  distribution, as vLLM's default "raw" log-probs), for prompt and completion alike: one forward pass over the
  prompt and the completion (Scorer), not the decode loop, so a prompt's log-probs are one prefill's work and
  equal what model_lib.token_logps gives. A sampled completion's ids come from the engine; their log-probs are
  read from this pass (equal, up to float rounding, to the logits the sampler saw before its temperature).
"""
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MAX_LOGPROBS = 20  # the most alternatives `logprobs` may ask for (OpenAI's legacy API: 5; its chat API: 20)
ROWS = 16  # positions whose logits [ROWS, V] are made at a time: never the prompt's whole [T, V] in float32


class PromptFault(ValueError):
    """A request the legacy parts cannot take (serve.py: a 400 naming `param`)."""
    def __init__(self, message: str, param: str = "prompt"):
        super().__init__(message)
        self.param = param


def prompts_of(req, tok, vocab_size: int, can_score: bool) -> tuple[list[list[int]], list[str]]:
    """A completion request's prompts (prompt_ids), refused when it streams with echo, logprobs or several
    prompts (not supported), or asks for logprobs from a server that cannot score."""
    prompts, texts = prompt_ids(req.prompt, tok, vocab_size)
    if req.stream and (req.echo or req.logprobs is not None or len(prompts) > 1):
        raise PromptFault("stream takes one prompt, without echo and logprobs", param="stream")
    if req.logprobs is not None and not can_score:
        raise PromptFault("this server does not give logprobs", param="logprobs")
    return prompts, texts


def prompt_ids(prompt, tok, vocab_size: int) -> tuple[list[list[int]], list[str]]:
    """Each prompt's ids and text, from a string, a list of strings, a list of ids (one prompt) or a list of
    lists of ids. Ids are kept as sent (no BOS added: a harness's ids already hold it); text is encoded with the
    tokenizer's BOS, as every other request's text. The text of ids is their decoding (what echo gives back)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_id(i) for i in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise PromptFault("prompt must be a string, a list of strings, a list of token ids or a list of lists of ids")
    ids, texts = [], []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids.append(tok.encode(p))
            texts.append(p)
        elif isinstance(p, list) and p and all(is_id(t) for t in p):
            if not all(0 <= t < vocab_size for t in p):
                raise PromptFault(f"prompt[{i}] holds a token id outside the vocabulary (0..{vocab_size - 1})")
            ids.append(list(p))
            texts.append(tok.decode(p))
        else:
            raise PromptFault(f"prompt[{i}] must be a string or a non-empty list of token ids, got {str(p)[:100]}")
    return ids, texts


def is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Scorer:
    """Every position's log-prob of the next token and the MAX_LOGPROBS most likely ones, by one forward pass
    over a sequence. Called from the server's request threads beside the decode thread (a forward pass only
    reads the weights); the lock keeps one scoring pass running at a time, so two never share the cores."""

    def __init__(self, model):
        self.graphdef, self.state = nnx.split(model)
        self.vocab_size = model.cfg.vocab_size
        self.lock = threading.Lock()

    def __call__(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For ids [T]: log π(ids[t] | ids[:t]) for t = 1..T-1 [T-1], and at each of those positions the
        MAX_LOGPROBS most likely ids [T-1, K] and their log-probs [T-1, K], most likely first."""
        T = len(ids)
        padded = max(ROWS, 1 << (T - 1).bit_length())  # a power of two: one compile per length bucket
        tokens = np.zeros((1, padded), np.int32)
        tokens[0, :T] = ids  # the padding comes after: causal attention keeps it out of every real position
        with self.lock:
            chosen, top_logps, top_ids = jax.device_get(score(self.graphdef, self.state, jnp.asarray(tokens)))
        return chosen[:T - 1], top_ids[:T - 1], top_logps[:T - 1]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score(graphdef, state, tokens):
    """tokens [1, T] → the next token's log-prob at each position [T] (the last one's wraps around: unused), and
    the top MAX_LOGPROBS log-probs and ids [T, K]; the output head runs ROWS positions at a time."""
    model = nnx.merge(graphdef, state)
    T = tokens.shape[1]
    x = model(tokens, hidden=True)[0]  # final-normed hidden states [T, D]
    targets = jnp.roll(tokens[0], -1)  # [T], position t predicts token t + 1

    def rows(chunk):
        x_c, t_c = chunk  # [R, D], [R]
        logps = jax.nn.log_softmax(model.logits(x_c[None])[0], axis=-1)  # [R, V] float32, softcapped as decoding is
        top_logps, top_ids = jax.lax.top_k(logps, MAX_LOGPROBS)  # [R, K]
        return jnp.take_along_axis(logps, t_c[:, None], axis=-1)[:, 0], top_logps, top_ids

    chosen, top_logps, top_ids = jax.lax.map(rows, (x.reshape(T // ROWS, ROWS, -1), targets.reshape(T // ROWS, ROWS)))
    return chosen.reshape(T), top_logps.reshape(T, -1), top_ids.reshape(T, -1)


def choice_logprobs(scorer: Scorer, tok, prompt: list[int], prompt_text: str, completion: list[int], n_top: int,
                    echo: bool) -> dict:
    """OpenAI's `logprobs` object of one choice: the completion's tokens (the prompt's first, with echo), their
    log-probs, the n_top most likely alternatives at each (and the chosen one), and each token's character
    offset into prompt_text + the completion's text (OpenAI's offsets; vLLM counts a completion's from 0)."""
    ids = prompt + completion
    chosen, top_ids, top_logps = scorer(ids) if len(ids) > 1 else (np.zeros(0), np.zeros((0, 0)), np.zeros((0, 0)))
    first = 0 if echo else len(prompt)  # the first token shown
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in range(first, len(ids)):
        out["tokens"].append(tok.decode([ids[t]]))
        if t == 0:  # nothing predicts the first token
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            out["token_logprobs"].append(float(chosen[t - 1]))
            alternatives = {}
            for i, lp in zip(top_ids[t - 1, :n_top].tolist(), top_logps[t - 1, :n_top].tolist()):
                alternatives.setdefault(tok.decode([i]), lp)  # two ids of one text: the likelier one's
            alternatives.setdefault(tok.decode([ids[t]]), float(chosen[t - 1]))
            out["top_logprobs"].append(alternatives)
        out["text_offset"].append(len(tok.decode(prompt[:t])) if t < len(prompt) else
                                  len(prompt_text) + len(tok.decode(completion[:t - len(prompt)])))
    return out


def kept_tokens(tok, completion: list[int], text: str) -> list[int]:
    """The completion's ids that made `text` (the completion's text, cut at a stop string): those that start
    before its end, so the log-probs cover the text sent and not what the stop string cut away."""
    kept = 0
    while kept < len(completion) and len(tok.decode(completion[:kept])) < len(text):
        kept += 1
    return completion[:kept]
