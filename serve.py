"""serve.py — an OpenAI-compatible HTTP server for a model.

    python serve.py --ckpt runs/sft/hf                               # http://127.0.0.1:8000/v1
    python serve.py --ckpt DIR --adapter ADAPTER --host 0.0.0.0 --port 8000 --api-key SECRET

Endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions (the family's chat template),
with max_tokens, temperature, top_p, stop, seed, n, stream (server-sent events) and usage counts, so
the `openai` client, evaluation harnesses and applications talk to it unchanged. GET /stats counts
requests and decode loops.

Requests that arrive together are decoded together: one worker thread owns the model and takes every
request waiting (after a few milliseconds), and runs sample.generate once per group with the same
sampling settings (every greedy request in one ragged batch; a sampled one with its seed). A streamed
request runs sample.stream alone, each token sent as it is made. A malformed request (bad JSON, wrong
types, too many tokens, another model) gets a 4xx with an OpenAI-style error and never stops the
server. FastAPI + uvicorn (pip install fastapi uvicorn) are an optional install.
"""
import dataclasses
import json
import pathlib
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import chat
import flags
import sample

WINDOW_S = 0.005  # how long the worker waits for requests to join the one it has
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


class Engine:
    """The model behind one worker thread: jobs in, ids out, requests that wait together batched."""

    def __init__(self, model, tok, eos_ids):
        self.model, self.tok, self.eos_ids = model, tok, tuple(eos_ids)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.stats = {"requests": 0, "decode_loops": 0}
        threading.Thread(target=self.work, daemon=True).start()

    def submit(self, job: Job) -> Job:
        self.stats["requests"] += 1
        self.jobs.put(job)
        return job

    def work(self):
        while True:
            waiting = [self.jobs.get()]
            time.sleep(WINDOW_S)
            while not self.jobs.empty():
                waiting.append(self.jobs.get())
            groups: dict[tuple, list[Job]] = {}
            for job in waiting:
                if job.stream:
                    self.run_stream(job)
                else:  # greedy requests share one batch; a sampled one keeps its own seed's draws
                    key = (0.0, 1.0, 0) if job.temperature == 0 else (job.temperature, job.top_p, job.seed, id(job))
                    groups.setdefault(key, []).append(job)
            for jobs in groups.values():
                self.run_batch(jobs)

    def run_batch(self, jobs: list[Job]):
        try:
            prompts = [job.prompt for job in jobs for _ in range(job.n)]
            first = jobs[0]
            if first.temperature == 0:  # rows padded to a power of two: a few batch shapes compile, not one per size
                rows = len(prompts)
                prompts += [prompts[-1]] * ((1 << (rows - 1).bit_length()) - rows)
            self.stats["decode_loops"] += 1
            outs = sample.generate(self.model, prompts, max_new_tokens=max(job.max_tokens for job in jobs),
                                   temperature=first.temperature, top_p=first.top_p, seed=first.seed,
                                   eos_ids=self.eos_ids)
            for job in jobs:
                mine, outs = outs[:job.n], outs[job.n:]
                job.done.set_result([self.finish(ids[:job.max_tokens], job.max_tokens) for ids in mine])
        except Exception as e:  # a failure answers these requests; the worker goes on
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(e)

    def run_stream(self, job: Job):
        try:
            self.stats["decode_loops"] += 1
            for token in sample.stream(self.model, job.prompt, max_new_tokens=job.max_tokens,
                                       temperature=job.temperature, top_p=job.top_p, seed=job.seed,
                                       eos_ids=self.eos_ids):
                job.tokens.put(token)
        except Exception as e:
            job.tokens.put(e)
        job.tokens.put(None)

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


