"""chat.py — each family's chat template as a plain Python function: text turns, tool lists, tool calls, tool results.

The published templates are Jinja; these render the same text (tests/test_data.py and tests/test_tools.py hold
every one against the published template). data.py tokenizes with them; sample.py chats with them.

    apply_chat_template([{"role": "user", "content": "Hi"}], "qwen3")   # → "<|im_start|>user\nHi<|im_end|>\n..."

Tool turns take OpenAI's (and transformers') message shape, and tools= takes functions or their JSON schemas:

    {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                         "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}
    {"role": "tool", "content": "3"}
    apply_chat_template(messages, "qwen3", tools=[add])   # add's schema from tools.function_schema
"""
from __future__ import annotations

import datetime
import itertools
import json
import re

from tools import function_schema


def json_text(value, indent: int | None = None) -> str:
    """JSON as the templates' tojson filter writes it under transformers: non-ASCII kept, no HTML escaping."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _tool_calls(message: dict) -> list[tuple[str, dict]]:
    """[(name, arguments), ...] of an assistant message's tool_calls ({"function": {...}} or bare {"name", ...})."""
    calls = message.get("tool_calls") if message["role"] == "assistant" else None
    return [(c.get("function", c)["name"], c.get("function", c)["arguments"]) for c in calls or []]


def _alternating(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError("conversation roles must alternate user/assistant/user/... after an optional system")


# Gemma's templates define no tool turns. We write them as Google's function-calling guide for Gemma does
# (https://ai.google.dev/gemma/docs/capabilities/function-calling): its instruction (the JSON-call variant) and the
# tool list as JSON open the first user turn, and the model answers with {"name": ..., "parameters": ...}, one call
# a line. The guide leaves results open: they go back as a user turn of ```tool_output``` blocks, as Google's Gemma
# function-calling example does (https://ai.google.dev/gemma/docs/meme-generator).
GEMMA_TOOL_INSTRUCTION = ("You have access to functions. If you decide to invoke any of the function(s),\n"
                          " you MUST put it in the format of\n"
                          '{"name": function name, "parameters": dictionary of argument name and its value}\n\n'
                          "You SHOULD NOT include any other text in the response if you call a function\n")


def _gemma_turns(messages: list[dict]) -> list[dict]:
    """Messages as Gemma's user/assistant turns: an assistant's tool calls become JSON lines after its text, and
    a run of tool messages becomes one user turn of ```tool_output``` blocks."""
    turns = []
    for m in messages:
        if m["role"] == "tool":
            block = f"```tool_output\n{m['content']}\n```"
            if turns and turns[-1].get("tool"):
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block, "tool": True})
        elif _tool_calls(m):
            calls = [json_text({"name": name, "parameters": arguments}) for name, arguments in _tool_calls(m)]
            turns.append({"role": m["role"], "content": "\n".join(filter(None, [m["content"].strip(), *calls]))})
        else:
            turns.append(m)
    return turns


def gemma_chat(messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
    """Gemma 1/2/3: turns of <start_of_turn>{user|model}; a system message opens the first
    user turn, followed by a blank line (Gemma 3's rule; Gemma 1/2 templates have no system).
    Gemma's templates have no tool format: tools, calls and results are text, as Google's guide writes them (above)."""
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    if tools:
        prefix += GEMMA_TOOL_INSTRUCTION + json_text([t.get("function", t) for t in tools], indent=2) + "\n"
    messages = _gemma_turns(messages)
    _alternating(messages)
    text = "<bos>"
    for i, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else m["role"]
        text += f"<start_of_turn>{role}\n" + (prefix if i == 0 else "") + m["content"].strip() + "<end_of_turn>\n"
    return text + ("<start_of_turn>model\n" if add_generation_prompt else "")


LLAMA3_CALL_FORMAT = ('Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                      'value}.Do not use variables.\n\n')  # sic: the template joins its sentences without a space


def _llama3_turn(message: dict) -> str:
    """One Llama 3 turn: text, a tool call as {"name", "parameters"} JSON, or a tool result as an ipython turn
    (the template writes any result through tojson, so a string result arrives as a quoted JSON string)."""
    if message["role"] in ("tool", "ipython"):
        return f"<|start_header_id|>ipython<|end_header_id|>\n\n{json_text(message['content'])}<|eot_id|>"
    calls = _tool_calls(message)
    if not calls:
        return f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n{message['content'].strip()}<|eot_id|>"
    if len(calls) != 1:
        raise ValueError(f"Llama 3's template takes one tool call per assistant turn, got {len(calls)}")
    name, arguments = calls[0]
    return ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + name + '", "parameters": '
            + json_text(arguments) + "}<|eot_id|>")


