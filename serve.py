"""serve.py — an OpenAI-compatible HTTP server for a model.

    python serve.py --ckpt runs/sft/hf                               # http://127.0.0.1:8000/v1
    python serve.py --ckpt DIR --adapter ADAPTER --host 0.0.0.0 --port 8000 --api-key SECRET

Endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions (the family's chat template),
with max_tokens, temperature, top_p, stop, seed, n, stream (server-sent events) and usage counts, so
the `openai` client, evaluation harnesses and applications talk to it unchanged. GET /stats counts
requests and the engine's prefills, decode chunks and tokens. /v1/completions is also OpenAI's legacy API as
evaluation harnesses use it (lm-eval's local-completions): prompts as token ids, echo, logprobs (top N) and
max_tokens 0, the log-probs from one forward pass over prompt and completion (legacy_completions.py).

Requests are decoded with continuous batching (engine.py): one worker thread owns an engine.Engine of
--slots sequences and adds every request (each of its n choices, streamed or not, greedy or sampled) as
soon as it sees it; the request joins the running decode at the next chunk boundary (--chunk steps) and
its slot takes the next request when it ends. The step that admits requests decodes one token, so their
first ids come back right after their prefill; a streamed request gets its ids as its slot makes them.
A choice draws from (seed, its number) alone, so a sampled answer is the same sent alone or beside
others, and a greedy one equals sample.generate's. The KV cache holds --max-prompt-len +
--max-completion-len columns per slot and every step attends all of them: keep them modest.

Tools, as OpenAI's function calling: a chat request's `tools` (function definitions) are listed through the
family's template, and an answer that calls them in the family's format (tools.parse_tool_calls) comes back as
message.tool_calls (an id, the function's name, its arguments as JSON text) with finish_reason "tool_calls",
the text before the calls as content; streamed, that text streams and the calls come whole at the turn's end.
The results go back as role "tool" messages. tool_choice: "auto" (the default), "none" (no list, no calls
read), "required" and a named function (the server writes the start of the call, up to the name or up to the
arguments, and the model goes on from there: decoding is not constrained, so a model can still write a
malformed call, which comes back as text). A checkpoint without a chat template (the byte-level tiny models)
gets a conversation with tools as grpo.py --tools trained it: the question as a plain prompt, no tool list
(chat.plain_conversation_ids).

A malformed request (bad JSON, wrong types, too many tokens, another model) gets a 4xx with an
OpenAI-style error and never stops the server; a failing decode step answers every request in flight
with the error and the worker goes on with a fresh engine. FastAPI + uvicorn (pip install fastapi
uvicorn) are an optional install.
"""
import dataclasses
import functools
import json
import pathlib
import queue
import re
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import chat
import engine
import flags
import legacy_completions as legacy
import sample
import tools

MAX_N = 16


@dataclass
class Job:
    """One request's prompt(s) and settings; `done` gets [(ids, finish_reason)] per choice, or `tokens` gets
    each id as it is made (stream), then None."""
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    n: int
    stream: bool
    done: Future = field(default_factory=Future)
    tokens: queue.Queue = field(default_factory=queue.Queue)
    outputs: list[list[int]] = field(default_factory=list)  # per choice, the ids so far (the worker's)
    left: int = 0  # choices still decoding


