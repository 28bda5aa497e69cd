"""serve.py on 127.0.0.1, through the official `openai` client: the same greedy text as sample.py
--chat --prompt (plain and streamed), 16 concurrent clients decoded together as sample.generate decodes
them, mixed greedy, sampled and streamed requests sent at once each answered as when sent alone, a stream
that starts while a long request decodes, a failing decode step answering the requests in flight (no
model), a burst of malformed requests each refused with a 4xx OpenAI-style error and the server still
answering after it, the API key enforced; the real Gemma 3 270M (slow)."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import chat as chat_lib
import ckpt
import sample
import serve
import tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "serve.py", *args, "--port", str(self.port)],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "XLA_FLAGS": ""})
        deadline = time.time() + 300
        while time.time() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=5)
                return
            except urllib.error.HTTPError:  # it answers (401 with --api-key)
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        raise RuntimeError(f"the server did not start: {self.proc.stderr.read()[-2000:] if self.proc.poll() else ''}")

    def client(self, api_key="none"):
        from openai import OpenAI
        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)

    def post(self, path, body: bytes, headers=None):
        """(status, JSON) of a raw POST."""
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stats(self):
        return json.loads(urllib.request.urlopen(self.url + "/stats", timeout=10).read())

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny():
    server = Server("--model", "tiny-qwen3")
    yield server
    server.close()


def cli_chat(*args) -> str:
    r = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr
    return r.stdout[:-1]  # one answer, then its newline


def chat(client, model, prompt, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def test_chat_equals_the_one_shot_cli_plain_and_streamed(tiny):
    client = tiny.client()
    want = cli_chat("--model", "tiny-qwen3", "--chat", "--prompt", "12*3=", "--max-new-tokens", "8")
    plain = chat(client, "tiny-qwen3", "12*3=", max_tokens=8, temperature=0)
    assert plain.choices[0].message.content == want
    assert plain.usage.completion_tokens == 8 and plain.usage.total_tokens == plain.usage.prompt_tokens + 8
    streamed = chat(client, "tiny-qwen3", "12*3=", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-qwen3"]


def test_completions_n_stop_and_seed(tiny):
    client = tiny.client()
    r = client.completions.create(model="tiny-qwen3", prompt="123*4=", max_tokens=6, temperature=0, n=3)
    assert len(r.choices) == 3 and len({c.text for c in r.choices}) == 1  # greedy: the same three times
    text = r.choices[0].text
    cut = client.completions.create(model="tiny-qwen3", prompt="123*4=", max_tokens=6, temperature=0, stop=[text[2:4]])
    assert cut.choices[0].text == text[:text.index(text[2:4])] and cut.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model="tiny-qwen3", prompt="9", max_tokens=6, temperature=1.0, seed=s)
            for s in (7, 7))
    assert a.choices[0].text == b.choices[0].text  # the seed makes sampling reproducible


def greedy_texts(prompts: list[str], max_tokens: int) -> list[str]:
    """What sample.generate makes for these chat prompts on the server's weights (the same preset and seed)."""
    loaded = ckpt.load_model("tiny-qwen3")
    tok = tokenizer.load_tokenizer(None)
    ids = [tok.encode(chat_lib.apply_chat_template([{"role": "user", "content": p}], "qwen3"), add_bos=False)
           for p in prompts]
    eos = (*tok.eos_ids, tok.token_id("<|im_end|>"))
    outs = sample.generate(loaded.model, ids, max_new_tokens=max_tokens, eos_ids=tuple(i for i in eos if i is not None))
    return [tok.decode([t for t in out if t not in eos]) for out in outs]


