"""serve.py — an OpenAI-compatible HTTP server for a model.

    python serve.py --ckpt runs/sft/hf                               # http://127.0.0.1:8000/v1
    python serve.py --ckpt DIR --adapter ADAPTER --host 0.0.0.0 --port 8000 --api-key SECRET

Endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions (the family's chat template),
with max_tokens, temperature, top_p, stop, seed, n, stream (server-sent events) and usage counts, so
the `openai` client, evaluation harnesses and applications talk to it unchanged. GET /stats counts
requests and the engine's prefills, decode chunks and tokens.

Requests are decoded with continuous batching (engine.py): one worker thread owns an engine.Engine of
--slots sequences and adds every request (each of its n choices, streamed or not, greedy or sampled) as
soon as it sees it; the request joins the running decode at the next chunk boundary (--chunk steps) and
its slot takes the next request when it ends. The step that admits requests decodes one token, so their
first ids come back right after their prefill; a streamed request gets its ids as its slot makes them.
A choice draws from (seed, its number) alone, so a sampled answer is the same sent alone or beside
others, and a greedy one equals sample.generate's. The KV cache holds --max-prompt-len +
--max-completion-len columns per slot and every step attends all of them: keep them modest.

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
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import chat
import engine
import flags
import sample

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


def answer(worker: Worker, job: Job, stop, kind: str, head: dict) -> dict:
    """A finished job as OpenAI's (chat) completion object: n choices and the usage counts."""
    choices, used = [], 0
    for i, (ids, reason) in enumerate(job.done.result()):
        text, stopped = cut_at_stop(worker.tok.decode(ids), stop)
        used += len(ids)
        body = ({"message": {"role": "assistant", "content": text}} if kind == "chat"
                else {"text": text, "logprobs": None})
        choices.append({"index": i, **body, "finish_reason": "stop" if stopped else reason})
    return {**head, "choices": choices, "usage": {"prompt_tokens": len(job.prompt), "completion_tokens": used,
                                                  "total_tokens": len(job.prompt) + used}}


def events(worker: Worker, job: Job, stop, kind: str, head: dict):
    """A streamed job as server-sent events, OpenAI's chunks: text as it is made (never half a UTF-8
    character until the end), a last chunk with the finish_reason, then [DONE]."""
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
        text, stopped = cut_at_stop(worker.tok.decode(ids), stop)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield chunk({"content": text[len(shown):]})
            shown = text
        if stopped:  # the rest of the stream is drained, not sent
            reason = "stop"
    text = cut_at_stop(worker.tok.decode(ids), stop)[0] if ids else ""
    if len(text) > len(shown):  # it ended inside a character: sent as the non-streamed text has it
        yield chunk({"content": text[len(shown):]})
    yield chunk({}, reason)
    yield "data: [DONE]\n\n"


class Refusal(Exception):
    """A request answered with an HTTP error status and OpenAI's error object."""
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def request_types():
    """The request bodies (pydantic, imported only when serving): their fields and bounds are OpenAI's."""
    from typing import Literal, Union

    from pydantic import BaseModel, Field

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

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
        prompt: str

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
    return Common, CompletionRequest, ChatRequest


def make_app(worker: Worker, model_name: str, family: str | None, max_len: int, api_key: str | None = None):
    """The FastAPI application over a Worker."""
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

    def job_for(req: Common, prompt: list[int], prompt_param: str) -> Job:
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
        return worker.submit(Job(prompt, req.max_tokens, req.temperature, req.top_p, req.seed, req.n, req.stream))

    def respond(req: Common, job: Job, kind: str):
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": model_name}
        if req.stream:
            return StreamingResponse(events(worker, job, req.stop, kind, head), media_type="text/event-stream")
        return answer(worker, job, req.stop, kind, head)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        job = job_for(req, worker.tok.encode(req.prompt), "prompt")
        return respond(req, job, "completion")

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        if family is None:
            raise Refusal(400, "this model has no chat template (a checkpoint of a known family is needed)")
        try:
            text = chat.apply_chat_template([m.model_dump() for m in req.messages], family)
        except ValueError as e:
            raise Refusal(400, str(e), param="messages") from None
        return respond(req, job_for(req, worker.tok.encode(text, add_bos=False), "messages"), "chat")

    return app


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
        model, tok, source, eos = sample.load(cfg)
    name = pathlib.Path(cfg.ckpt).name if cfg.ckpt else cfg.model  # what clients pass as `model`
    make_engine = functools.partial(engine.Engine, model, slots=cfg.slots, max_new_tokens=cfg.max_completion_len,
                                    max_prompt_len=cfg.max_prompt_len, chunk=cfg.chunk, eos_ids=eos)
    app = make_app(Worker(make_engine, tok, eos), name, model.cfg.family, model.cfg.max_seq_len, cfg.api_key)
    print(f"serving {name} ({source}) on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


if __name__ == "__main__":
    main()
