"""tools.py — tools a chat model can call: plain Python functions, described to the model as JSON schemas.

A tool is a function with type hints and a Google-style docstring (a description, then "Args:" with one
"name: description" per parameter). chat.apply_chat_template(..., tools=[fn]) lists it in the prompt through
function_schema, whose output is the schema transformers' get_json_schema writes (tests/test_tools.py holds the
two equal), so a model sees the same tool list here as there; the library itself never imports transformers.

    function_schema(get_weather)   # → {"type": "function", "function": {"name": "get_weather", ...}}
"""
from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing

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
