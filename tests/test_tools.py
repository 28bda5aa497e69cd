"""tools.py against transformers' get_json_schema; tool turns in chat.py against the published Jinja templates,
rendered by transformers' own apply_chat_template, text and token ids both."""
from __future__ import annotations

import ast
import enum
import json
import pathlib
from typing import Any, Literal, Optional

import pytest
import tokenizers
import transformers
from transformers.utils import get_json_schema

import chat
import tokenizer
import tools
from tools import function_schema

ROOT = pathlib.Path(__file__).parent.parent
TEMPLATES = pathlib.Path(__file__).parent / "chat_templates"  # published templates, verbatim
DATE = "26 Jul 2024"


# ----------------------------------------------------------------------------- tools: a function's JSON schema

def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Today's weather in a city, e.g. "18°C, sunny".

    Args:
        city: the city's name, in any language
        unit: the temperature unit

    Returns:
        The temperature and the sky, as text.
    """


def add(a: int, b: int) -> int:
    """Add two integers: a + b & nothing <else>.

    Args:
        a: the first number
        b: the second number,
            described over two lines
    """
    return a + b


def scalars(n: int, x: float, name: str, flag: bool = False):
    """Every JSON scalar.

    Args:
        n: an integer
        x: a float
        name: a string
        flag: a boolean with a default
    """


# Optional[...] and a None default on a plain type on purpose: users write them, transformers reads them.
def containers(ids: list[int], names: list | None, scores: dict[str, float], pair: tuple[int, str],
               grid: list[list[float]] = (), meta: dict = None,  # noqa: RUF013
               tags: Optional[list[str]] = None):  # noqa: UP045
    """Lists, dicts and tuples, some optional.

    Args:
        ids: integer ids
        names: names, or nothing
        scores: a score per name
        pair: a number and a label
        grid: rows of numbers
        meta: anything
        tags: labels
    """


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


def choices(mode: Literal["fast", "slow"], level: Literal[1, 2, "max"], drink: str, size: int | str,
            colour: Colour, anything: Any, maybe: Optional[int] = None) -> dict[str, int]:  # noqa: UP045
    """Enums three ways, unions and Any.

    Args:
        mode: how fast
        level: a level or "max"
        drink: what to drink (choices: ["tea", "coffee"])
        size: a size
        colour: a colour
        anything: whatever
        maybe: an optional integer
    Returns:
        counts by name
    """


def no_arguments() -> None:
    """Takes nothing."""


class Calculator:
    def multiply(self, x: float, y: float) -> float:
        """Multiply two numbers.

        Args:
            x: the first
            y: the second
        """
        return x * y


@pytest.mark.parametrize("fn", [get_weather, add, scalars, containers, choices, no_arguments, Calculator().multiply])
def test_function_schema_matches_transformers(fn):
    ours, ref = function_schema(fn), get_json_schema(fn)
    assert ours == ref
    assert json.dumps(ours) == json.dumps(ref)  # the key order too: templates write the schema as JSON


def no_docstring(x: int):
    pass


def untyped(x: int, y):
    """Untyped y.

    Args:
        x: typed
        y: untyped
    """


def undescribed(x: int, y: int):
    """Only x is described.

    Args:
        x: typed
    """


def custom_class(x: Calculator):
    """A parameter JSON cannot describe.

    Args:
        x: a calculator
    """


def one_tuple(x: tuple[int]):
    """A one-element tuple.

    Args:
        x: a tuple
    """


@pytest.mark.parametrize("fn, message", [
    (no_docstring, "tool no_docstring: no docstring"), (untyped, "tool untyped: parameter 'y' has no type hint"),
    (undescribed, "tool undescribed: parameter 'y' has no description"),
    (custom_class, "tool custom_class: parameter 'x': cannot write the type hint"),
    (one_tuple, "tool one_tuple: parameter 'x': cannot write the type hint")])
def test_function_schema_rejects_bad_functions(fn, message):
    with pytest.raises(ValueError, match=message) as e:
        function_schema(fn)
    assert "\n" not in str(e.value)


def test_library_never_imports_transformers():
    for file in ("tools.py", "chat.py"):
        tree = ast.parse((ROOT / file).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(name.split(".")[0] == "transformers" for name in imported), file


# ----------------------------------------------------------------------------- chat: tool turns vs the templates

def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You are a careful assistant.\nUse the tools. "}
QUESTION = {"role": "user", "content": " What is the weather in Paris and in Zürich, and what is 2+3?\n"}
ANSWER = {"role": "assistant", "content": "Paris: 18°C, sunny. Zürich: 64°F, rain. 2+3 = 5."}
TWO_CALLS = [  # two calls in one turn, two results in a row, a call after text, then the answer
    QUESTION,
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris"),
                                                        call("get_weather", city="Zürich", unit="fahrenheit")]},
    {"role": "tool", "content": "18°C, sunny"}, {"role": "tool", "content": "64°F, rain"},
    {"role": "assistant", "content": "Now the sum.", "tool_calls": [call("add", a=2, b=3)]},
    {"role": "tool", "content": "5"}, ANSWER]
ONE_CALL_EACH = [  # Llama 3's template takes one call per assistant turn
    QUESTION, {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
    {"role": "tool", "content": "18°C, sunny"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Zürich", unit="fahrenheit")]},
    {"role": "tool", "content": "64°F, rain"},
    {"role": "assistant", "content": "", "tool_calls": [call("add", a=2, b=3)]},
    {"role": "tool", "content": "5"}, ANSWER]
REASONING = [  # Qwen 3 keeps reasoning after the last user query only, tool-call turns included
    {"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "<think>Easy.</think>5"},
    QUESTION, {"role": "assistant", "content": "<think>\nI need the weather.\n</think>\n\n",
               "tool_calls": [call("get_weather", city="Paris"), call("get_weather", city="Zürich")]},
    {"role": "tool", "content": "18°C, sunny"}, {"role": "tool", "content": "9°C, rain"},
    {"role": "assistant", "content": "And the sum.", "reasoning_content": "Check 2+3 too.",
     "tool_calls": [call("add", a=2, b=3)]},
    {"role": "user", "content": "<tool_response>\n5\n</tool_response>"},  # a result sent as a user message: no query
    {"role": "assistant", "content": "<think>All known.</think>Paris is warmer; 2+3 = 5."}]
CONVERSATIONS = {
    "qwen2": {"two calls": TWO_CALLS, "one call each": ONE_CALL_EACH},
    "qwen3": {"two calls": TWO_CALLS, "one call each": ONE_CALL_EACH, "reasoning": REASONING},
    "llama3": {"one call each": ONE_CALL_EACH, "two results in a row": ONE_CALL_EACH[:3] + TWO_CALLS[3:4] + [ANSWER]},
    "gemma4": {"two calls": TWO_CALLS, "one call each": ONE_CALL_EACH},
}
TOOLS = [get_weather, add]
CONTROL_TOKENS = {"qwen2": ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>",
                            "</tool_response>"],
                  "qwen3": ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>",
                            "</tool_response>", "<think>", "</think>"],
                  "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                             "<|python_tag|>"],
                  "gemma4": ["<bos>", "<|turn>", "<turn|>", "<|think|>", "<|tool>", "<tool|>", "<|tool_call>",
                             "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<|channel>",
                             "<channel|>"]}
BOS = {"llama3": "<|begin_of_text|>", "gemma4": "<bos>"}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Per family, a saved transformers tokenizer carrying the published template: one token per byte plus the
    family's control tokens, so ids differ wherever the text or a control token's placement does."""
    dirs = {}
    for family, control in CONTROL_TOKENS.items():
        alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        tok.add_special_tokens(control)
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS.get(family),
                                                  eos_token=chat.END_OF_TURN[family],
                                                  chat_template=(TEMPLATES / f"{family}.jinja").read_text())
        dirs[family] = tmp_path_factory.mktemp(family)
        hf.save_pretrained(dirs[family])
    return dirs