def at_once(calls) -> list:
    """Each zero-argument call in its own thread, all released together; their results in order."""
    results, barrier = [None] * len(calls), threading.Barrier(len(calls))

    def run(i):
        barrier.wait()
        results[i] = calls[i]()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_sixteen_concurrent_clients_are_batched(tiny):
    prompts = [f"{100 + 37 * i}*{i % 9 + 1}=" for i in range(16)]
    want = greedy_texts(prompts, 8)
    before = tiny.stats()
    clients = [tiny.client() for _ in prompts]
    answers = at_once([lambda c=c, p=p: chat(c, "tiny-qwen3", p, max_tokens=8, temperature=0).choices[0].message.content
                       for c, p in zip(clients, prompts)])
    after = tiny.stats()
    assert answers == want
    prefills, chunks = after["prefills"] - before["prefills"], after["chunks"] - before["chunks"]
    print(f"\n16 concurrent requests: {prefills} prefills, {chunks} decode chunks, at most {after['peak_running']} "
          "decoding together")
    assert after["requests"] - before["requests"] == 16 and after["peak_running"] > 1 and after["running"] == 0


def ask(client, prompt, **kw) -> str:
    """One chat request's text (every choice's, joined by '|'), streamed or not."""
    reply = chat(client, "tiny-qwen3", prompt, **kw)
    if kw.get("stream"):
        return "".join(c.choices[0].delta.content or "" for c in reply)
    return "|".join(c.message.content for c in reply.choices)


def test_mixed_concurrent_requests_answer_as_each_alone(tiny):
    """Greedy, sampled (n = 2 and one alone), streamed and not, all at once: each text is what the request
    gets sent alone (sampled draws depend on the seed and the choice number only), greedy ones sample.generate's."""
    greedy = ["12*3=", "456*7=", "hello"]
    requests = [(p, dict(max_tokens=12, temperature=0)) for p in greedy]
    requests += [(greedy[0], dict(max_tokens=12, temperature=0, stream=True)),
                 ("9", dict(max_tokens=10, temperature=1.0, seed=3, n=2)),
                 ("77", dict(max_tokens=10, temperature=0.8, top_p=0.9, seed=5)),
                 ("77", dict(max_tokens=10, temperature=0.8, top_p=0.9, seed=5, stream=True)),
                 ("31", dict(max_tokens=20, temperature=1.2, seed=11, stream=True))]
    client = tiny.client()
    alone = [ask(client, p, **kw) for p, kw in requests]
    clients = [tiny.client() for _ in requests]
    together = at_once([lambda c=c, p=p, kw=kw: ask(c, p, **kw) for c, (p, kw) in zip(clients, requests)])
    assert together == alone
    want = greedy_texts(greedy, 12)
    assert alone[:4] == want + want[:1]
    assert alone[5] == alone[6] and len(set(alone[4].split("|"))) == 2  # streamed or not; two choices, two draws


def test_a_stream_starts_before_a_long_request_ends(tiny):
    client, long_client = tiny.client(), tiny.client()
    done = {}

    def long_request():
        reply = chat(long_client, "tiny-qwen3", "write", max_tokens=500, temperature=1.0, seed=1)
        done["at"], done["tokens"] = time.perf_counter(), reply.usage.completion_tokens
    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.time() + 120
    while tiny.stats()["running"] == 0 and "at" not in done and time.time() < deadline:  # it is decoding
        time.sleep(0.01)
    first = None
    for c in chat(client, "tiny-qwen3", "12*3=", max_tokens=8, temperature=0, stream=True):
        if first is None and c.choices[0].delta.content:
            first = time.perf_counter()
    thread.join(timeout=300)
    assert done["tokens"] > 100 and first is not None and first < done["at"], (first, done)
    print(f"\nthe stream's first text {done['at'] - first:.2f} s before the long request "
          f"({done['tokens']} tokens) ended")


