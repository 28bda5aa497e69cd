"""tools.rollout, the multi-turn tool rollout, with scripted policies: the tokens it builds are the rendered
conversation's, the model's ids go in as sampled, tool results carry mask 0, and bad calls and limits end
nothing but what they should. Also parse_tool_calls and call_tool on their own."""
from __future__ import annotations

import json
import pathlib
import re
import sys
import time
from typing import Literal

import pytest
import tokenizers
from test_tools import ANSWER, CONTROL_TOKENS, ONE_CALL_EACH, QUESTION, SYSTEM, TWO_CALLS, call

import chat
import tokenizer
import tools

FAMILIES = ["qwen2", "qwen3", "llama3", "gemma3"]
TOKENS = {**CONTROL_TOKENS, "gemma3": ["<bos>", "<start_of_turn>", "<end_of_turn>"]}
BOS = {"llama3": "<|begin_of_text|>", "gemma3": "<bos>", "gemma4": "<bos>"}
ASSISTANT_HEADER = {"qwen2": "<|im_start|>assistant\n", "qwen3": "<|im_start|>assistant\n",
                    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "gemma3": "<start_of_turn>model\n"}
CONVERSATION = {"qwen2": TWO_CALLS, "qwen3": TWO_CALLS, "llama3": ONE_CALL_EACH, "gemma3": TWO_CALLS}


# ----------------------------------------------------------------------------- tools and tokenizers

WEATHER = {("Paris", "celsius"): "18°C, sunny", ("Zürich", "fahrenheit"): "64°F, rain"}  # TWO_CALLS's results


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Today's weather in a city, e.g. "18°C, sunny".

    Args:
        city: the city's name, in any language
        unit: the temperature unit
    """
    return WEATHER[city, unit]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def forecast(days: list[int], region: str | None = None) -> dict:
    """A forecast.

    Args:
        days: days ahead
        region: a region, or none
    """
    return {"days": days, "region": region}


def boom() -> str:
    """Always fails."""
    raise ValueError("no weather today\nand a second line the model never sees")


def slow() -> str:
    """Never answers in time."""
    time.sleep(2.0)
    return "too late"


def leave() -> str:
    """Exits."""
    sys.exit(3)


TOOLS = [get_weather, add]


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict:
    """Per family, a tokenizer.json of one token per byte, one merge ("Pa", so "Paris" has a canonical and a
    non-canonical tokenization) and the family's control tokens as special tokens (decode drops them)."""
    out = {}
    for family in [*FAMILIES, "gemma4"]:
        alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
        vocab = {c: i for i, c in enumerate(alphabet)} | {"Pa": len(alphabet)}
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[("P", "a")]))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        tok.add_special_tokens(TOKENS[family])
        directory = tmp_path_factory.mktemp(family)
        tok.save(str(directory / "tokenizer.json"))
        config = {"eos_token": chat.END_OF_TURN[family]} | ({"bos_token": BOS[family]} if family in BOS else {})
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        out[family] = tokenizer.load_tokenizer(directory)
    return out


def stop(tok, family) -> tuple[int]:
    return (tok.token_id(chat.END_OF_TURN[family]),)


def sampler_logprob(token: int) -> float:
    """The scripted sampler's log-prob of a token: distinct per id and never 0.0, so misplacement shows."""
    return -1.0 - token / 1000


class ScriptedPolicy:
    """A generate_fn that answers each row with its next scripted turn (cut to max_new_tokens, as a sampler
    would be), the row found by its original prompt; it records what it was asked."""

    def __init__(self, prompts: list[list[int]], turns: list[list[list[int]]]):
        self.prompts, self.turns, self.given, self.asked = prompts, turns, [0] * len(prompts), []

    def __call__(self, prompts, max_new_tokens):
        self.asked.append(([list(p) for p in prompts], max_new_tokens))
        ids = []
        for p in prompts:
            row = next(r for r, p0 in enumerate(self.prompts) if p[:len(p0)] == p0)
            assert self.given[row] < len(self.turns[row]), f"row {row} asked for a turn beyond its script"
            ids.append(self.turns[row][self.given[row]][:max_new_tokens])
            self.given[row] += 1
        return ids, [[sampler_logprob(t) for t in row] for row in ids]


