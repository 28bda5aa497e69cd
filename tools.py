"""tools.py — tools a chat model can call: plain Python functions, described to the model as JSON schemas, and
the multi-turn rollout that lets a model call them while it is sampled.

A tool is a function with type hints and a Google-style docstring (a description, then "Args:" with one
"name: description" per parameter). chat.apply_chat_template(..., tools=[fn]) lists it in the prompt through
function_schema, whose output is the schema transformers' get_json_schema writes (tests/test_tools.py holds the
two equal), so a model sees the same tool list here as there; the library itself never imports transformers.

    function_schema(get_weather)   # → {"type": "function", "function": {"name": "get_weather", ...}}

rollout() samples a conversation in rounds, token in and token out. Each round the policy continues every row
still going (its prompt ids + all its completion ids so far) up to its end-of-turn token; the turn's calls are
parsed from its decoded text in the family's format (parse_tool_calls) and run (call_tool), and the result turn
(result_turn_text: what chat.apply_chat_template writes between that end-of-turn and the next assistant turn's
first token) is tokenized and appended. The model's ids are never decoded and encoded again, so the completion
is exactly what was sampled and equals the rendered conversation's tokens. For Qwen:

    completion   model turn                  result turn                                       model turn
                 <tool_call>...<|im_end|>    \n<|im_start|>user\n<tool_response>...assistant\n    5.<|im_end|>
    loss_mask    1 ... 1                     0 ... 0                                           1 ... 1
    logprobs     the sampler's               0.0 ... 0.0                                       the sampler's

Tool-result tokens are context, not actions: mask 0 (no loss, so no gradient through them) and no sampler
log-prob. A row stops when it answers without a call, when a turn asks for more calls than --max-tool-calls
leaves, or when the completion (tool tokens included) fills --max-completion-len. A bad call never ends a
run: malformed JSON, an unknown tool, arguments that do not fit the schema, an exception or a timeout each
come back to the model as one "error: ..." result. The model's text is only ever read by json.loads.

generate() is rollout() sampled by engine.generate (or one plain turn each, without tools), Sampler binds it to a
script's settings and scores what it drew (score: with tools, the reward functions read the final answer and the
conversation's messages), and load() reads --tools ("calculator", or "module:fn1,fn2" / "file.py:fn").
"""
from __future__ import annotations

import enum
import importlib
import importlib.util
import inspect
import itertools
import json
import pathlib
import re
import threading
import types
import typing
from typing import NamedTuple

import numpy as np

JSON_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
JSON_TYPES = {**JSON_SCALARS, list: "array", tuple: "array", dict: "object"}  # containers bare, without element types

# A docstring's sections, split the way transformers splits them (so the descriptions come out the same):
# the description runs up to the first section header; Args: and Returns: need a line of their own.
DESCRIPTION = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.DOTALL)
ARGS = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.DOTALL)
RETURNS = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.DOTALL)
ARG_LINE = re.compile(r"([ \t]*)(\w+):\s*(.*)")  # "    name: description"
CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)  # "... (choices: ["tea", "coffee"])"


def _enum_schema(values: list) -> dict:
    """{"type", "enum"} for a list of JSON scalars; "type" lists each JSON type once, in order of appearance."""
    if any(type(v) not in JSON_SCALARS for v in values):
        raise ValueError(f"enum values must be JSON scalars (int, float, str, bool, None), got {values!r}")
    names = list(dict.fromkeys(JSON_SCALARS[type(v)] for v in values))
    return {"type": names[0] if len(names) == 1 else names, "enum": values}