def llama3_chat(messages: list[dict], add_generation_prompt: bool = True, date: str | None = None,
                tools: list[dict] | None = None, tools_in_user_message: bool = True) -> str:
    """Llama 3.1/3.2: a system header that always states the knowledge cutoff and today's date. Given tools (a list,
    even empty), the header adds "Environment: ipython" and the tools, as indented JSON with an instruction, open
    the first user message (or close the system message, tools_in_user_message=False)."""
    date = date or datetime.date.today().strftime("%d %b %Y")  # the template's strftime_now
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    tool_list = LLAMA3_CALL_FORMAT + "".join(json_text(t, indent=4) + "\n\n" for t in tools or [])
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            + ("Environment: ipython\n" if tools is not None else "")
            + f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n")
    if tools is not None and not tools_in_user_message:
        text += ("You have access to the following functions. To call a function, please respond with JSON for a "
                 "function call." + tool_list)
    text += f"{system}<|eot_id|>"
    if tools is not None and tools_in_user_message:
        if not messages:
            raise ValueError("Llama 3 puts the tools in the first user message, and there is none")
        text += ("<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a "
                 "JSON for a function call with its proper arguments that best answers the given prompt.\n\n"
                 + tool_list + messages[0]["content"].strip() + "<|eot_id|>")
        messages = messages[1:]
    text += "".join(_llama3_turn(m) for m in messages)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


QWEN2_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _qwen_tool_prompt(tools: list[dict]) -> str:
    """The text Qwen 2.5 and Qwen 3 put in the system turn to list the tools (after the system message, if any)."""
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
            + "".join("\n" + json_text(t) for t in tools)
            + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
            "<args-json-object>}\n</tool_call>")


def qwen_tool_call(name: str, arguments: dict) -> str:
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + json_text(arguments) + "}\n</tool_call>"


def _qwen_tool_response(messages: list[dict], i: int) -> str:
    """Tool message i as Qwen writes it: a run of tool messages shares one user turn, each in <tool_response>."""
    opens = i == 0 or messages[i - 1]["role"] != "tool"
    closes = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
    return (("<|im_start|>user" if opens else "") + f"\n<tool_response>\n{messages[i]['content']}\n</tool_response>"
            + ("<|im_end|>\n" if closes else ""))