def test_malformed_requests_get_4xx_and_the_server_goes_on(tiny):
    good = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad = [b"{not json", b"[]", b"", json.dumps({**good, "max_tokens": "many"}).encode(),
           json.dumps({**good, "max_tokens": 10 ** 9}).encode(), json.dumps({**good, "model": "gpt-5"}).encode(),
           json.dumps({**good, "messages": []}).encode(), json.dumps({**good, "messages": [{"role": "x"}]}).encode(),
           json.dumps({**good, "temperature": -1}).encode(), json.dumps({**good, "n": 1000}).encode(),
           json.dumps({**good, "stream": True, "n": 2}).encode(), json.dumps({"model": "tiny-qwen3"}).encode(),
           json.dumps({**good, "messages": [{"role": "user", "content": 5}]}).encode(),
           json.dumps({**good, "max_tokens": 513}).encode(),  # over --max-completion-len
           json.dumps({**good, "messages": [{"role": "user", "content": "x" * 2000}]}).encode()] * 2  # --max-prompt-len
    for body in bad:
        status, reply = tiny.post("/v1/chat/completions", body)
        assert 400 <= status < 500 and set(reply["error"]) >= {"message", "type"}, (body, status, reply)
    status, reply = tiny.post("/v1/completions", json.dumps({"model": "tiny-qwen3", "prompt": 5}).encode())
    assert status == 400
    status, reply = tiny.post("/v1/chat/completions", json.dumps(good).encode())
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"


class FailingFirstEngine:
    """engine.Engine's interface without a model: every request makes ids 5, 6 and the end id 0. The first
    engine made waits for three requests, then its step fails."""
    made = 0

    def __init__(self):
        self.broken, FailingFirstEngine.made = FailingFirstEngine.made == 0, FailingFirstEngine.made + 1
        self.max_prompt, self.N, self.stats, self.requests = 64, 8, {"chunks": 0, "prefills": 0, "tokens": 0}, []

    def add(self, prompt, **settings) -> int:
        self.requests.append(len(self.requests))
        return self.requests[-1]

    def busy(self) -> bool:
        return bool(self.requests)

    def admitting(self) -> bool:
        return False

    def step(self, steps=None):
        if self.broken and len(self.requests) == 3:
            raise RuntimeError("the device went away")
        if self.broken:
            return []
        made, self.requests = [serve.engine.Update(r, [5, 6, 0], [0.0] * 3, True) for r in self.requests], []
        return made


def test_a_failing_step_answers_every_request_in_flight_and_the_worker_goes_on():
    worker = serve.Worker(FailingFirstEngine, tok=None, eos_ids=(0,))
    def job(n, stream):
        return serve.Job([1, 2], max_tokens=8, temperature=0.0, top_p=1.0, seed=0, n=n, stream=stream)
    plain, streamed = worker.submit(job(2, False)), worker.submit(job(1, True))
    with pytest.raises(RuntimeError, match="went away"):
        plain.done.result(timeout=30)
    assert isinstance(streamed.tokens.get(timeout=30), RuntimeError) and streamed.tokens.get(timeout=30) is None
    plain, streamed = worker.submit(job(2, False)), worker.submit(job(1, True))  # a fresh engine answers
    assert plain.done.result(timeout=30) == [([5, 6], "stop")] * 2
    assert [streamed.tokens.get(timeout=30) for _ in range(4)] == [5, 6, 0, None]
    assert worker.stats["failed_steps"] == 1


def test_the_api_key_is_required_when_set():
    server = Server("--model", "tiny-qwen3", "--api-key", "s3cret")
    try:
        from openai import AuthenticationError
        with pytest.raises(AuthenticationError):
            chat(server.client("wrong"), "tiny-qwen3", "hi", max_tokens=2)
        assert chat(server.client("s3cret"), "tiny-qwen3", "hi", max_tokens=2).choices[0].message.role == "assistant"
    finally:
        server.close()


@pytest.mark.slow
def test_the_real_gemma_answers_as_the_cli_does(gemma3_dir):
    server = Server("--ckpt", str(gemma3_dir))
    try:
        client, name = server.client(), gemma3_dir.name
        want = cli_chat("--ckpt", str(gemma3_dir), "--chat", "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "12")
        plain = chat(client, name, "What is the capital of France?", max_tokens=12, temperature=0)
        assert plain.choices[0].message.content == want and want
        streamed = chat(client, name, "What is the capital of France?", max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == want
    finally:
        server.close()