def render_both(directory, family, messages, gen, tools, **kw):
    """(ours, reference) as (text, ids): chat.apply_chat_template encoded by our tokenizer, and transformers'
    apply_chat_template with the published template, the same tools and (for Llama) the same date."""
    ref_tok, our_tok = transformers.AutoTokenizer.from_pretrained(directory), tokenizer.load_tokenizer(directory)
    ref_kw = dict(kw, date_string=DATE) if family == "llama3" else kw
    ours_kw = dict(kw, date=DATE) if family == "llama3" else kw
    ref_text = ref_tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen, **ref_kw)
    ref_ids = ref_tok.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=gen,
                                          **ref_kw)["input_ids"]
    text = chat.apply_chat_template(messages, family, gen, tools=tools, **ours_kw)
    return (text, our_tok.encode(text, add_bos=False)), (ref_text, ref_ids)


CASES = [(family, name) for family, conversations in CONVERSATIONS.items() for name in conversations]


@pytest.mark.parametrize("system", [True, False], ids=["system", "no system"])
@pytest.mark.parametrize("family, name", CASES)
def test_tool_turns_match_published_template(tokenizer_dirs, family, name, system):
    messages = [SYSTEM] * system + CONVERSATIONS[family][name]
    for gen in (True, False):
        for tools in (TOOLS, [function_schema(f) for f in TOOLS]):
            (text, ids), (ref_text, ref_ids) = render_both(tokenizer_dirs[family], family, messages, gen, tools)
            assert text == ref_text
            assert ids == ref_ids
        (text, ids), (ref_text, ref_ids) = render_both(tokenizer_dirs[family], family, messages, gen, None)
        assert (text, ids) == (ref_text, ref_ids)  # calls and results render without a tool list too