class Worker:
    """The one thread that owns an engine.Engine (it is not thread-safe): jobs in, ids out. Each choice of a
    job is one engine request, added as soon as the thread sees the job, so it joins the running decode at the
    next chunk boundary; the thread steps the engine while it is busy and sleeps on the job queue when not."""

    def __init__(self, make_engine, tok, eos_ids):
        self.make_engine, self.tok, self.eos_ids = make_engine, tok, tuple(eos_ids)
        self.engine: engine.Engine = make_engine()
        self.max_prompt, self.max_new = self.engine.max_prompt, self.engine.N  # the most a request may bring, ask
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.running: dict[int, tuple[Job, int]] = {}  # engine request id → its job and choice number
        self.stats = {"requests": 0, "running": 0, "peak_running": 0, "failed_steps": 0, **self.engine.stats}
        threading.Thread(target=self.work, daemon=True).start()

    def submit(self, job: Job) -> Job:
        self.stats["requests"] += 1
        self.jobs.put(job)
        return job

    def work(self):
        while True:
            self.take(block=not self.engine.busy())
            # a step that admits requests decodes one token only, so their first ids come back at once (engine.step
            # hands out ids after its decode chunk, and a stream waits for them); the others run whole chunks
            try:
                updates = self.engine.step(1 if self.engine.admitting() else None)
            except Exception as e:  # a failure answers every request in flight; the worker goes on
                self.fail_all(e)
                continue
            self.stats.update(self.engine.stats, running=len(self.running) - sum(u.done for u in updates),
                              peak_running=max(self.stats["peak_running"], len(updates)))  # before any answer
            for update in updates:
                self.deliver(update)

    def take(self, block: bool):
        """Every job waiting into the engine (block: wait for the first), one engine request per choice, each
        choice's draws from (the job's seed, its number): the same text alone or beside others."""
        while True:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                return
            block = False
            job.outputs, job.left = [[] for _ in range(job.n)], job.n
            try:
                for i in range(job.n):
                    rid = self.engine.add(job.prompt, max_new_tokens=job.max_tokens, temperature=job.temperature,
                                          top_p=job.top_p, seed=job.seed, index=i)
                    self.running[rid] = (job, i)
            except Exception as e:  # choices already added run on; deliver() drops what they make
                self.fail(job, e)

    def deliver(self, update: engine.Update):
        """An engine update to its job: each id onto a stream, or the choice's ids kept until all choices end."""
        job, choice = self.running[update.request]
        if update.done:
            del self.running[update.request]
        if job.stream:
            for token in update.ids:
                job.tokens.put(token)
            if update.done:
                job.tokens.put(None)
            return
        job.outputs[choice] += update.ids
        job.left -= update.done
        if job.left == 0 and not job.done.done():
            job.done.set_result([self.finish(ids, job.max_tokens) for ids in job.outputs])

    def fail(self, job: Job, error: Exception):
        if job.stream:
            job.tokens.put(error)
            job.tokens.put(None)
        elif not job.done.done():
            job.done.set_exception(error)

    def fail_all(self, error: Exception):
        """Every job in flight answered with the error, and a fresh engine (the old one's state is unknown)."""
        self.stats["failed_steps"] += 1
        for job in {id(job): job for job, _ in self.running.values()}.values():
            self.fail(job, error)
        self.running.clear()
        self.engine = self.make_engine()

    def finish(self, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
        """The ids without the end token, and OpenAI's finish_reason."""
        if ids and ids[-1] in self.eos_ids:
            return ids[:-1], "stop"
        return ids, "length" if len(ids) >= max_tokens else "stop"


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
    """text up to the first of the stop strings, and whether one was found."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


class ToolUse(NamedTuple):
    """How a chat request's answer is read for tool calls."""
    family: str  # the call format (tools.parse_tool_calls)
    forced: str  # text already written at the start of the turn (tool_choice "required" or a named function)
    parallel: bool  # parallel_tool_calls: False keeps the first call only


def answer(worker: Worker, job: Job, stop, head: dict, use: ToolUse | None = None) -> dict:
    """A finished chat job as OpenAI's chat completion object: n choices and the usage counts; with use, each
    choice's tool calls parsed out of its text (tool_message)."""
    choices, used = [], 0
    for i, (ids, reason) in enumerate(job.done.result()):
        text, stopped = cut_at_stop(decode(worker.tok, ids, use), stop)
        used, reason = used + len(ids), "stop" if stopped else reason
        message, reason = tool_message(text, reason, use) if use else ({"role": "assistant", "content": text}, reason)
        choices.append({"index": i, "message": message, "finish_reason": reason})
    return {**head, "choices": choices, "usage": usage(len(job.prompt), used)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_answer(worker: Worker, jobs: list[Job], texts: list[str], req, head: dict,
                      scorer: legacy.Scorer | None) -> dict:
    """Finished completion jobs, one per prompt, as OpenAI's text_completion object: choice p·n + j is prompt p's
    j-th; with echo each text starts with its prompt's, and with req.logprobs each choice has OpenAI's legacy
    logprobs object (legacy.choice_logprobs: the prompt's tokens too with echo), of the text sent (a stop string's
    cut drops the tokens after it)."""
    choices, used = [], 0
    for p, job in enumerate(jobs):
        for j, (ids, reason) in enumerate(job.done.result()):
            text, stopped = cut_at_stop(worker.tok.decode(ids), req.stop)
            used, reason = used + len(ids), "stop" if stopped else reason
            shown = legacy.kept_tokens(worker.tok, ids, text) if stopped else ids
            logprobs = None if req.logprobs is None else legacy.choice_logprobs(
                scorer, worker.tok, job.prompt, texts[p], shown, req.logprobs, req.echo)
            choices.append({"index": p * req.n + j, "text": texts[p] + text if req.echo else text,
                            "logprobs": logprobs, "finish_reason": reason})
    return {**head, "choices": choices, "usage": usage(sum(len(job.prompt) for job in jobs), used)}


def events(worker: Worker, job: Job, stop, kind: str, head: dict, use: ToolUse | None = None):
    """A streamed job as server-sent events, OpenAI's chunks: text as it is made (never half a UTF-8
    character until the end), a last chunk with the finish_reason, then [DONE]. With use (tools), the text
    before a call streams (chat.call_start) and the calls come whole when the turn ends, as OpenAI's
    delta.tool_calls (index, id, type, function name and JSON arguments), then finish_reason "tool_calls"."""
    def chunk(delta: dict, reason=None):
        body = {"delta": delta} if kind == "chat" else {"text": delta.get("content", ""), "logprobs": None}
        obj = head["object"] + ".chunk" if kind == "chat" else head["object"]
        return "data: " + json.dumps({**head, "object": obj,
                                      "choices": [{"index": 0, **body, "finish_reason": reason}]}) + "\n\n"
    if kind == "chat":
        yield chunk({"role": "assistant", "content": ""})
    ids, shown, reason = [], "", "length"
    while (token := job.tokens.get()) is not None:
        if isinstance(token, Exception) or token in worker.eos_ids:
            reason = "stop" if not isinstance(token, Exception) else "error"
            continue
        ids.append(token)
        text, stopped = cut_at_stop(decode(worker.tok, ids, use), stop)
        if use:  # only the text before a call, never a call's (its whole text is use.forced + the model's)
            text = (use.forced + text)[:chat.call_start(use.forced + text, use.family)].rstrip()
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield chunk({"content": text[len(shown):]})
            shown = text
        if stopped:  # the rest of the stream is drained, not sent
            reason = "stop"
    text = cut_at_stop(decode(worker.tok, ids, use), stop)[0] if ids else ""
    message, reason = tool_message(text, reason, use) if use else ({"content": text}, reason)
    if len(message["content"] or "") > len(shown):  # it ended inside a character: sent as the non-streamed text has it
        yield chunk({"content": message["content"][len(shown):]})
    if message.get("tool_calls"):
        yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]})
    yield chunk({}, reason)
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- tools: OpenAI's function calling

