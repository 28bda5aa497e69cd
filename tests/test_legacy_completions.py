"""/v1/completions as OpenAI's legacy API, through the `openai` client on tiny-qwen3: echo with logprobs and
max_tokens 0 scores the prompt, each number equal to model_lib.token_logps on the server's weights and its top
alternatives to a whole-vocabulary log_softmax; prompts as ids keep their ids (no BOS added), several prompts
give p·n + j choices, a generated completion's log-probs are those of the prompt and completion scored together,
a stop string's cut drops its tokens, and what is not supported is a 400."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ckpt
import model as model_lib
import tokenizer
from test_serve import Server

BOS = 257  # the byte tokenizer's


@pytest.fixture(scope="module")
def tiny():
    server = Server("--model", "tiny-qwen3")
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference():
    """The server's weights (the same preset and seed), and log π of every next token, with its top ids."""
    model = ckpt.load_model("tiny-qwen3").model

    def logps(ids: list[int]):
        tokens = jnp.asarray([ids], jnp.int32)
        batch = {"tokens": tokens, "positions": jnp.arange(len(ids))[None], "segment_ids": jnp.ones_like(tokens)}
        chosen = np.asarray(model_lib.token_logps(model, batch))[0]  # [T-1]
        every = np.asarray(jax.nn.log_softmax(model(tokens)[0, :-1], axis=-1))  # [T-1, V]
        return chosen, every
    return logps


def test_echo_with_max_tokens_0_scores_the_prompt_as_model_lib_does(tiny, reference):
    client, tok = tiny.client(), tokenizer.load_tokenizer(None)
    r = client.completions.create(model="tiny-qwen3", prompt="12+34=46", echo=True, logprobs=3, max_tokens=0)
    choice, ids = r.choices[0], tok.encode("12+34=46")
    lp = choice.logprobs
    assert choice.text == "12+34=46" and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.tokens == [tok.decode([i]) for i in ids] and lp.text_offset == [0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    chosen, every = reference(ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], chosen, atol=1e-4)
    for t, top in enumerate(lp.top_logprobs[1:]):
        best = np.argsort(-every[t])[:3]
        want = {tok.decode([int(i)]): float(every[t, i]) for i in best[::-1]}  # the likelier of one text last
        want[tok.decode([ids[t + 1]])] = float(chosen[t])  # the chosen one is always there
        assert top.keys() == want.keys() and np.allclose([top[k] for k in want], list(want.values()), atol=1e-4)


def test_token_id_prompts_are_taken_as_sent_and_give_a_choice_each(tiny, reference):
    client, tok = tiny.client(), tokenizer.load_tokenizer(None)
    with_bos, without = [BOS, *b"7*8="], list(b"7*8=")
    r = client.completions.create(model="tiny-qwen3", prompt=[with_bos, without], echo=True, logprobs=1,
                                  max_tokens=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.usage.prompt_tokens == 9
    for choice, ids in zip(r.choices, [with_bos, with_bos, without, without]):
        assert len(choice.logprobs.tokens) == len(ids)  # no second BOS, none added
        np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], reference(ids)[0], atol=1e-4)
    one = client.completions.create(model="tiny-qwen3", prompt=with_bos, echo=True, logprobs=0, max_tokens=0)
    assert one.choices[0].logprobs.token_logprobs == r.choices[0].logprobs.token_logprobs
    assert all(len(top) == 1 for top in one.choices[0].logprobs.top_logprobs[1:])  # logprobs 0: the chosen only


def test_a_generated_completion_is_scored_with_its_prompt(tiny, reference):
    """What lm-eval asks for (echo, logprobs 1, max_tokens 1), and a longer greedy completion with and without
    echo: the completion's tokens and log-probs follow the prompt's, offsets run on into the completion."""
    client, tok = tiny.client(), tokenizer.load_tokenizer(None)
    ids = tok.encode("5+5=")
    lm_eval_asks = client.completions.create(model="tiny-qwen3", prompt=[ids], echo=True, logprobs=1, max_tokens=1,
                                             temperature=0)
    assert len(lm_eval_asks.choices[0].logprobs.token_logprobs) == len(ids) + 1
    plain = client.completions.create(model="tiny-qwen3", prompt="5+5=", max_tokens=6, temperature=0)
    echoed = client.completions.create(model="tiny-qwen3", prompt="5+5=", max_tokens=6, temperature=0, echo=True,
                                       logprobs=2)
    scored = client.completions.create(model="tiny-qwen3", prompt="5+5=", max_tokens=6, temperature=0, logprobs=2)
    made = ids[:]
    for _ in range(6):  # the greedy ids (a random model's bytes are not always UTF-8: the text does not give them)
        made.append(int(np.argmax(reference(made + [0])[1][-1])))
    made = made[len(ids):]
    assert echoed.choices[0].text == "5+5=" + plain.choices[0].text and scored.choices[0].text == plain.choices[0].text
    chosen = reference(ids + made)[0]
    np.testing.assert_allclose(echoed.choices[0].logprobs.token_logprobs[1:], chosen, atol=1e-4)
    np.testing.assert_allclose(scored.choices[0].logprobs.token_logprobs, chosen[-len(made):], atol=1e-4)
    assert scored.choices[0].logprobs.text_offset == list(range(4, 4 + len(made)))  # OpenAI's: after the prompt
    assert echoed.choices[0].logprobs.top_logprobs[-len(made):] == scored.choices[0].logprobs.top_logprobs
    greedy = [max(top.values()) == lp for top, lp in zip(scored.choices[0].logprobs.top_logprobs,
                                                           scored.choices[0].logprobs.token_logprobs)]
    assert all(greedy)  # temperature 0 chose the most likely token each time (lm-eval's is_greedy reads this)


def test_a_stop_string_cut_drops_the_tokens_after_it(tiny):
    client = tiny.client()
    text = client.completions.create(model="tiny-qwen3", prompt="9*9=", max_tokens=8, temperature=0).choices[0].text
    stop = text[3:5]
    cut = client.completions.create(model="tiny-qwen3", prompt="9*9=", max_tokens=8, temperature=0, stop=[stop],
                                    logprobs=1).choices[0]
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"
    assert "".join(cut.logprobs.tokens) == cut.text


def test_what_is_not_supported_is_a_400(tiny):
    good = {"model": "tiny-qwen3", "prompt": "hi", "max_tokens": 2}
    bad = [{**good, "prompt": []}, {**good, "prompt": [[]]}, {**good, "prompt": [1, "a"]}, {**good, "prompt": [[1.5]]},
           {**good, "prompt": [[10 ** 6]]}, {**good, "prompt": [-1]}, {**good, "prompt": {"a": 1}},
           {**good, "logprobs": 99}, {**good, "logprobs": -1}, {**good, "max_tokens": -1},
           {**good, "stream": True, "echo": True}, {**good, "stream": True, "logprobs": 1},
           {**good, "stream": True, "prompt": ["a", "b"]}, {**good, "prompt": ["a", "x" * 2000]}]
    for body in bad:
        status, reply = tiny.post("/v1/completions", json.dumps(body).encode())
        assert status == 400 and set(reply["error"]) >= {"message", "type", "param"}, (body, status, reply)
    nothing = list(tiny.client().completions.create(model="tiny-qwen3", prompt="hi", max_tokens=0, stream=True))
    assert [c.choices[0].text for c in nothing] == [""] and nothing[0].choices[0].finish_reason == "length"