def _type_schema(hint) -> dict:
    """The JSON schema of one type hint: scalars, list[X], tuple[X, Y], dict[str, X], Literal, Enum, unions
    (None in a union adds "nullable": true), Any ({}). Anything else raises ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return {}
    if origin is None and isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_schema([member.value for member in hint])
    if origin is None and hint in JSON_TYPES:
        return {"type": JSON_TYPES[hint]}
    if origin is typing.Literal:
        return _enum_schema(list(args))
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if origin is tuple and len(args) > 1 and ... not in args:
        return {"type": "array", "prefixItems": [_type_schema(t) for t in args]}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1])} if args else {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        subtypes = [_type_schema(t) for t in args if t is not type(None)]
        if len(subtypes) == 1:
            schema = subtypes[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subtypes):  # int | str
            names = sorted({s["type"] for s in subtypes})
            schema = {"type": names[0] if len(names) == 1 else names}
        else:  # subtypes with items or enums keep them under anyOf
            schema = {"anyOf": subtypes}
        return {**schema, "nullable": True} if type(None) in args else schema
    raise ValueError(f"cannot write the type hint {hint!r} as JSON schema (tuple[X] and tuple[X, ...] included: "
                     "use list[X])")


def _arg_descriptions(args_block: str) -> dict[str, str]:
    """{name: description} from the lines under Args:. A "name:" line starts a parameter unless it is indented
    deeper than the line that started the current one; the lines of a description are joined by spaces."""
    found, indent, name = {}, None, None
    for line in filter(str.strip, args_block.split("\n")):
        match = ARG_LINE.match(line)
        if match and (indent is None or len(match[1]) <= indent):
            indent, name = len(match[1]), match[2]
            found[name] = match[3]
        elif name is not None:
            found[name] += "\n" + line
    return {name: re.sub(r"\s*\n+\s*", " ", text.strip()) for name, text in found.items()}


def function_schema(fn: typing.Callable) -> dict:
    """{"type": "function", "function": {"name", "description", "parameters", ["return"]}} for a plain function:
    each parameter's JSON type from its type hint and its description from the docstring's Args: section
    (a trailing "(choices: [...])" becomes an "enum"); parameters without a default are "required". A return
    type hint, where one can be written as JSON, becomes "return" with the Returns: section as its description.
    A function without a docstring, or a parameter without a type hint or a description, raises ValueError."""
    name, doc = fn.__name__, inspect.getdoc(fn)
    if not doc or not doc.strip():
        raise ValueError(f"tool {name}: no docstring (it is the function's description for the model)")
    doc = doc.strip()
    args_block, returns = ARGS.search(doc), RETURNS.search(doc)
    descriptions = _arg_descriptions(args_block[1]) if args_block else {}
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for param in inspect.signature(fn).parameters.values():
        if param.name not in hints:
            raise ValueError(f"tool {name}: parameter {param.name!r} has no type hint")
        if param.name not in descriptions:
            raise ValueError(f"tool {name}: parameter {param.name!r} has no description under Args: in the docstring")
        try:
            schema = _type_schema(hints[param.name])
        except ValueError as e:
            raise ValueError(f"tool {name}: parameter {param.name!r}: {e}") from None
        description, choices = descriptions[param.name], CHOICES.search(descriptions[param.name])
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices[1])]
            description = description[:choices.start()].strip()
        properties[param.name] = {**schema, "description": description}
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    parameters = {"type": "object", "properties": properties} | ({"required": required} if required else {})
    function = {"name": name, "description": DESCRIPTION.search(doc)[1].strip(), "parameters": parameters}
    if "return" in hints:  # the model never writes the return value: a type JSON cannot describe is left out
        try:
            function["return"] = _type_schema(hints["return"])
        except ValueError:
            pass
        else:
            function["return"] |= {"description": returns[1].strip()} if returns else {}
    return {"type": "function", "function": function}


# ----------------------------------------------------------------------------- calls: parse, check, run

# How each family writes a call (chat.py renders them so): Qwen one {"name", "arguments"} object per
# <tool_call> block after any text; Llama 3.1 a whole message that is one {"name", "parameters"} object;
# Gemma {"name", "parameters"} objects, one a line, after any text; Gemma 4 call:name{key:value,...} in a
# <|tool_call> block each, after its thoughts (chat.gemma4_call writes them, chat.gemma4_calls reads them).
ARGUMENTS_KEY = {"qwen2": "arguments", "qwen3": "arguments", "llama3": "parameters", "gemma": "parameters",
                 "gemma2": "parameters", "gemma3": "parameters"}
QWEN_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.DOTALL)
GEMMA_CALLS = re.compile(r"^[ \t]*\{", re.MULTILINE)  # the first line that opens a JSON object
# Markers the tokenizer may hold as special tokens (decode drops those): written back when a turn is decoded.
TURN_MARKERS = {"qwen2": ("<tool_call>", "</tool_call>"),
                "qwen3": ("<tool_call>", "</tool_call>", "<think>", "</think>"), "llama3": ("<|python_tag|>",),
                "gemma4": ("<|tool_call>", "<tool_call|>", '<|"|>', "<|channel>", "<channel|>", "<|tool_response>",
                           "<tool_response|>")}


def _call_of(obj, arguments_key: str) -> tuple[str, dict] | str:
    """(name, arguments) of one parsed call object, or the error text for the model."""
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and set(obj) <= {"name", arguments_key} \
            and isinstance(obj.get(arguments_key, {}), dict):
        return obj["name"], obj.get(arguments_key, {})
    return (f'error: a tool call is {{"name": <function name>, "{arguments_key}": <arguments object>}}, got '
            + json.dumps(obj, ensure_ascii=False)[:200])


def _json_calls(text: str, arguments_key: str) -> list[tuple[str, dict] | str]:
    """The JSON call objects in text, one after another (whitespace or ";" between them); a part that is not
    JSON ends the list with an error for the model."""
    calls, decoder, position = [], json.JSONDecoder(), 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] == ";"):
            position += 1
        if position == len(text):
            return calls
        try:
            obj, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            return calls + [f"error: the tool call is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})"]
        calls.append(_call_of(obj, arguments_key))


def _qwen_call(body: str, closing: str, arguments_key: str) -> tuple[str, dict] | str:
    """The call in one <tool_call> block's body, or the error text for the model."""
    if not closing:
        return "error: <tool_call> without </tool_call>"
    calls = _json_calls(body.strip(), arguments_key)
    return calls[0] if len(calls) == 1 else f"error: a <tool_call> block holds one call, got {body.strip()!r}"[:300]