def qwen_call(name: str, **arguments) -> str:
    return chat.qwen_tool_call(name, arguments)


# ----------------------------------------------------------------------------- done when: the rendered conversation

def split_turns(text: str, family: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (piece, sampled) after its prompt: each assistant turn from after its header
    to its end-of-turn token (sampled), the template's text between them (not sampled)."""
    header, end = ASSISTANT_HEADER[family], chat.END_OF_TURN[family]
    pieces, position = [], text.index(header) + len(header)
    while True:
        turn_end = text.index(end, position) + len(end)
        pieces.append((text[position:turn_end], True))
        following = text.find(header, turn_end)
        if following < 0:
            return pieces
        pieces.append((text[turn_end:following + len(header)], False))
        position = following + len(header)


@pytest.mark.parametrize("family", FAMILIES)
def test_scripted_policy_yields_the_rendered_conversation(toks, family):
    """Done-when of issue 28 part 2: forced tokens that call, then answer, give exactly the tokens of the fully
    rendered conversation, with the loss mask 0 exactly on the tool-result spans."""
    tok, messages = toks[family], [SYSTEM] + CONVERSATION[family]
    text = chat.apply_chat_template(messages, family, add_generation_prompt=False, tools=TOOLS)
    pieces = split_turns(text, family)
    prompt_text = text[:text.index(ASSISTANT_HEADER[family]) + len(ASSISTANT_HEADER[family])]
    assert prompt_text == chat.apply_chat_template(messages[:2], family, tools=TOOLS)  # the generation prompt
    rendered = "".join(piece for piece, _ in pieces)
    assert text == prompt_text + rendered + ("" if family == "llama3" else "\n")  # the newline no model samples
    prompt = tok.encode(prompt_text, add_bos=False)
    turns = [tok.encode(piece, add_bos=False) for piece, sampled in pieces if sampled]
    policy = ScriptedPolicy([prompt], [turns])
    [r] = tools.rollout(policy, [prompt], tok, family, TOOLS, max_completion_len=4096, max_tool_calls=10,
                        eos_ids=stop(tok, family))

    assert prompt + r.completion == tok.encode(prompt_text + rendered, add_bos=False)
    assert prompt + r.completion == tok.encode(text, add_bos=False)[:len(prompt) + len(r.completion)]
    expected_mask = [int(sampled) for piece, sampled in pieces for _ in tok.encode(piece, add_bos=False)]
    assert r.loss_mask == expected_mask and 0 in expected_mask
    assert r.logprobs == [sampler_logprob(t) if m else 0.0 for t, m in zip(r.completion, r.loss_mask)]
    # each round the policy saw the conversation as rendered up to its turn, and asked for no turn more
    seen, expected = prompt, []
    for piece, sampled in pieces:
        expected += [[seen]] * sampled
        seen = seen + tok.encode(piece, add_bos=False)
    assert [prompts for prompts, _ in policy.asked] == expected
    assert policy.given == [len(turns)]
    results = [m["content"] for m in messages if m["role"] == "tool"]
    assert (r.tool_calls, r.failed_calls) == (len(results), 0)
    assert [m["content"] for m in r.messages if m["role"] == "tool"] == results
    said = [m for m in r.messages if m["role"] == "assistant"]
    assert [m["content"] + chat.END_OF_TURN[family] for m in said] == [piece for piece, s in pieces if s]
    assert [m.get("tool_calls", []) for m in said] == [m.get("tool_calls", []) for m in messages
                                                         if m["role"] == "assistant"]
    assert said[-1]["content"].endswith(ANSWER["content"])


# ----------------------------------------------------------------------------- the model's ids as sampled

def test_model_tokens_are_never_retokenized(toks):
    """A policy that spells "Paris" byte by byte (not as the merged "Pa" token encode writes) keeps its ids in the
    completion and in the next round's prompt; the call is still read and run."""
    tok, family = toks["qwen3"], "qwen3"
    def spelled(text):  # "Paris" one byte a token, the rest as encode writes it
        before, after = text.split("Paris", 1)
        return tok.encode(before, add_bos=False) + [tok.token_id(c) for c in "Paris"] + tok.encode(after, add_bos=False)
    call_turn = spelled(qwen_call("get_weather", city="Paris") + "<|im_end|>")
    answer = spelled("In Paris: 18°C.<|im_end|>")
    assert call_turn != tok.encode(qwen_call("get_weather", city="Paris") + "<|im_end|>", add_bos=False)  # not encode's
    prompt = tok.encode(chat.apply_chat_template([QUESTION], family, tools=TOOLS), add_bos=False)
    policy = ScriptedPolicy([prompt], [[call_turn, answer]])
    [r] = tools.rollout(policy, [prompt], tok, family, TOOLS, max_completion_len=1000, max_tool_calls=4,
                        eos_ids=stop(tok, family))
    results = tok.encode(tools.result_turn_text(family, ["18°C, sunny"]), add_bos=False)
    assert r.completion == call_turn + results + answer
    assert policy.asked[1][0] == [prompt + call_turn + results]
    assert r.messages[1] == {"role": "tool", "content": "18°C, sunny"}


# ----------------------------------------------------------------------------- bad calls become results

def test_bad_calls_become_error_results_and_the_rollout_goes_on(toks):
    tok, family = toks["qwen3"], "qwen3"
    calls = [qwen_call("boom"), qwen_call("slow"), qwen_call("launch", target="moon"), qwen_call("add", a="2", b=3),
             '<tool_call>\n{"name": "add", "arguments": {"a": 2,}}\n</tool_call>', qwen_call("add", a=2),
             qwen_call("add", a=2, b=3, c=4), qwen_call("leave"), qwen_call("add", a=2, b=3)]
    call_turn = tok.encode("\n".join(calls) + "<|im_end|>", add_bos=False)
    answer = tok.encode("Done.<|im_end|>", add_bos=False)
    prompt = tok.encode(chat.apply_chat_template([QUESTION], family, tools=TOOLS), add_bos=False)
    policy = ScriptedPolicy([prompt], [[call_turn, answer]])
    start = time.monotonic()
    [r] = tools.rollout(policy, [prompt], tok, family, TOOLS + [boom, slow, leave], max_completion_len=4000,
                        max_tool_calls=20, eos_ids=stop(tok, family), timeout_s=0.2)
    assert time.monotonic() - start < 1.5  # the sleeping tool cost its timeout, not its two seconds
    results = [m["content"] for m in r.messages if m["role"] == "tool"]
    assert results == [
        "error: boom() raised ValueError: no weather today", "error: slow() did not return within 0.2 s",
        "error: there is no tool 'launch' (the tools: get_weather, add, boom, slow, leave)",
        "error: add() argument 'a': expected integer, got string \"2\"",
        "error: the tool call is not valid JSON: Expecting property name enclosed in double quotes (line 1 column 38)",
        "error: add() is missing the argument 'b'", "error: add() takes no argument 'c' (its arguments: a, b)",
        "error: leave() raised SystemExit: 3", "5"]
    assert (r.tool_calls, r.failed_calls) == (9, 8)
    assert r.messages[-1] == {"role": "assistant", "content": "Done."}  # the model saw the errors and answered
    assert r.completion == call_turn + tok.encode(tools.result_turn_text(family, results), add_bos=False) + answer


@pytest.mark.parametrize("family, text, expected", [
    ("qwen3", "<think>Maybe <tool_call>\n{}\n</tool_call>?</think>\n\nNo call.", []),
    ("qwen3", "Sure.\n" + qwen_call("add", a=1, b=2) + "\n" + qwen_call("get_weather", city="Paris"),
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Paris"})]),
    ("qwen2", '<tool_call>\n{"name": "add"}\n</tool_call>', [("add", {})]),
    ("qwen2", "<tool_call>\n{\"name\": \"add\", \"arguments\": {}}", ["error: <tool_call> without </tool_call>"]),
    ("qwen2", '<tool_call>\n{"name": "add", "arguments": {}} {"name": "add", "arguments": {}}\n</tool_call>',
     [('error: a <tool_call> block holds one call, got \'{"name": "add", "arguments": {}} {"name": "add", '
      '"arguments": {}}\'')]),
    ("qwen2", '<tool_call>\n{"name": "add", "parameters": {}}\n</tool_call>',
     [('error: a tool call is {"name": <function name>, "arguments": <arguments object>}, got {"name": "add", '
      '"parameters": {}}')]),
    ("llama3", '{"name": "add", "parameters": {"a": 1, "b": 2}}', [("add", {"a": 1, "b": 2})]),
    ("llama3", '<|python_tag|>{"name": "add", "parameters": {"a": 1}}', [("add", {"a": 1})]),
    ("llama3", '{"name": "add", "parameters": {"a": 1', [("error: the tool call is not valid JSON: Expecting ',' "
                                                           "delimiter (line 1 column 38)")]),
    ("llama3", "The answer is 3.", []),
    ("gemma3", ('Let me look.\n{"name": "add", "parameters": {"a": 1, "b": 2}}\n{"name": "get_weather", '
               '"parameters": {"city": "Paris"}}'), [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Paris"})]),
    ("gemma3", '{"name": "add", "parameters": {"a": 1, "b": 2}}\nthat is all',
     [("add", {"a": 1, "b": 2}), "error: the tool call is not valid JSON: Expecting value (line 2 column 1)"]),
    ("gemma3", "3, since {1 + 2} is 3.", []),
    ("gemma4", "<|channel>thought\nMaybe <|tool_call>call:add{a:1,b:2}<tool_call|>?<channel|>No call.", []),
    ("gemma4", "<|channel>thought\nadd<channel|>Sure." + chat.gemma4_call("add", {"a": 1, "b": 2})
     + chat.gemma4_call("get_weather", {"city": 'Zürich, "CH" {x}'}) + "<|tool_response>",
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": 'Zürich, "CH" {x}'})]),
    ("gemma4", '<|tool_call>call:forecast{days:[1,-2.5,1e-05],region:null,x:{<|"|>k<|"|>:[true,None]}}<tool_call|>',
     [("forecast", {"days": [1, -2.5, 1e-05], "region": None, "x": {"k": [True, None]}})]),
    ("gemma4", "<|tool_call>call:add{a:1}", ["error: <|tool_call> without <tool_call|>"]),
    ("gemma4", "<|tool_call>call:add{a:1,}<tool_call|>",
     ["error: a tool call is call:<function name>{<arguments>}: expected a key at 13, got '}' in 'call:add{a:1,}'"]),
    ("gemma4", '<|tool_call>call:add{"a": 1}<tool_call|>',
     ["error: a tool call is call:<function name>{<arguments>}: expected a key at 9, got '\"a\": 1}' in "
      "'call:add{\"a\": 1}'"]),
    ("gemma4", "<|tool_call>{a:1}<tool_call|><|tool_call>call:add{a:1} <tool_call|>",
     ["error: a tool call is call:<function name>{<arguments>}: it does not open with call:<function name>{ in "
      "'{a:1}'", "error: a tool call is call:<function name>{<arguments>}: text after the arguments at 13 in "
      "'call:add{a:1} '"]),
    ("gemma4", '<|tool_call>call:f{s:<|"|>x,t:' + "[" * 5000 + "<tool_call|>",
     ["error: a tool call is call:<function name>{<arguments>}: the string opened at 9 is not closed in "
      "'call:f{s:<|\"|>x,t:" + "[" * 182 + "'"]),
    ("gemma4", "The answer is {a:1}.", [])])
def test_parse_tool_calls(family, text, expected):
    assert tools.parse_tool_calls(text, family) == expected


@pytest.mark.parametrize("fn, arguments, expected", [
    (add, {"a": 2, "b": 3}, ("5", False)),
    (get_weather, {"city": "Paris"}, ("18°C, sunny", False)),
    (forecast, {"days": [1, 2]}, ('{"days": [1, 2], "region": null}', False)),
    (forecast, {"days": [1, 2], "region": None}, ('{"days": [1, 2], "region": null}', False)),
    (forecast, {"days": [1, "2"]}, ("error: forecast() argument 'days'[1]: expected integer, got string \"2\"", True)),
    (forecast, {"days": 1}, ("error: forecast() argument 'days': expected array, got integer 1", True)),
    (get_weather, {"city": "Paris", "unit": "kelvin"},
     ('error: get_weather() argument \'unit\': expected one of ["celsius", "fahrenheit"], got "kelvin"', True)),
    (add, {"a": True, "b": 3}, ("error: add() argument 'a': expected integer, got boolean true", True)),
    (add, {"a": 2.0, "b": 3}, ("error: add() argument 'a': expected integer, got number 2.0", True)),
    (get_weather, {"city": "Rome"}, ("error: get_weather() raised KeyError: ('Rome', 'celsius')", True))])
def test_call_tool_checks_arguments_and_writes_results(fn, arguments, expected):
    assert tuple(tools.call_tool(fn, arguments, tools.function_schema(fn), timeout_s=5.0)) == expected


# ----------------------------------------------------------------------------- where a row stops

def test_limits_stop_each_row_where_they_should(toks):
    """Four rows in one batch, --max-tool-calls 2: one answers at once; one calls once, then answers; one calls
    until a turn asks for more calls than are left (two run, the third turn kept but not run); one makes one call,
    then two in a turn, one more than are left. Each round asks only the rows still going."""
    tok, family = toks["qwen3"], "qwen3"
    prompts = [tok.encode(chat.apply_chat_template([{"role": "user", "content": f"Question {i}"}], family,
                                                   tools=TOOLS), add_bos=False) for i in range(4)]
    one_call = tok.encode(qwen_call("add", a=1, b=2) + "<|im_end|>", add_bos=False)
    two_calls = tok.encode(qwen_call("add", a=1, b=2) + "\n" + qwen_call("add", a=3, b=4) + "<|im_end|>",
                           add_bos=False)
    answer = tok.encode("3<|im_end|>", add_bos=False)
    turns = [[answer], [one_call, answer], [one_call, one_call, one_call, answer], [one_call, two_calls]]
    policy = ScriptedPolicy(prompts, turns)
    out = tools.rollout(policy, prompts, tok, family, TOOLS, max_completion_len=1000, max_tool_calls=2,
                        eos_ids=stop(tok, family))
    result = tok.encode(tools.result_turn_text(family, ["3"]), add_bos=False)
    assert out[0].completion == answer and out[0].loss_mask == [1] * len(answer) and out[0].tool_calls == 0
    assert out[1].completion == one_call + result + answer and out[1].tool_calls == 1
    assert out[2].completion == 2 * (one_call + result) + one_call and out[2].tool_calls == 2
    assert out[2].messages[-1]["tool_calls"] == [call("add", a=1, b=2)]  # the call that was not run
    assert out[3].completion == one_call + result + two_calls and out[3].tool_calls == 1
    assert [len(prompts) for prompts, _ in policy.asked] == [4, 3, 1]
    assert policy.given == [1, 2, 3, 2]


def test_the_budget_counts_tool_tokens_and_cuts_where_it_runs_out(toks):
    tok, family = toks["qwen3"], "qwen3"
    prompt = tok.encode(chat.apply_chat_template([QUESTION], family, tools=TOOLS), add_bos=False)
    call_turn = tok.encode(qwen_call("add", a=1, b=2) + "<|im_end|>", add_bos=False)
    answer = tok.encode("It is 3.<|im_end|>", add_bos=False)
    result = tok.encode(tools.result_turn_text(family, ["3"]), add_bos=False)
    run = {"tok": tok, "family": family, "tools": TOOLS, "max_tool_calls": 5, "eos_ids": stop(tok, family)}

    # cut inside the result turn: the row ends there, its last tokens the tool's (mask 0), no round after
    budget = len(call_turn) + 4
    policy = ScriptedPolicy([prompt], [[call_turn, answer]])
    [r] = tools.rollout(policy, [prompt], max_completion_len=budget, **run)
    assert r.completion == call_turn + result[:4] and r.loss_mask[-4:] == [0] * 4 and policy.given == [1]

    # the next turn gets what the result turn left, and is cut there: the cut turn's calls are not run
    budget = len(call_turn + result) + 5
    policy = ScriptedPolicy([prompt], [[call_turn, call_turn]])
    [r] = tools.rollout(policy, [prompt], max_completion_len=budget, **run)
    assert [n for _, n in policy.asked] == [budget, 5]
    assert r.completion == call_turn + result + call_turn[:5] and r.tool_calls == 1 and len(r.completion) == budget
    assert r.logprobs[-5:] == [sampler_logprob(t) for t in call_turn[:5]]

    # a result turn that ends exactly at the budget leaves nothing to generate: the row stops
    budget = len(call_turn + result)
    policy = ScriptedPolicy([prompt], [[call_turn, answer]])
    [r] = tools.rollout(policy, [prompt], max_completion_len=budget, **run)
    assert r.completion == call_turn + result and policy.given == [1]


def test_tools_need_distinct_names():
    def add(x: int) -> int:
        """Another add.

        Args:
            x: a number
        """
    with pytest.raises(ValueError, match="share a name"):
        tools.rollout(None, [[1]], None, "qwen3", [globals()["add"], add], max_completion_len=8, max_tool_calls=1,
                      eos_ids=(0,))


def test_without_thinking_each_result_turn_opens_an_empty_think_block(toks):
    """Qwen 3 with --no-enable-thinking: its generation prompt ends in an empty <think> block, so every result
    turn, which ends in that generation prompt, does too; the other families have no such switch."""
    tok, family = toks["qwen3"], "qwen3"
    messages = [QUESTION, {"role": "assistant", "content": "", "tool_calls": [call("add", a=1, b=2)]},
                {"role": "tool", "content": "3"}]
    text = tools.result_turn_text(family, ["3"], enable_thinking=False)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat.apply_chat_template(messages, family, enable_thinking=False).endswith(text)
    assert tools.result_turn_text("llama3", ["3"], enable_thinking=False) == tools.result_turn_text("llama3", ["3"])
    prompt = tok.encode(chat.apply_chat_template([QUESTION], family, tools=TOOLS, enable_thinking=False),
                        add_bos=False)
    turns = [tok.encode(qwen_call("add", a=1, b=2) + "<|im_end|>", add_bos=False), tok.encode("3<|im_end|>")]
    [r] = tools.rollout(ScriptedPolicy([prompt], [turns]), [prompt], tok, family, TOOLS, max_completion_len=1000,
                        max_tool_calls=1, eos_ids=stop(tok, family), enable_thinking=False)
    assert r.completion == turns[0] + tok.encode(text, add_bos=False) + turns[1]


# ----------------------------------------------------------------------------- Gemma 4: calls and results in one turn

GEMMA4_RESULTS = re.compile(r"response:.*?<tool_response\|>(?:<\|tool_response>response:.*?<tool_response\|>)*",
                            re.DOTALL)  # a run of results after the <|tool_response> the model stopped at
GEMMA4_CONVERSATION = [  # TWO_CALLS without text beside calls: the template moves such text after the results
    QUESTION, {"role": "assistant", "content": "", "tool_calls": TWO_CALLS[1]["tool_calls"]},
    {"role": "tool", "content": "18°C, sunny", "name": "get_weather"},
    {"role": "tool", "content": "64°F, rain", "name": "get_weather"},
    {"role": "assistant", "content": "", "tool_calls": [call("add", a=2, b=3)]}, {"role": "tool", "content": "5",
                                                                                  "name": "add"}, ANSWER]


def test_gemma4_scripted_policy_yields_the_rendered_conversation(toks):
    """Gemma 4: the model's calls end at <|tool_response> (where the rollout stops it), each run of results goes on
    inside the same model turn, named by its calls, and <turn|> ends the answer: the tokens are the published
    template's conversation, mask 0 exactly on the results."""
    from transformers.utils.chat_template_utils import render_jinja_template
    tok, family = toks["gemma4"], "gemma4"
    messages = [SYSTEM] + GEMMA4_CONVERSATION
    text = chat.apply_chat_template(messages, family, add_generation_prompt=False, tools=TOOLS, enable_thinking=True)
    template = (pathlib.Path(__file__).parent / "chat_templates" / "gemma4.jinja").read_text()
    ref, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=False,
                                   tools=[tools.function_schema(t) for t in TOOLS], enable_thinking=True,
                                   bos_token="<bos>")
    assert text == ref[0]
    prompt_text = chat.apply_chat_template(messages[:2], family, tools=TOOLS, enable_thinking=True)
    assert text.startswith(prompt_text) and text.endswith("<turn|>\n")
    body, pieces, position = text[len(prompt_text):-1], [], 0  # the model's turn (its newline no model samples)
    for results in GEMMA4_RESULTS.finditer(body):
        pieces += [(body[position:results.start()], True), (results[0], False)]
        position = results.end()
    pieces.append((body[position:], True))
    assert [p.endswith("<|tool_response>") for p, sampled in pieces if sampled] == [True, True, False]
    prompt = tok.encode(prompt_text, add_bos=False)
    turns = [tok.encode(piece, add_bos=False) for piece, sampled in pieces if sampled]
    policy = ScriptedPolicy([prompt], [turns])
    [r] = tools.rollout(policy, [prompt], tok, family, TOOLS, max_completion_len=4096, max_tool_calls=10,
                        eos_ids=stop(tok, family))  # <turn|> alone: the rollout adds <|tool_response>
    assert prompt + r.completion == tok.encode(text, add_bos=False)[:-1]
    assert r.loss_mask == [int(sampled) for piece, sampled in pieces for _ in tok.encode(piece, add_bos=False)]
    tool_messages = [m for m in messages if m["role"] == "tool"]
    assert [m for m in r.messages if m["role"] == "tool"] == tool_messages  # contents and their calls' names
    assert (r.tool_calls, r.failed_calls) == (3, 0)
    said = [m for m in r.messages if m["role"] == "assistant"]
    assert [m.get("tool_calls", []) for m in said] == [m.get("tool_calls", []) for m in messages
                                                         if m["role"] == "assistant"]
    assert said[-1]["content"] == ANSWER["content"]
    names = [m["name"] for m in tool_messages[:2]]
    assert tools.result_turn_text(family, [m["content"] for m in tool_messages[:2]], names=names) == pieces[1][0]


def test_gemma4_calls_stop_at_tool_response_and_bad_calls_get_named_errors(toks):
    """A turn of calls ends at <|tool_response> (tool_stop_ids adds it); one that <turn|> ends makes no call; a
    malformed call's result is named "unknown" (the template's name for a result without a call)."""
    tok, family = toks["gemma4"], "gemma4"
    assert chat.tool_stop_ids(tok, family, stop(tok, family)) == (*stop(tok, family), tok.token_id("<|tool_response>"))
    assert chat.tool_stop_ids(toks["qwen3"], "qwen3", stop(toks["qwen3"], "qwen3")) == stop(toks["qwen3"], "qwen3")
    prompt = tok.encode(chat.apply_chat_template([QUESTION], family, tools=TOOLS), add_bos=False)
    bad = tok.encode(chat.gemma4_call("add", {"a": 1, "b": 2}) + "<|tool_call>call:add{a:1,}<tool_call|>"
                     + "<|tool_response>", add_bos=False)
    ended = tok.encode(chat.gemma4_call("add", {"a": 1, "b": 2}) + "<turn|>", add_bos=False)
    [r] = tools.rollout(ScriptedPolicy([prompt], [[bad, ended]]), [prompt], tok, family, TOOLS,
                        max_completion_len=1000, max_tool_calls=5, eos_ids=stop(tok, family))
    error = "error: a tool call is call:<function name>{<arguments>}: expected a key at 13, got '}' in 'call:add{a:1,}'"
    results = tok.encode('response:add{value:<|"|>3<|"|>}<tool_response|><|tool_response>response:unknown{value:'
                         f'<|"|>{error}<|"|>}}<tool_response|>', add_bos=False)
    assert r.completion == bad + results + ended and (r.tool_calls, r.failed_calls) == (2, 1)
    assert r.messages[-1] == {"role": "assistant", "content": chat.gemma4_call("add", {"a": 1, "b": 2})}
    deep = "<|tool_call>call:f{t:" + "[" * 5000 + "]" * 5000 + "}<tool_call|>"
    assert tools.parse_tool_calls(deep, family)[0].startswith("error: a tool call is call:")  # no RecursionError


def test_gemma4_warm_up_conversations_end_calls_at_tool_response(toks):
    """tools.scripted (grpo's demo warm-up, tasks.calculator_conversations) ends a turn of calls where a sampled one
    ends: at <|tool_response>, the answer at <turn|>."""
    tok, family = toks["gemma4"], "gemma4"
    prompt = tok.encode(chat.apply_chat_template([QUESTION], family, tools=TOOLS), add_bos=False)
    r = tools.scripted(prompt, [chat.gemma4_call("add", {"a": 2, "b": 3}), "5"], tok, family, TOOLS,
                       tok.token_id("<turn|>"), 1000)
    assert r.completion == tok.encode(chat.gemma4_call("add", {"a": 2, "b": 3}) + "<|tool_response>"
                                      + 'response:add{value:<|"|>5<|"|>}<tool_response|>5<turn|>', add_bos=False)