def answer(engine: Engine, job: Job, stop, kind: str, head: dict) -> dict:
    """A finished job as OpenAI's (chat) completion object: n choices and the usage counts."""
    choices, used = [], 0
    for i, (ids, reason) in enumerate(job.done.result()):
        text, stopped = cut_at_stop(engine.tok.decode(ids), stop)
        used += len(ids)
        body = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text, "logprobs": None}
        choices.append({"index": i, **body, "finish_reason": "stop" if stopped else reason})
    return {**head, "choices": choices, "usage": {"prompt_tokens": len(job.prompt), "completion_tokens": used,
                                                  "total_tokens": len(job.prompt) + used}}


def events(engine: Engine, job: Job, stop, kind: str, head: dict):
    """A streamed job as server-sent events, OpenAI's chunks: text as it is made (never half a UTF-8
    character), a last chunk with the finish_reason, then [DONE]."""
    def chunk(delta: dict, reason=None):
        body = {"delta": delta} if kind == "chat" else {"text": delta.get("content", ""), "logprobs": None}
        obj = head["object"] + ".chunk" if kind == "chat" else head["object"]
        return "data: " + json.dumps({**head, "object": obj,
                                      "choices": [{"index": 0, **body, "finish_reason": reason}]}) + "\n\n"
    if kind == "chat":
        yield chunk({"role": "assistant", "content": ""})
    ids, shown, reason = [], "", "length"
    while (token := job.tokens.get()) is not None:
        if isinstance(token, Exception) or token in engine.eos_ids:
            reason = "stop" if not isinstance(token, Exception) else "error"
            continue
        ids.append(token)
        text, stopped = cut_at_stop(engine.tok.decode(ids), stop)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield chunk({"content": text[len(shown):]})
            shown = text
        if stopped:  # the rest of the stream is drained, not sent
            reason = "stop"
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


def make_app(engine: Engine, model_name: str, family: str | None, max_len: int, api_key: str | None = None):
    """The FastAPI application over an Engine."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    Common, CompletionRequest, ChatRequest = request_types()

    app = FastAPI()

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

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "nanotune"}]}

    @app.get("/stats")
    def stats():
        return dict(engine.stats)

    def job_for(req: Common, prompt: list[int]) -> Job:
        if req.model != model_name:
            raise Refusal(404, f"the model {req.model!r} does not exist; this server has {model_name!r}",
                          param="model", code="model_not_found")
        if len(prompt) + req.max_tokens > max_len:
            raise Refusal(400, f"prompt ({len(prompt)} tokens) + max_tokens ({req.max_tokens}) exceeds the model's "
                               f"{max_len}", param="max_tokens")
        if req.stream and req.n > 1:
            raise Refusal(400, "stream takes n = 1", param="n")
        return engine.submit(Job(prompt, req.max_tokens, req.temperature, req.top_p, req.seed, req.n, req.stream))

    def respond(req: Common, job: Job, kind: str):
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": model_name}
        if req.stream:
            return StreamingResponse(events(engine, job, req.stop, kind, head), media_type="text/event-stream")
        return answer(engine, job, req.stop, kind, head)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        job = job_for(req, engine.tok.encode(req.prompt))
        return respond(req, job, "completion")

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        if family is None:
            raise Refusal(400, "this model has no chat template (a checkpoint of a known family is needed)")
        try:
            text = chat.apply_chat_template([m.model_dump() for m in req.messages], family)
        except ValueError as e:
            raise Refusal(400, str(e), param="messages") from None
        return respond(req, job_for(req, engine.tok.encode(text, add_bos=False)), "chat")

    return app


@dataclasses.dataclass
class Config(sample.LoadFlags):
    # -- server --
    host: str = "127.0.0.1"  # the address to bind (this machine only; 0.0.0.0: every network interface)
    port: int = 8000  # the port
    api_key: str | None = None  # refuse requests without 'Authorization: Bearer KEY'

    def __post_init__(self):
        flags.check([(self.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {self.dtype!r}"),
                     (0 <= self.port < 65536, f"--port must be 0..65535, got {self.port}")])


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
    app = make_app(Engine(model, tok, eos), name, model.cfg.family, model.cfg.max_seq_len, cfg.api_key)
    print(f"serving {name} ({source}) on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


if __name__ == "__main__":
    main()