def parse_tool_calls(text: str, family: str) -> list[tuple[str, dict] | str]:
    """The calls in an assistant turn's text (without its end-of-turn token), in the family's format: each a
    (name, arguments) pair, or, for a call that is malformed, the "error: ..." text its result will be, so that a
    bad call costs one result and not the run. [] when the turn calls nothing. Qwen: each <tool_call> block after
    the reasoning (calls drafted inside <think> are not made); Llama 3: a message that starts with "{" (after an
    optional <|python_tag|>) is a call; Gemma: from the first line that starts with "{" on, JSON call lines;
    Gemma 4: each <|tool_call> block after the thoughts (after the last <channel|>)."""
    if family == "gemma4":
        import chat  # here: chat imports this module
        return chat.gemma4_calls(text.split("<channel|>")[-1])
    key = ARGUMENTS_KEY[family]
    if family.startswith("qwen"):
        return [_qwen_call(body, closing, key) for body, closing in QWEN_CALL.findall(text.split("</think>")[-1])]
    if family == "llama3":
        text = text.strip().removeprefix("<|python_tag|>").lstrip()
        return _json_calls(text, key) if text.startswith("{") else []
    first = GEMMA_CALLS.search(text)
    return _json_calls(text[first.start():], key) if first else []


JSON_TYPE_CHECKS = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
                    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
                    "null": lambda v: v is None, "array": lambda v: isinstance(v, list),
                    "object": lambda v: isinstance(v, dict)}