def decode(tok, ids: list[int], use: ToolUse | None) -> str:
    """A completion's text; with tools, the family's call markers kept where the tokenizer holds them as special
    tokens (tools._decode_turn), which calls are parsed from."""
    return tools._decode_turn(tok, ids, use.family) if use else tok.decode(ids)


def tool_message(text: str, reason: str, use: ToolUse) -> tuple[dict, str]:
    """OpenAI's assistant message for a turn's text (after use.forced), and its finish_reason: when the turn ended
    (not cut at max_tokens) with well-formed calls in the family's format, {"content": the text before them or
    None, "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]} and
    "tool_calls"; else the whole text as content (a malformed call stays there, as the model wrote it)."""
    text = use.forced + text
    calls = [c for c in tools.parse_tool_calls(text, use.family) if not isinstance(c, str)] if reason == "stop" else []
    if not calls:
        return {"role": "assistant", "content": text}, reason
    return {"role": "assistant", "content": text[:chat.call_start(text, use.family)].rstrip() or None,
            "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
                           for name, arguments in calls[:None if use.parallel else 1]]}, "tool_calls"


TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name


def check_tools(definitions: list | None) -> list[dict]:
    """A request's tools: OpenAI's function definitions [{"type": "function", "function": {"name", "description",
    "parameters": a JSON Schema object}}], returned as given (a chat template lists them so, as transformers
    does); the first fault is a 400 with param "tools"."""
    names = set()
    for i, tool in enumerate(definitions or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        parameters = function.get("parameters", {"type": "object"}) if isinstance(function, dict) else None
        fault = ('expected {"type": "function", "function": {"name", "description", "parameters"}}, got '
                 + json.dumps(tool)[:200] if not isinstance(function, dict) or tool.get("type") != "function" else
                 f"function.name must be 1 to 64 letters, digits, _ or -, got {function.get('name')!r}"
                 if not isinstance(function.get("name"), str) or not TOOL_NAME.fullmatch(function["name"]) else
                 f"two tools are named {function['name']!r}" if function["name"] in names else
                 "function.description must be a string" if not isinstance(function.get("description", ""), str) else
                 schema_fault(parameters))
        if fault:
            raise Refusal(400, f"tools[{i}]: {fault}", param="tools")
        names.add(function["name"])
    return definitions or []


def schema_fault(parameters) -> str | None:
    """Why a function's parameters are not a JSON Schema object OpenAI takes; None when they are."""
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        return f'function.parameters must be a JSON Schema object ({{"type": "object", ...}}), got {parameters!r}'[:300]
    properties, required = parameters.get("properties", {}), parameters.get("required", [])
    if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
        return "function.parameters.properties must map each parameter's name to its JSON schema"
    if not isinstance(required, list) or not all(isinstance(r, str) and r in properties for r in required):
        return f"function.parameters.required must list names of its properties, got {required!r}"[:300]
    return None


def check_tool_choice(choice, definitions: list[dict]) -> tuple[str, str | None]:
    """tool_choice as (mode, function name): "auto" (the default with tools: listed, and calls parsed), "none"
    (neither), "required" (the turn opens a call, the model names the function) or ("function", name) (the call
    is opened up to its arguments). Anything else, or one that needs tools without them, is a 400."""
    if choice is None or choice in ("auto", "none"):
        return ("auto" if definitions else "none") if choice is None else choice, None
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if choice != "required" and not isinstance(name, str):
        raise Refusal(400, 'tool_choice: expected "none", "auto", "required" or {"type": "function", "function": '
                           f'{{"name": ...}}}}, got {json.dumps(choice)[:200]}', param="tool_choice")
    listed = [t["function"]["name"] for t in definitions]
    if not listed:
        raise Refusal(400, f"tool_choice {json.dumps(choice)[:200]} needs tools", param="tool_choice")
    if name is not None and name not in listed:
        raise Refusal(400, f"tool_choice names the function {name!r}, which is not among the tools "
                           f"({', '.join(listed)})", param="tool_choice")
    return ("function", name) if name is not None else ("required", None)


def forced_call(family: str, mode: str, name: str | None) -> str:
    """The start of a call in the family's format that tool_choice writes for the model (the model cannot be
    made to call otherwise: decoding is not constrained): "required", up to the function's name; a named
    function, up to its arguments. "" for auto and none."""
    if mode == "required":
        text = tools.call_text(family, "\ue000", {})  # a character JSON writes as itself, to find the name's place
        return text[:text.index("\ue000")]
    return tools.call_text(family, name, {}).rpartition("{}")[0] if mode == "function" else ""


def chat_prompt(req, tok, family: str, chat_template: bool) -> tuple[list[int], ToolUse | None]:
    """A chat request's prompt ids (sample.conversation_ids: the family's template, or grpo.py --tools's format for
    a checkpoint without one), then the call tool_choice opens, if any; and how to read its answer's calls (None:
    tool_choice "none", or no tools)."""
    definitions = check_tools(req.tools)
    mode, name = check_tool_choice(req.tool_choice, definitions)
    forced = forced_call(family, mode, name)
    try:
        ids = sample.conversation_ids(chat_messages(req.messages), tok, family, chat_template,
                                      definitions if mode != "none" else None)
    except ValueError as e:
        raise Refusal(400, str(e), param="messages") from None
    ids += tok.encode(forced, add_bos=False) if forced else []
    return ids, ToolUse(family, forced, req.parallel_tool_calls) if mode != "none" else None


def chat_messages(messages) -> list[dict]:
    """The request's messages as chat.py takes them: an assistant's tool_calls with their arguments, OpenAI's JSON
    text, parsed (text that is not a JSON object is a 400); tool_call_id is dropped (no template reads it)."""
    out = []
    for i, m in enumerate(messages):
        message = {"role": m.role, "content": m.content}
        for j, call in enumerate(m.tool_calls or []):
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                arguments = None
            if m.role != "assistant" or not isinstance(arguments, dict):
                raise Refusal(400, f"messages[{i}].tool_calls[{j}]: an assistant's call's function.arguments are a "
                                   f"JSON object as text, got {call.function.arguments[:100]!r} ({m.role})",
                              param="messages")
            message.setdefault("tool_calls", []).append(
                {"type": "function", "function": {"name": call.function.name, "arguments": arguments}})
        out.append(message)
    return out


class Refusal(Exception):
    """A request answered with an HTTP error status and OpenAI's error object."""
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def request_types():
    """The request bodies (pydantic, imported only when serving): their fields and bounds are OpenAI's."""
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, Field

    class Function(BaseModel):
        name: str
        arguments: str  # JSON text (OpenAI's)

    class ToolCall(BaseModel):
        id: str = ""
        type: Literal["function"] = "function"
        function: Function

    class Message(BaseModel):
        role: Literal["system", "user", "assistant", "tool"]
        content: Optional[str] = None  # None: an assistant's turn that only calls tools
        tool_calls: Optional[list[ToolCall]] = None
        tool_call_id: Optional[str] = None

    class Common(BaseModel):
        model: str
        max_tokens: int = Field(16, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        n: int = Field(1, ge=1, le=MAX_N)
        stop: Union[str, list[str], None] = None
        seed: int = 0
        stream: bool = False

    class CompletionRequest(Common):
        prompt: Union[str, list]  # text, texts, ids or lists of ids (legacy.prompt_ids: a 400 naming the fault)
        max_tokens: int = Field(16, ge=0)  # 0: nothing generated (with echo and logprobs: the prompt scored)
        echo: bool = False
        logprobs: Optional[int] = Field(None, ge=0, le=legacy.MAX_LOGPROBS)

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        tools: Optional[list] = None  # checked by check_tools (a 400 naming the fault, param "tools")
        tool_choice: Union[str, dict, None] = None
        parallel_tool_calls: bool = True
    return Common, CompletionRequest, ChatRequest


def make_app(worker: Worker, model_name: str, family: str | None, max_len: int, api_key: str | None = None,
             chat_template: bool = True, scorer: legacy.Scorer | None = None, vocab_size: int | None = None):
    """The FastAPI application over a Worker. chat_template: the checkpoint has one (sample.Loaded's); without,
    a conversation with tools is written as grpo.py --tools trains such a model (sample.conversation_ids).
    scorer: the model's forward pass for /v1/completions' logprobs (None: a request for them is a 400);
    vocab_size: the ids a prompt of token ids may hold (None: the tokenizer's)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    Common, CompletionRequest, ChatRequest = request_types()

    app = FastAPI()
    answer_errors(app, api_key)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "nanotune"}]}

    @app.get("/stats")
    def stats():
        return dict(worker.stats)

    def respond(req: Common, job: Job, kind: str, use: ToolUse | None = None):
        head = head_of(kind, model_name)
        if req.stream:
            return StreamingResponse(events(worker, job, req.stop, kind, head, use), media_type="text/event-stream")
        return answer(worker, job, req.stop, head, use)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        """Text or token-id prompts, one job each; echo and logprobs as OpenAI's legacy API (legacy_completions)."""
        try:
            prompts, texts = legacy.prompts_of(req, worker.tok, vocab_size or worker.tok.vocab_size, scorer is not None)
        except legacy.PromptFault as e:
            raise Refusal(400, str(e), param=e.param) from None
        for prompt in prompts:  # every prompt checked before any is decoded
            check_request(req, prompt, "prompt", worker, model_name, max_len)
        jobs = [submit(worker, req, prompt) for prompt in prompts]
        if req.stream:
            return respond(req, jobs[0], "completion")
        return completion_answer(worker, jobs, texts, req, head_of("completion", model_name), scorer)

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        """With tools, OpenAI's function calling (chat_prompt, tool_message)."""
        if family is None:
            raise Refusal(400, "this model has no chat template (a checkpoint of a known family is needed)")
        ids, use = chat_prompt(req, worker.tok, family, chat_template)
        check_request(req, ids, "messages", worker, model_name, max_len)
        return respond(req, submit(worker, req, ids), "chat", use)

    return app


def check_request(req, prompt: list[int], prompt_param: str, worker: Worker, model_name: str, max_len: int):
    """A 4xx Refusal for a request this server cannot answer: another model, a prompt or max_tokens over the
    server's or the model's limits, a stream of several choices."""
    if req.model != model_name:
        raise Refusal(404, f"the model {req.model!r} does not exist; this server has {model_name!r}",
                      param="model", code="model_not_found")
    if len(prompt) > worker.max_prompt:
        raise Refusal(400, f"the prompt ({len(prompt)} tokens) is longer than this server takes "
                           f"({worker.max_prompt}, --max-prompt-len)", param=prompt_param)
    if req.max_tokens > worker.max_new:
        raise Refusal(400, f"max_tokens ({req.max_tokens}) exceeds this server's {worker.max_new} "
                           "(--max-completion-len)", param="max_tokens")
    if len(prompt) + req.max_tokens > max_len:
        raise Refusal(400, f"prompt ({len(prompt)} tokens) + max_tokens ({req.max_tokens}) exceeds the model's "
                           f"{max_len}", param="max_tokens")
    if req.stream and req.n > 1:
        raise Refusal(400, "stream takes n = 1", param="n")


def submit(worker: Worker, req, prompt: list[int]) -> Job:
    """The prompt's job, in the worker's queue; max_tokens 0 (a prompt scored, nothing made) answered here."""
    job = Job(prompt, req.max_tokens, req.temperature, req.top_p, req.seed, req.n, req.stream)
    if req.max_tokens > 0:
        return worker.submit(job)
    job.done.set_result([([], "length")] * req.n)
    job.tokens.put(None)
    return job


def head_of(kind: str, model_name: str) -> dict:
    """The fields a (chat) completion object and its stream's chunks start with: a fresh id, the time, the model."""
    return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
            "model": model_name}


def answer_errors(app, api_key: str | None):
    """Refusals, invalid bodies and a missing API key answered as OpenAI's error objects."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(Refusal)
    async def refused(request: Request, e: Refusal):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:] if isinstance(p, str)) or None
        return JSONResponse({"error": {"message": f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                                       "type": "invalid_request_error", "param": where, "code": None}},
                            status_code=400)

    @app.middleware("http")
    async def authorise(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "a valid API key is needed (Authorization: Bearer ...)",
                                           "type": "invalid_request_error", "param": None,
                                           "code": "invalid_api_key"}}, status_code=401)
        return await call_next(request)


@dataclasses.dataclass
class Config(sample.LoadFlags):
    # -- server --
    host: str = "127.0.0.1"  # the address to bind (this machine only; 0.0.0.0: every network interface)
    port: int = 8000  # the port
    api_key: str | None = None  # refuse requests without 'Authorization: Bearer KEY'
    # -- decoding (engine.py) --
    slots: int = 16  # requests decoded at once (more wait for a free slot)
    # the longest prompt in tokens, rounded up to a power of two (longer: a 400 error); with the next, the KV cache
    max_prompt_len: int = 1024
    # the largest max_tokens a request may ask; the cache holds prompt + completion and every decode step attends all
    max_completion_len: int = 512
    chunk: int = 4  # decode steps between two visits of the worker (a new request waits at most this many to join)

    def __post_init__(self):
        flags.check([(self.dtype in ("float32", "bfloat16"),
                      f"--dtype must be float32 or bfloat16, got {self.dtype!r}"),
                     (0 <= self.port < 65536, f"--port must be 0..65535, got {self.port}"),
                     (min(self.slots, self.max_prompt_len, self.max_completion_len, self.chunk) >= 1,
                      "need --slots, --max-prompt-len, --max-completion-len and --chunk >= 1")])


def main(argv=None):
    """Load the model, then serve until Ctrl-C (uvicorn)."""
    cfg = flags.parse(Config, argv)
    try:
        import fastapi  # noqa: F401 (make_app builds on it)
        import uvicorn
    except ImportError:
        flags.fail("serve.py needs FastAPI and uvicorn: pip install fastapi uvicorn")
    with flags.user_errors():
        loaded = sample.load(cfg)
        model, tok, source, eos, _ = loaded
    eos = chat.tool_stop_ids(tok, model.cfg.family, eos)  # Gemma 4's calls stop at <|tool_response> too
    name = pathlib.Path(cfg.ckpt).name if cfg.ckpt else cfg.model  # what clients pass as `model`
    make_engine = functools.partial(engine.Engine, model, slots=cfg.slots, max_new_tokens=cfg.max_completion_len,
                                    max_prompt_len=cfg.max_prompt_len, chunk=cfg.chunk, eos_ids=eos)
    app = make_app(Worker(make_engine, tok, eos), name, model.cfg.family, model.cfg.max_seq_len, cfg.api_key,
                   loaded.chat_template, legacy.Scorer(model), model.cfg.vocab_size)
    print(f"serving {name} ({source}) on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


if __name__ == "__main__":
    main()