def qwen2_chat(messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
    """Qwen 2/2.5 ChatML, with Qwen's default system message when none is given; tools follow it in the system
    turn, an assistant's calls follow its text in <tool_call> blocks, results go back in <tool_response> blocks."""
    system = QWEN2_DEFAULT_SYSTEM
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = "<|im_start|>system\n" + system + ("\n\n" + _qwen_tool_prompt(tools) if tools else "") + "<|im_end|>\n"
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            text += _qwen_tool_response(messages, i)
        elif _tool_calls(m):
            text += ("<|im_start|>assistant" + ("\n" + m["content"] if m["content"] else "")
                     + "".join("\n" + qwen_tool_call(*call) for call in _tool_calls(m)) + "<|im_end|>\n")
        else:
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _qwen3_assistant(message: dict, after_last_query: bool, is_last: bool) -> str:
    """One Qwen 3 assistant turn: its reasoning in a <think> block (kept only after the last user query, and there
    only if it has some or ends the conversation), its text, then its tool calls, one a line."""
    content, reasoning = message["content"], message.get("reasoning_content")
    if reasoning is None:
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
    text = "<|im_start|>assistant\n" + content
    if after_last_query and (is_last or reasoning):
        text = "<|im_start|>assistant\n<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
    for j, call in enumerate(_tool_calls(message)):
        text += ("\n" if j > 0 or content else "") + qwen_tool_call(*call)  # text before a call ends in a newline
    return text + "<|im_end|>\n"


def qwen3_chat(messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = True,
               tools: list[dict] | None = None) -> str:
    """Qwen 3 ChatML: no default system; reasoning (<think>...</think>) is dropped from
    assistant turns before the last user message and kept in a block after it. Tools as in Qwen 2.5, and a
    user message that is only a <tool_response> does not count as the last user message."""
    text = ""
    if tools:
        system = messages[0]["content"] + "\n\n" if messages and messages[0]["role"] == "system" else ""
        text = "<|im_start|>system\n" + system + _qwen_tool_prompt(tools) + "<|im_end|>\n"
    last_query = max((i for i, m in enumerate(messages) if m["role"] == "user" and not (
        m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>"))),
                     default=len(messages) - 1)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            text += _qwen3_assistant(m, i > last_query, i == len(messages) - 1)
        elif m["role"] == "tool":
            text += _qwen_tool_response(messages, i)
        elif not (i == 0 and m["role"] == "system" and tools):  # with tools, the system message is already written
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
    return text


GEMMA4_QUOTE = '<|"|>'  # Gemma 4's string quote, one token


def gemma4_value(value, quote_keys: bool = False) -> str:
    """A value as Gemma 4 writes it in tool text: strings between <|"|> quotes, true/false, {key:value,...} with
    the keys sorted (quoted too with quote_keys), [value,...], anything else as Python's str (3, 2.5, None)."""
    if isinstance(value, str):
        return GEMMA4_QUOTE + value + GEMMA4_QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        key = (lambda k: GEMMA4_QUOTE + k + GEMMA4_QUOTE) if quote_keys else str
        return "{" + ",".join(key(k) + ":" + gemma4_value(v, quote_keys) for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(gemma4_value(v, quote_keys) for v in value) + "]"
    return str(value)


GEMMA4_SCALAR = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?|true|false|null|None")  # None: str(None), as written
GEMMA4_KEY = re.compile(r"[\w-]+")  # a bare key, as gemma4_value writes an argument's name
GEMMA4_WORDS = {"true": True, "false": False, "null": None, "None": None}
GEMMA4_CALL = re.compile(r"<\|tool_call>(.*?)(<tool_call\|>|\Z)", re.DOTALL)
GEMMA4_NAME = re.compile(r"call:([\w.-]+)(?=\{)")


def _gemma4_sequence(text: str, i: int, close: str, item) -> tuple[list, int]:
    """The items of a {...} or [...] opened just before i, each read by item(text, i) → (it, i), comma-separated
    up to close; and the position after close."""
    items = []
    while not text.startswith(close, i):
        if items and not text.startswith(",", i):
            raise ValueError(f"expected ',' or {close!r} at {i}, got {text[i:i + 20]!r}")
        found, i = item(text, i + bool(items))
        items.append(found)
    return items, i + 1


def _gemma4_pair(text: str, i: int) -> tuple[tuple[str, object], int]:
    """key:value at text[i:] (the key bare or <|"|>-quoted), and the position after it."""
    if text.startswith(GEMMA4_QUOTE, i):
        key, i = gemma4_read(text, i)
    elif bare := GEMMA4_KEY.match(text, i):
        key, i = bare[0], bare.end()
    else:
        raise ValueError(f"expected a key at {i}, got {text[i:i + 20]!r}")
    if not text.startswith(":", i):
        raise ValueError(f"expected ':' after the key at {i}, got {text[i:i + 20]!r}")
    value, i = gemma4_read(text, i + 1)
    return (key, value), i


def gemma4_read(text: str, i: int = 0) -> tuple[object, int]:
    """The value gemma4_value wrote at text[i:] and the position after it: <|"|>-quoted strings, numbers,
    true/false/null (None too), {key:value,...} and [value,...], nothing between them. A strict reader (the model's
    text is never evaluated): a ValueError names the position where the text departs from that."""
    if text.startswith(GEMMA4_QUOTE, i):
        end = text.find(GEMMA4_QUOTE, i + len(GEMMA4_QUOTE))
        if end < 0:
            raise ValueError(f"the string opened at {i} is not closed")
        return text[i + len(GEMMA4_QUOTE):end], end + len(GEMMA4_QUOTE)
    if text.startswith("{", i):
        pairs, end = _gemma4_sequence(text, i + 1, "}", _gemma4_pair)
        if len(dict(pairs)) < len(pairs):
            raise ValueError(f"a key repeats in the object at {i}")
        return dict(pairs), end
    if text.startswith("[", i):
        return _gemma4_sequence(text, i + 1, "]", gemma4_read)
    scalar = GEMMA4_SCALAR.match(text, i)
    if not scalar:
        raise ValueError(f"expected a value at {i}, got {text[i:i + 20]!r}")
    word = scalar[0]
    value = GEMMA4_WORDS[word] if word in GEMMA4_WORDS else float(word) if scalar[1] or scalar[2] else int(word)
    return value, scalar.end()


def _gemma4_call(body: str, closing: str) -> tuple[str, dict] | str:
    """The call in one <|tool_call> block's body (call:name{key:value,...}), or the error text for the model."""
    if not closing:
        return "error: <|tool_call> without <tool_call|>"
    name = GEMMA4_NAME.match(body)
    try:
        if not name:
            raise ValueError("it does not open with call:<function name>{")
        arguments, end = gemma4_read(body, name.end())
        if end < len(body):
            raise ValueError(f"text after the arguments at {end}")
    except (ValueError, RecursionError) as e:
        return f"error: a tool call is call:<function name>{{<arguments>}}: {e} in {body[:200]!r}"
    return name[1], arguments


def gemma4_calls(text: str) -> list[tuple[str, dict] | str]:
    """Each <|tool_call> block's call in text (tools.parse_tool_calls' convention: (name, arguments), or the
    "error: ..." text a malformed one gets as its result)."""
    return [_gemma4_call(body, closing) for body, closing in GEMMA4_CALL.findall(text)]


def _gemma4_required(names: list[str]) -> str:
    return "required:" + gemma4_value(list(names))


def _gemma4_items(items: dict) -> str:
    """An array's item schema: its keys sorted, types upper-cased, nested properties as _gemma4_properties."""
    fields = []
    for key, value in sorted((k, v) for k, v in items.items() if v is not None):
        if key == "properties":
            fields.append("properties:{" + (_gemma4_properties(value) if isinstance(value, dict) else "") + "}")
        elif key == "required":
            fields.append(_gemma4_required(value))
        elif key == "type":
            value = value.upper() if isinstance(value, str) else [t.upper() for t in value]
            fields.append("type:" + gemma4_value(value))
        else:
            fields.append(f"{key}:" + gemma4_value(value, quote_keys=True))
    return ",".join(fields)


def _gemma4_properties(properties: dict, skip_schema_keys: bool = False) -> str:
    """Parameters as key:{description, enum | items, nullable, properties and required, type}, sorted by name (the
    template's format_parameters; an object without "properties" lists its own keys but the schema's)."""
    out = []
    for key, value in sorted(properties.items()):
        if skip_schema_keys and key in ("description", "type", "properties", "required", "nullable"):
            continue
        kind = str(value.get("type", "")).upper()
        fields = [f"description:{gemma4_value(value['description'])}"] if value.get("description") else []
        if kind == "STRING" and value.get("enum"):
            fields.append("enum:" + gemma4_value(value["enum"], quote_keys=True))
        elif kind == "ARRAY" and isinstance(value.get("items"), dict) and value["items"]:
            fields.append("items:{" + _gemma4_items(value["items"]) + "}")
        if value.get("nullable"):
            fields.append("nullable:true")
        if kind == "OBJECT":
            nested = value.get("properties")
            fields.append("properties:{" + (_gemma4_properties(nested) if isinstance(nested, dict)
                                            else _gemma4_properties(value, skip_schema_keys=True)) + "}")
            fields += [_gemma4_required(value["required"])] if value.get("required") else []
        out.append(key + ":{" + ",".join(fields + [f"type:{gemma4_value(kind)}"]) + "}")
    return ",".join(out)


def gemma4_declaration(tool: dict) -> str:
    """<|tool>declaration:name{description:...,parameters:{properties:{...},required:[...],type:...}}<tool|>"""
    function = tool.get("function", tool)
    text = f"declaration:{function['name']}{{description:{gemma4_value(function.get('description', ''))}"
    params = function.get("parameters")
    if params:
        text += ",parameters:{" + ("properties:{" + _gemma4_properties(params["properties"]) + "},"
                                   if params.get("properties") else "")
        text += (_gemma4_required(params["required"]) + "," if params.get("required") else "")
        text += f"type:{gemma4_value(params['type'].upper())}}}" if params.get("type") else ""
    if "response" in function:  # sic: the template closes the response's braces only for an OBJECT type
        response = function["response"]
        text += ",response:{" + (f"description:{gemma4_value(response['description'])}," if response.get(
            "description") else "") + ("type:" + gemma4_value("OBJECT") + "}"
                                       if str(response.get("type", "")).upper() == "OBJECT" else "")
    return "<|tool>" + text.strip() + "}<tool|>"


def gemma4_call(name: str, arguments: dict) -> str:
    return f"<|tool_call>call:{name}{{" + gemma4_value(arguments)[1:-1] + "}<tool_call|>"


def gemma4_response(name: str, content) -> str:
    return f"<|tool_response>response:{name}{{value:{gemma4_value(content)}}}<tool_response|>"


def _gemma4_turn(messages: list[dict], i: int, continues: bool, after_last_user: bool) -> tuple[str, str | None]:
    """Message i as Gemma 4's template writes it, and what it wrote last ("tool_call", "tool_response" or None).
    A model turn holds its calls, then the tool messages that follow it as responses, then its text; after calls
    without responses it ends in <|tool_response> (where the model stops to be answered), after responses and no
    text it stays open, else it closes with <turn|>."""
    m, calls = messages[i], _tool_calls(messages[i])
    role = "model" if m["role"] == "assistant" else m["role"]
    text = "" if continues and role == "model" else f"<|turn>{role}\n"
    thought = m.get("reasoning") or m.get("reasoning_content")
    if thought and after_last_user and calls:
        text += "<|channel>thought\n" + thought + "\n<channel|>"
    text += "".join(gemma4_call(name, arguments) for name, arguments in calls)
    responses = []
    for r in itertools.takewhile(lambda r: r["role"] == "tool", messages[i + 1:] if calls else []):
        name = r.get("name", "unknown")  # the call's name where the ids match (as the template: None == None)
        for c in m["tool_calls"]:
            name = c.get("function", c)["name"] if c.get("id") == r.get("tool_call_id") else name
        responses.append(gemma4_response(name, r["content"]))
    content = m["content"].strip()
    if role == "model":  # its thoughts dropped: the text outside <|channel> ... <channel|>
        content = "".join(part.split("<|channel>")[0] for part in m["content"].split("<channel|>")).strip()
    text += "".join(responses) + content
    if calls and not responses:
        return text + "<|tool_response>", "tool_call"
    return text + ("" if responses and not content else "<turn|>\n"), "tool_response" if responses else None


def gemma4_chat(messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = False,
                tools: list[dict] | None = None) -> str:
    """Gemma 4: after <bos>, turns of <|turn>{system|user|model}\n...<turn|>\n. A system (or developer) message,
    <|think|> with enable_thinking, and the tools (gemma4_declaration each) open a system turn; a model turn drops
    its thoughts (<|channel>...<channel|>) and continues the previous one when the message before it (tool
    messages aside) is an assistant's too. Calls and their results stay inside the model turn (_gemma4_turn):

        <|turn>model\n<|tool_call>call:add{a:1,b:2}<tool_call|><|tool_response>response:add{value:<|"|>3<|"|>}
        <tool_response|>1 + 2 = 3<turn|>\n

    The generation prompt is <|turn>model\n, then an empty thought channel when thinking is off (the template's
    later revision); after calls or results the model goes on in its open turn, so nothing is added."""
    text, system = "<bos>", bool(messages) and messages[0]["role"] in ("system", "developer")
    if enable_thinking or system or tools:
        text += "<|turn>system\n" + "<|think|>\n" * enable_thinking + (messages[0]["content"].strip() if system else "")
        text, messages = text + "".join(map(gemma4_declaration, tools or [])) + "<turn|>\n", messages[system:]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    previous, wrote = None, None  # the role of the last message that was not a tool's; what its turn wrote last
    for i, m in enumerate(messages):
        if m["role"] != "tool":  # tool messages are written by the model turn that called them
            turn, wrote = _gemma4_turn(messages, i, previous == "assistant", i > last_user)
            text, previous = text + turn, m["role"]
    if add_generation_prompt and wrote not in ("tool_call", "tool_response"):
        text += "<|turn>model\n" + "<|channel>thought\n<channel|>" * (not enable_thinking)
    return text


# The token that closes an assistant turn: generation in chat mode stops there too.
END_OF_TURN = {"gemma": "<end_of_turn>", "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "gemma4": "<turn|>",
               "llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>"}

# Gemma 4 ends a turn's tool calls with <|tool_response>: the model stops there, and the results follow inside the
# same turn (_gemma4_turn). The other families end a turn of calls as any other, with END_OF_TURN.
CALLS_END = {"gemma4": "<|tool_response>"}

CHAT_TEMPLATES = {"gemma": gemma_chat, "gemma2": gemma_chat, "gemma3": gemma_chat, "gemma4": gemma4_chat,
                  "llama3": llama3_chat, "qwen2": qwen2_chat, "qwen3": qwen3_chat}


def _check_message(i: int, m) -> dict:
    """Message i if it is {"role": str, "content": str}, where an assistant message with tool_calls may have no
    content (None or absent: read as ""), and each call names a function and a dict of arguments; else ValueError."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ValueError(f"message {i}: expected {{'role': str, 'content': str}}, got {m!r}")
    calls = m.get("tool_calls") if m["role"] == "assistant" else None
    if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
        raise ValueError(f"message {i}: expected {{'role': str, 'content': str}}, got {m!r}")
    for call in calls or []:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), dict)):  # OpenAI's JSON-string arguments: json.loads them
            raise ValueError(f"message {i}: a tool call is {{'type': 'function', 'function': {{'name': str, "
                             f"'arguments': dict}}}}, got {call!r}")
    return m if isinstance(m.get("content"), str) else {**m, "content": ""}


def apply_chat_template(messages: list[dict], family: str, add_generation_prompt: bool = True,
                        tools: list | None = None, **kw) -> str:
    """Render [{"role", "content"}, ...] with the model family's template (model.Config.family).
    The text starts with the BOS token where the family uses one: encode it with add_bos=False.
    tools: functions (described by tools.function_schema) or JSON schemas, listed where the family's template
    lists them; None leaves the text exactly as without tool support. Tool calls and results render either way."""
    messages = [_check_message(i, m) for i, m in enumerate(messages)]
    if tools is not None:
        if any(not isinstance(t, dict) and not callable(t) for t in tools):
            raise ValueError(f"tools: expected functions or JSON schemas (dicts), got {tools!r}")
        kw["tools"] = [t if isinstance(t, dict) else function_schema(t) for t in tools]
    return CHAT_TEMPLATES[family](messages, add_generation_prompt, **kw)


# ----------------------------------------------------------------------------- tool conversations without a template

def _marker_start(text: str, marker: str, thought_end: str) -> int:
    """Where the first call marker after the reasoning (after the last thought_end) starts, or a marker half
    written at the text's end; len(text) when neither."""
    thought = text.rfind(thought_end)
    after = 0 if thought < 0 else thought + len(thought_end)
    found = text.find(marker, after)
    spelling = (i for i in range(max(after, len(text) - len(marker) + 1), len(text)) if marker.startswith(text[i:]))
    return found if found >= 0 else next(spelling, len(text))


def call_start(text: str, family: str) -> int:
    """Where an assistant turn's first tool call starts in the family's format (tools.parse_tool_calls reads the
    calls from there on; len(text) when there is none): Qwen's first <tool_call> after the reasoning (Gemma 4's
    <|tool_call> after its thoughts' <channel|>), Llama 3's whole message when it opens with "{" or <|python_tag|>,
    Gemma's first line that opens with "{". Text still
    being written may be spelling a call out at its end (a half-written "<tool_c", a turn of blanks so far): that
    counts as a start too, so a stream shows the text up to here and a call's text never."""
    if family.startswith("qwen"):
        return _marker_start(text, "<tool_call>", "</think>")
    if family == "gemma4":
        return _marker_start(text, "<|tool_call>", "<channel|>")
    if family == "llama3":
        head = text.lstrip()
        return 0 if head.startswith(("{", "<|python_tag|>")) or "<|python_tag|>".startswith(head) else len(text)
    first = re.search(r"^[ \t]*\{", text, re.MULTILINE)  # tools.GEMMA_CALLS
    return first.start() if first else len(text)


def end_of_turn_id(tok, family: str, calls: bool = False) -> int:
    """The id that ends an assistant turn: the template's end-of-turn token where the tokenizer has it, else its
    EOS (a byte-level tiny model's), as grpo.py's tool demo writes them (tasks.calculator_conversations). With
    calls, the id that ends a turn's tool calls: Gemma 4's <|tool_response> where the tokenizer has it (CALLS_END)."""
    end = tok.token_id(END_OF_TURN[family]) or tok.eos_ids[0]
    return (tok.token_id(CALLS_END[family]) or end) if calls and family in CALLS_END else end


def tool_stop_ids(tok, family: str, stop_ids) -> tuple[int, ...]:
    """Where a turn stops with tools on: stop_ids (data.stop_ids, the end of any turn) and, for Gemma 4, the
    <|tool_response> its calls end with where the tokenizer has it. Sampling, rollouts and the server take these."""
    end = tok.token_id(CALLS_END[family]) if family in CALLS_END else None
    return tuple(dict.fromkeys([*stop_ids] + [end] * (end is not None)))


def assistant_turn_text(message: dict, family: str) -> str:
    """What the model writes in an assistant turn: its text, then each call in the family's format (tools.call_text),
    one a line, as the templates write them (Llama 3's call is the whole message; Gemma 4's calls follow each other)."""
    import tools  # here: tools imports this module inside its functions
    calls = [tools.call_text(family, name, arguments) for name, arguments in _tool_calls(message)]
    return ("" if family == "gemma4" else "\n").join(calls if family == "llama3" and calls
                                                     else filter(None, [message["content"], *calls]))


def plain_conversation_ids(messages: list[dict], tok, family: str, enable_thinking: bool = True) -> list[int]:
    """The ids of a tool conversation for a model without a chat template (a byte-level tiny model), up to where
    the model writes its next turn, as grpo.py --tools trained it: the user message as a plain prompt (tok.encode,
    BOS included; a system message before it as grpo's --system-prompt is, its text and a blank line before the
    prompt and a newline after), each assistant turn as the model writes it (assistant_turn_text) then its
    end-of-turn id (end_of_turn_id: of a turn of calls, with calls=True), each run of tool results as
    tools.result_turn_text's turn, tokenized on its own. tools.rollout builds the same ids while it samples
    (tests/test_serve_tools.py holds them equal). Such a model has no format for a second user message or tools
    listed in the prompt: the former is a ValueError, the latter not shown."""
    import tools
    messages = [_check_message(i, m) for i, m in enumerate(messages)]
    skipped = int(bool(messages) and messages[0]["role"] == "system")  # message i below is message i + skipped
    system, messages = (messages[0]["content"] if skipped else ""), messages[skipped:]
    if not messages or messages[0]["role"] != "user":
        raise ValueError("a model without a chat template takes one user message first (after an optional system)")
    ids, results = tok.encode(f"{system}\n\n{messages[0]['content']}\n" if system else messages[0]["content"]), []
    names = []  # the calls of the last assistant turn, which Gemma 4's results name
    for i, m in enumerate(messages[1:], 1):
        if m["role"] == "tool" and messages[i - 1]["role"] in ("assistant", "tool"):
            results.append(m["content"])
            continue
        if m["role"] != "assistant":
            raise ValueError(f"message {i + skipped}: a model without a chat template takes one user message, then "
                             f"assistant turns, each followed by its tool results; got a {m['role']} message here")
        if results:  # the results of the turn before this one
            ids += tok.encode(tools.result_turn_text(family, results, enable_thinking, names), add_bos=False)
        text, results = assistant_turn_text(m, family), []
        calls = tools.parse_tool_calls(text, family)
        names = [c[0] if isinstance(c, tuple) else "unknown" for c in calls]
        ids += tok.encode(text, add_bos=False) + [end_of_turn_id(tok, family, calls=bool(calls))]
    if results:
        ids += tok.encode(tools.result_turn_text(family, results, enable_thinking, names), add_bos=False)
    return ids