def _schema_error(value, schema: dict, where: str) -> str | None:
    """Why value does not fit the JSON schema _type_schema writes (type, enum, nullable, anyOf, items,
    prefixItems, additionalProperties), as "where: ..."; None when it fits."""
    if value is None and schema.get("nullable"):
        return None
    if "anyOf" in schema and all(_schema_error(value, s, where) for s in schema["anyOf"]):
        return f"{where}: {json.dumps(value, ensure_ascii=False)[:100]} fits none of {json.dumps(schema['anyOf'])}"
    names = [schema["type"]] if isinstance(schema.get("type"), str) else schema.get("type", [])
    if names and not any(JSON_TYPE_CHECKS[name](value) for name in names):
        return (f"{where}: expected {' or '.join(names)}, got {JSON_TYPES.get(type(value), type(value).__name__)} "
                + json.dumps(value, ensure_ascii=False, default=str)[:100])
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: expected one of {json.dumps(schema['enum'], ensure_ascii=False)}, got {json.dumps(value)}"
    if isinstance(value, list) and "prefixItems" in schema and len(value) != len(schema["prefixItems"]):
        return f"{where}: expected {len(schema['prefixItems'])} items, got {len(value)}"
    if isinstance(value, list):
        items = schema.get("prefixItems") or [schema.get("items", {})] * len(value)
        return next(filter(None, (_schema_error(v, s, f"{where}[{i}]") for i, (v, s) in enumerate(zip(value, items)))),
                    None)
    if isinstance(value, dict) and "additionalProperties" in schema:
        return next(filter(None, (_schema_error(v, schema["additionalProperties"], f"{where}[{k!r}]")
                                  for k, v in value.items())), None)
    return None


def _arguments_error(arguments: dict, schema: dict) -> str | None:
    """Why arguments (parsed from the model's JSON) cannot be passed to the function function_schema described:
    a required argument missing, a name it does not take, a value of the wrong JSON type. None when they fit."""
    name, parameters = schema["function"]["name"], schema["function"]["parameters"]
    properties = parameters.get("properties", {})
    unknown = [k for k in arguments if k not in properties]
    if unknown:
        return f"{name}() takes no argument {unknown[0]!r} (its arguments: {', '.join(properties) or 'none'})"
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        return f"{name}() is missing the argument {missing[0]!r}"
    return next(filter(None, (_schema_error(v, properties[k], f"{name}() argument {k!r}")
                              for k, v in arguments.items())), None)


class ToolResult(NamedTuple):
    """What one call gave the model."""
    text: str  # the result as the model reads it: a str as returned, else JSON; "error: ..." when the call failed
    failed: bool  # the call was malformed, named no listed tool, had bad arguments, raised or timed out


def call_tool(fn: typing.Callable, arguments: dict, schema: dict, timeout_s: float) -> ToolResult:
    """fn(**arguments), checked against schema (function_schema(fn)) first and run in a thread of its own for at
    most timeout_s seconds. A str result is the text as is, anything else its JSON. Bad arguments, an exception
    (its type and first line) or the timeout give an "error: ..." text instead: nothing a tool does ends the
    rollout. Python cannot stop a thread, so a function that hangs keeps running in the background (a daemon
    thread: it does not hold up the process's exit) while the rollout goes on; one that holds the GIL in a long
    C call can still stall it, and such a tool belongs in a subprocess of its own."""
    name = schema["function"]["name"]
    error = _arguments_error(arguments, schema)
    if error:
        return ToolResult(f"error: {error}", True)
    outcome = {}

    def run():
        try:
            outcome["value"] = fn(**arguments)
        except BaseException as e:  # noqa: BLE001 -- SystemExit too: a tool's sys.exit is its error, not the rollout's
            outcome["error"] = e

    worker = threading.Thread(target=run, name=f"tool {name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return ToolResult(f"error: {name}() did not return within {timeout_s:g} s", True)
    if "error" in outcome:
        e = outcome["error"]
        line = (str(e).strip().splitlines() or [""])[0][:200]
        return ToolResult(f"error: {name}() raised {type(e).__name__}" + (f": {line}" if line else ""), True)
    value = outcome.get("value")
    return ToolResult(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str), False)


# ----------------------------------------------------------------------------- the multi-turn rollout