RICH_CALL = [QUESTION, {"role": "assistant", "content": "", "tool_calls": [  # every kind of value Gemma 4 writes
    call("get_weather", city='Zürich, "CH" {x}: [1]', unit=""),
    call("forecast", days=[1, -2, 2.5, 1e-05, 1e20],
         flags={"on": True, "off": False, "none": None, "deep": {"x": []}})]}]


@pytest.mark.parametrize("family, name", CASES + [("gemma4", "rich")])
def test_calls_read_back_from_the_published_template(tokenizer_dirs, family, name):
    """Round trip: each assistant turn of calls as the published template writes it, parsed by parse_tool_calls,
    gives the calls it was written from."""
    messages = RICH_CALL if name == "rich" else CONVERSATIONS[family][name]
    kw = {"enable_thinking": True} if family in ("qwen3", "gemma4") else {}  # Gemma 4's generation prompt is then
    # the turn's opening
    for i, m in enumerate(messages):
        if not m.get("tool_calls"):
            continue
        (_, _), (before, _) = render_both(tokenizer_dirs[family], family, messages[:i], True, None, **kw)
        (ours, _), (after, _) = render_both(tokenizer_dirs[family], family, messages[:i + 1], False, None, **kw)
        assert ours == after and after.startswith(before)
        turn = after[len(before):].split(chat.END_OF_TURN[family])[0]
        expected = [(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
        assert tools.parse_tool_calls(turn, family) == expected, turn
        assert tools.parse_tool_calls(chat.assistant_turn_text(m, family), family) == expected


@pytest.mark.parametrize("system", [True, False], ids=["system", "no system"])
def test_llama3_tools_in_system_message(tokenizer_dirs, system):
    messages = [SYSTEM] * system + ONE_CALL_EACH
    for gen in (True, False):
        ours, ref = render_both(tokenizer_dirs["llama3"], "llama3", messages, gen, TOOLS, tools_in_user_message=False)
        assert ours == ref
        assert "Given the following functions" not in ours[0] and '"name": "get_weather"' in ours[0]


def test_llama3_refuses_two_calls_in_one_turn_as_its_template_does(tokenizer_dirs):
    ref_tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs["llama3"])
    with pytest.raises(Exception, match="only supports single tool-calls"):
        ref_tok.apply_chat_template(TWO_CALLS, tools=TOOLS, tokenize=False, date_string=DATE)
    with pytest.raises(ValueError, match="one tool call per assistant turn, got 2"):
        chat.apply_chat_template(TWO_CALLS, "llama3", tools=TOOLS, date=DATE)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3"])
def test_empty_tool_list_matches_published_template(tokenizer_dirs, family):
    """An empty list is no tool list for Qwen (`if tools`), but still a tool header for Llama (`tools is not none`)."""
    ours, ref = render_both(tokenizer_dirs[family], family, [SYSTEM, QUESTION], True, [])
    assert ours == ref


def test_assistant_content_may_be_none_beside_tool_calls():
    with_none = [QUESTION, {"role": "assistant", "content": None, "tool_calls": [call("add", a=2, b=3)]}]
    without = [QUESTION, {"role": "assistant", "tool_calls": [call("add", a=2, b=3)]}]
    for family in ("gemma3", "qwen2", "qwen3", "llama3"):
        empty = chat.apply_chat_template([QUESTION, dict(with_none[1], content="")], family, tools=TOOLS)
        assert chat.apply_chat_template(with_none, family, tools=TOOLS) == empty
        assert chat.apply_chat_template(without, family, tools=TOOLS) == empty


def test_bad_tool_turns_are_refused():
    bad_call = {"role": "assistant", "content": "", "tool_calls": [call("add", a=2) | {"function": {"name": "add",
                                                                                                   "arguments": "{}"}}]}
    with pytest.raises(ValueError, match="message 1: a tool call is"):
        chat.apply_chat_template([QUESTION, bad_call], "qwen3")
    with pytest.raises(ValueError, match="message 1: expected"):
        chat.apply_chat_template([QUESTION, {"role": "tool", "content": None}], "qwen3")
    with pytest.raises(ValueError, match="tools: expected functions or JSON schemas"):
        chat.apply_chat_template([QUESTION], "qwen3", tools=["get_weather"])
    with pytest.raises(ValueError, match="tool no_docstring: no docstring"):
        chat.apply_chat_template([QUESTION], "qwen3", tools=[no_docstring])


# ----------------------------------------------------------------------------- Gemma: tools as text

def test_gemma_tools_as_googles_guide_writes_them():
    """Gemma's templates have no tool turns: the instruction and the tool list open the first user turn, calls are
    JSON lines in the model turn, and a run of results is one user turn of ```tool_output``` blocks."""
    messages = [SYSTEM] + TWO_CALLS[:4]
    schema = json.dumps([function_schema(add)["function"]], indent=2, ensure_ascii=False)
    assert schema.startswith('[\n  {\n    "name": "add",\n    "description": "Add two integers')
    assert chat.apply_chat_template(messages, "gemma3", tools=[add]) == (
        "<bos><start_of_turn>user\nYou are a careful assistant.\nUse the tools. \n\n"
        "You have access to functions. If you decide to invoke any of the function(s),\n"
        " you MUST put it in the format of\n"
        '{"name": function name, "parameters": dictionary of argument name and its value}\n\n'
        "You SHOULD NOT include any other text in the response if you call a function\n"
        f"{schema}\nWhat is the weather in Paris and in Zürich, and what is 2+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}\n'
        '{"name": "get_weather", "parameters": {"city": "Zürich", "unit": "fahrenheit"}}<end_of_turn>\n'
        "<start_of_turn>user\n```tool_output\n18°C, sunny\n```\n```tool_output\n64°F, rain\n```<end_of_turn>\n"
        "<start_of_turn>model\n")
    final = chat.apply_chat_template(messages + TWO_CALLS[4:], "gemma", tools=[add], add_generation_prompt=False)
    assert final.endswith('<start_of_turn>model\nNow the sum.\n{"name": "add", "parameters": {"a": 2, "b": 3}}'
                          "<end_of_turn>\n<start_of_turn>user\n```tool_output\n5\n```<end_of_turn>\n"
                          f"<start_of_turn>model\n{ANSWER['content']}<end_of_turn>\n")
    with pytest.raises(ValueError, match="alternate"):  # a result still needs a call before it, turn for turn
        chat.apply_chat_template([QUESTION, TWO_CALLS[2]], "gemma3")


@pytest.mark.parametrize("family", ["gemma", "gemma3", "qwen2", "qwen3", "llama3"])
def test_without_tools_nothing_changes(family):
    """tools=None (and, for the families whose templates test `if tools`, tools=[]) renders exactly what the
    published template renders without tools, on test_data.py's conversations."""
    import test_data
    kw, ref_kw = ({"date": DATE}, {"date_string": DATE}) if family == "llama3" else ({}, {})
    for messages in test_data.CONVERSATIONS.values():
        if family == "gemma" and messages[0]["role"] == "system":
            continue  # Gemma 1/2's template refuses a system message (test_data.py compares these with Gemma 3's)
        expected = test_data.reference(family, messages, True, **ref_kw)
        assert chat.apply_chat_template(messages, family, tools=None, **kw) == expected
        if family != "llama3":
            assert chat.apply_chat_template(messages, family, tools=[], **kw) == expected