def result_turn_text(family: str, results: list[str], enable_thinking: bool = True, names=()) -> str:
    """What chat.apply_chat_template writes after the end-of-turn token of an assistant turn that made calls, up
    to the first token of the next assistant turn, given the calls' results in order: for Qwen "\\n<|im_start|>user"
    and one <tool_response> block each, for Llama 3 one ipython turn each, for Gemma one user turn of
    ```tool_output``` blocks, each then opening the assistant's turn (for Qwen 3 with enable_thinking=False, with
    the empty <think> block its generation prompt writes); for Gemma 4 the results after the <|tool_response> its
    calls end with, in the same turn, each named by its call (names; "unknown" past them, as the template writes).
    Rendered by chat.py itself, so it cannot drift from the template."""
    import chat  # here and not above: chat imports this module for function_schema
    if family == "gemma4":
        names = itertools.chain(names, itertools.repeat("unknown"))
        return "".join(map(chat.gemma4_response, names, results)).removeprefix("<|tool_response>")
    end_of_turn = chat.END_OF_TURN[family]
    calling = [{"role": "user", "content": "?"},
               {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                    "function": {"name": "f", "arguments": {}}}]}]
    turns = chat.apply_chat_template(calling, family, add_generation_prompt=False).count(end_of_turn)
    switch = {} if enable_thinking or family != "qwen3" else {"enable_thinking": False}  # as data.encode_prompt
    text = chat.apply_chat_template(calling + [{"role": "tool", "content": r} for r in results], family, **switch)
    # The results start after the calling turn's end-of-turn, the last of `turns` (counted, not matched as a
    # prefix: Qwen 3 writes the calling turn differently once it is no longer the last message).
    start = -len(end_of_turn)
    for _ in range(turns):
        start = text.index(end_of_turn, start + len(end_of_turn))
    return text[start + len(end_of_turn):]


def _decode_turn(tok, ids: list[int], family: str) -> str:
    """The text of a turn's ids with the family's call and reasoning markers written out even where the tokenizer
    holds them as special tokens, which decode drops. For parsing and for rewards only: never encoded again."""
    markers = {tok.token_id(m): m for m in TURN_MARKERS.get(family, ())}
    markers.pop(None, None)
    text, run = "", []
    for i in ids:
        if i in markers:
            text, run = text + tok.decode(run) + markers[i], []
        else:
            run.append(i)
    return text + tok.decode(run)


class ToolRollout(NamedTuple):
    """One prompt's sampled conversation after the prompt. C = len(completion) <= max_completion_len."""
    completion: list[int]  # [C] the model's turns and the tool results' turns, as the learner scores them
    loss_mask: list[int]  # [C] 1 on tokens the model sampled, 0 on tool-result tokens
    logprobs: list[float]  # [C] the sampler's log-prob of each sampled token, 0.0 on tool-result tokens
    tool_calls: int  # calls answered with a result, failed ones included
    failed_calls: int  # of those, the ones answered with an "error: ..." result
    messages: list[dict]  # for rewards: {"role": "assistant", "content": the turn's text decoded verbatim (calls
    #   included), ["tool_calls": the well-formed calls]} and {"role": "tool", "content": a result}, in order


def _run_call(call: tuple[str, dict] | str, functions: dict, schemas: dict, timeout_s: float) -> ToolResult:
    """One parsed call's result: its parse error, no such tool, or call_tool's answer. Only listed functions run."""
    if isinstance(call, str):
        return ToolResult(call, True)
    name, arguments = call
    if name not in functions:
        return ToolResult(f"error: there is no tool {name!r} (the tools: {', '.join(functions)})", True)
    return call_tool(functions[name], arguments, schemas[name], timeout_s)


def _append(r: ToolRollout, ids: list[int], sampled: bool, logprobs: list[float] | None = None) -> ToolRollout:
    """r with ids after its completion: the model's (mask 1, its log-probs) or a tool's (mask 0, log-prob 0.0)."""
    return r._replace(completion=r.completion + list(ids), loss_mask=r.loss_mask + [int(sampled)] * len(ids),
                      logprobs=r.logprobs + (list(logprobs) if sampled else [0.0] * len(ids)))


def _model_turn(r: ToolRollout, ids: list[int], logprobs: list[float], tok, family: str, eos_ids,
                calls_end) -> tuple[ToolRollout, list]:
    """r after the model's turn (its ids as sampled, mask 1) and the calls the turn makes: none unless it ended
    with a stop id (a turn cut by the budget is not run), one of calls_end where the family has them (Gemma 4)."""
    ended = bool(ids) and ids[-1] in eos_ids
    text = _decode_turn(tok, ids[:-1] if ended else ids, family)
    calls = parse_tool_calls(text, family) if ended and (not calls_end or ids[-1] in calls_end) else []
    made = [{"type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments in (c for c in calls if not isinstance(c, str))]
    message = {"role": "assistant", "content": text} | ({"tool_calls": made} if made else {})
    return _append(r, ids, True, logprobs)._replace(messages=r.messages + [message]), calls


def _tool_turn(r: ToolRollout, calls: list, run: typing.Callable, result_ids: typing.Callable,
               max_len: int, named: bool) -> ToolRollout:
    """r after the calls' result turn: each call run (or its error taken), the result turn's ids (result_ids of
    the results' texts) appended with mask 0, the completion cut to max_len tokens. named: each result's message
    has its call's name (Gemma 4's template writes it)."""
    results, names = [run(call) for call in calls], [c[0] if isinstance(c, tuple) else "unknown" for c in calls]
    r = _append(r, result_ids([x.text for x in results], names)[:max_len - len(r.completion)], False)
    return r._replace(tool_calls=r.tool_calls + len(results),
                      failed_calls=r.failed_calls + sum(x.failed for x in results),
                      messages=r.messages + [{"role": "tool", "content": x.text} | ({"name": n} if named else {})
                                             for x, n in zip(results, names)])


def rollout(generate_fn: typing.Callable, prompts: list[list[int]], tok, family: str, tools: list[typing.Callable], *,
            max_completion_len: int, max_tool_calls: int, eos_ids, timeout_s: float = 10.0,
            enable_thinking: bool = True) -> list[ToolRollout]:
    """Each prompt's conversation with the tools, sampled in rounds (module docstring): the policy writes a turn,
    its calls are run, the results' turn is appended, and the policy goes on from there, token in and token out.

    generate_fn(prompts, max_new_tokens) → (new ids per prompt, their log-probs per prompt), each row up to and
    including its first id in eos_ids (sample.generate or engine.generate with return_logprobs=True and the
    sampling settings bound). Each round it gets the rows still going, each as its prompt + its completion so
    far, and the largest budget left; each row's turn is cut to its own budget, max_completion_len minus its
    completion so far (tool tokens count). A row stops when its turn makes no call (it answered, or was cut
    before its end), when the turn asks for more calls than max_tool_calls leaves (the turn is kept, nothing
    is run), or when its completion reaches max_completion_len (a result turn is cut there too).
    tools: the only functions the model can call, by their __name__; each call's arguments are checked against
    function_schema(fn) and it runs for at most timeout_s seconds (call_tool). enable_thinking: as the prompts
    were rendered (Qwen 3's switch; each result turn ends in the generation prompt it implies). Gemma 4's calls
    are made where it stopped at <|tool_response> (chat.tool_stop_ids), never in a turn <turn|> ended."""
    import chat  # here: chat imports this module
    functions = {fn.__name__: fn for fn in tools}
    if len(functions) != len(tools):
        raise ValueError(f"tools: two functions share a name in {[fn.__name__ for fn in tools]}")
    schemas = {name: function_schema(fn) for name, fn in functions.items()}
    eos_ids, calls_end = chat.tool_stop_ids(tok, family, eos_ids), chat.tool_stop_ids(tok, family, ())

    def run(call):
        return _run_call(call, functions, schemas, timeout_s)

    def result_ids(texts, names):  # the tools' text in the template's result turn: ours to tokenize, never the model's
        return tok.encode(result_turn_text(family, texts, enable_thinking, names), add_bos=False)

    out = [ToolRollout([], [], [], 0, 0, []) for _ in prompts]
    going = list(range(len(prompts)))
    while going:
        budgets = [max_completion_len - len(out[i].completion) for i in going]
        new_ids, new_logprobs = generate_fn([list(prompts[i]) + out[i].completion for i in going], max(budgets))
        still_going = []
        for i, ids, logprobs, budget in zip(going, new_ids, new_logprobs, budgets, strict=True):
            r, calls = _model_turn(out[i], list(ids[:budget]), list(logprobs[:budget]), tok, family, eos_ids,
                                   calls_end)
            if calls and r.tool_calls + len(calls) <= max_tool_calls:
                r = _tool_turn(r, calls, run, result_ids, max_completion_len, family == "gemma4")
                still_going += [i] * (len(r.completion) < max_completion_len)
            out[i] = r
        going = still_going
    return out


def generate(model, prompts: list[list[int]], fns: list[typing.Callable], tok, family: str | None, *,
             max_completion_len: int, max_tool_calls: int = 4, seed: int = 0, eos_ids=None, slots: int = 0,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, enable_thinking: bool = True,
             timeout_s: float = 10.0) -> list[ToolRollout]:
    """Sampled completions of prompts as ToolRollouts, engine.generate drawing each turn: with tools fns, rollout()
    (round r seeded by (seed, r), round 0 by seed itself; in one static batch a later round's rows are padded to
    the first round's count and its token budget rounded up to a power of two, each row cut to its own, so a run
    compiles a few shapes); without, one turn each, exactly engine.generate's (mask 1 throughout, no calls).
    Greedy (temperature 0) asks for no log-probs: 0.0 each. family: the call and result format (chat.py's; a
    tiny byte-level model takes its preset's)."""
    import chat
    import engine  # here: engine imports sample, which a tool module need not load
    rounds = itertools.count()
    if fns:  # Gemma 4's calls stop at <|tool_response>
        eos_ids = chat.tool_stop_ids(tok, family, model.cfg.eos_ids if eos_ids is None else eos_ids)

    def generate_fn(batch, max_new_tokens):
        r, n = next(rounds), len(batch)
        budget = max_new_tokens if r == 0 else min(1 << (max_new_tokens - 1).bit_length(), max_completion_len)
        padded = batch + batch[:1] * (len(prompts) - n) * (not slots)  # the engine's slots have one shape already
        out = engine.generate(model, padded, slots=slots, max_new_tokens=budget, temperature=temperature,
                              top_k=top_k, top_p=top_p, eos_ids=eos_ids, return_logprobs=temperature > 0,
                              seed=seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1)[0]))
        ids, logprobs = out if temperature > 0 else (out, [[0.0] * len(ids) for ids in out])
        return ids[:n], logprobs[:n]
    if not fns:
        ids, logprobs = generate_fn(prompts, max_completion_len)
        return [ToolRollout(i, [1] * len(i), lp, 0, 0, []) for i, lp in zip(ids, logprobs)]
    return rollout(generate_fn, prompts, tok, family, fns, max_completion_len=max_completion_len,
                   max_tool_calls=max_tool_calls, eos_ids=eos_ids, timeout_s=timeout_s, enable_thinking=enable_thinking)


class Sampler(NamedTuple):
    """sampler(policy, rows, ids, seed, temperature) → the completions of prompts ids (generate's ToolRollouts: with
    tools, conversations in which they ran) and their rewards [N, F] (score): what an RL script draws and scores."""
    funcs: list  # the reward functions
    tok: object
    eos_ids: tuple[int, ...]  # where a turn ends
    family: str | None  # the format of calls and results
    fns: list  # the tools ([]: one turn each, no calls)
    max_completion_len: int  # tokens of a completion, tool results included
    max_tool_calls: int = 4
    slots: int = 0  # engine.generate's
    top_k: int = 0
    top_p: float = 1.0
    enable_thinking: bool = True  # as the prompts were rendered (Qwen 3)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Where a completion may end: eos_ids and, with tools, where Gemma 4's calls stop (chat.tool_stop_ids)."""
        import chat
        return chat.tool_stop_ids(self.tok, self.family, self.eos_ids) if self.fns else self.eos_ids

    def __call__(self, policy, rows, ids, seed: int, temperature: float):
        outs = generate(policy, ids, self.fns, self.tok, self.family, max_completion_len=self.max_completion_len,
                        max_tool_calls=self.max_tool_calls, seed=seed, eos_ids=self.eos_ids, slots=self.slots,
                        temperature=temperature, top_k=self.top_k, top_p=self.top_p,
                        enable_thinking=self.enable_thinking)
        return outs, score(self.funcs, rows, outs, self.tok, bool(self.fns))


def final_answer(r: ToolRollout) -> str:
    """The text of a conversation's last assistant turn ("" when it ends on a tool's result: no answer came)."""
    return r.messages[-1]["content"] if r.messages and r.messages[-1]["role"] == "assistant" else ""


def score(funcs, rows, outs: list[ToolRollout], tok, with_tools: bool) -> np.ndarray:
    """Rewards [N, F] of sampled completions (generate's), tasks.score's: each completion's text, or with tools its
    final answer (the rows also get each conversation's messages and its number of tool_calls as columns)."""
    import tasks  # here: tasks imports this module for the calculator demo's conversations
    if with_tools:
        rows = [{**row, "messages": o.messages, "tool_calls": o.tool_calls} for row, o in zip(rows, outs)]
    texts = [final_answer(o) if with_tools else tok.decode(o.completion) for o in outs]
    return tasks.score(funcs, rows, texts, [o.completion for o in outs])


def calls(outs: list[ToolRollout]) -> np.ndarray:
    """[N, 2]: each conversation's tool calls, and of those the failed ones."""
    return np.array([[o.tool_calls, o.failed_calls] for o in outs], np.int64).reshape(-1, 2)


def metrics(made_failed: np.ndarray, prefix: str = "") -> dict:
    """TRL's metrics of [N, 2] calls (made, failed): tool calls per completion, and the fraction that failed."""
    made, failed = made_failed.sum(0)
    return {f"{prefix}tools/call_frequency": float(made / max(len(made_failed), 1)),
            f"{prefix}tools/failure_frequency": float(failed / max(made, 1))}


def call_text(family: str, name: str, arguments: dict) -> str:
    """One call as the family's template writes it in an assistant turn (what parse_tool_calls reads back)."""
    import chat
    if family.startswith("qwen"):
        return chat.qwen_tool_call(name, arguments)
    if family == "gemma4":
        return chat.gemma4_call(name, arguments)
    return chat.json_text({"name": name, ARGUMENTS_KEY[family]: arguments})


def scripted(prompt_ids: list[int], turns: list[str], tok, family: str, fns: list[typing.Callable], end_id: int,
             max_completion_len: int, enable_thinking: bool = True) -> ToolRollout:
    """The conversation of a policy that writes the given turns (each then end_id; Gemma 4's calls <|tool_response>)
    instead of sampling, the tools really run: a sampled one's tokens and masks (a warm-up learns calls from it)."""
    import chat
    texts = iter(turns)

    def generate_fn(batch, max_new_tokens):
        text = next(texts)
        calls_end = chat.tool_stop_ids(tok, family, ()) if parse_tool_calls(text, family) else ()
        ids = tok.encode(text, add_bos=False) + [(*calls_end, end_id)[0]]
        return [ids], [[0.0] * len(ids)]
    return rollout(generate_fn, [prompt_ids], tok, family, fns, max_completion_len=max_completion_len,
                   max_tool_calls=len(turns), eos_ids=(end_id,), enable_thinking=enable_thinking)[0]


# ----------------------------------------------------------------------------- --tools

def load(spec: str) -> list[typing.Callable]:
    """--tools: "calculator" (the built-in demo's tool) or "module:fn1,fn2" (an importable module, or a .py file's
    path, and functions in it). Each must have a JSON schema (function_schema); ValueError in one line otherwise."""
    if spec == "calculator":
        import tasks  # here: tasks imports this module
        return [tasks.calculator]
    where, _, names = spec.rpartition(":")
    if not where or not names:
        raise ValueError(f"--tools {spec!r}: want calculator, or module:fn1,fn2 (a module or a .py file)")
    try:
        if where.endswith(".py"):
            if not pathlib.Path(where).is_file():
                raise ValueError(f"--tools: no file {where}")
            found = importlib.util.spec_from_file_location(pathlib.Path(where).stem, where)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 -- the user's module: whatever it raises is one line
        raise ValueError(f"--tools: importing {where} failed: {type(e).__name__}: {e}") from None
    fns = [getattr(module, name, None) for name in names.split(",")]
    for name, fn in zip(names.split(","), fns):
        if not callable(fn):
            raise ValueError(f"--tools: {where} has no function {name!r}")
        function_schema(fn)  # a tool the model cannot be shown is refused now, not mid-run
    return fns
