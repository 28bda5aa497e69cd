"""serve.py on 127.0.0.1, through the official `openai` client: the same greedy text as sample.py
--chat --prompt (plain and streamed), 16 concurrent clients answered correctly in fewer decode loops than
requests, a burst of malformed requests each refused with a 4xx OpenAI-style error and the server still
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


def test_sixteen_concurrent_clients_are_batched(tiny):
    prompts = [f"{100 + 37 * i}*{i % 9 + 1}=" for i in range(16)]
    loaded = ckpt.load_model("tiny-qwen3")  # the server's weights: the same preset, the same seed
    tok = tokenizer.load_tokenizer(None)
    ids = [tok.encode(chat_lib.apply_chat_template([{"role": "user", "content": p}], "qwen3"), add_bos=False)
           for p in prompts]
    eos = (*tok.eos_ids, tok.token_id("<|im_end|>"))
    want = [tok.decode([t for t in out if t not in eos]) for out in
            sample.generate(loaded.model, ids, max_new_tokens=8, eos_ids=tuple(i for i in eos if i is not None))]
    before = tiny.stats()
    answers, barrier = [None] * 16, threading.Barrier(16)

    def ask(i):
        client = tiny.client()
        barrier.wait()
        answers[i] = chat(client, "tiny-qwen3", prompts[i], max_tokens=8, temperature=0).choices[0].message.content
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    after = tiny.stats()
    assert answers == want
    loops = after["decode_loops"] - before["decode_loops"]
    print(f"\n16 concurrent requests: {loops} decode loops")
    assert after["requests"] - before["requests"] == 16 and loops < 16


def test_malformed_requests_get_4xx_and_the_server_goes_on(tiny):
    good = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad = [b"{not json", b"[]", b"", json.dumps({**good, "max_tokens": "many"}).encode(),
           json.dumps({**good, "max_tokens": 10 ** 9}).encode(), json.dumps({**good, "model": "gpt-5"}).encode(),
           json.dumps({**good, "messages": []}).encode(), json.dumps({**good, "messages": [{"role": "x"}]}).encode(),
           json.dumps({**good, "temperature": -1}).encode(), json.dumps({**good, "n": 1000}).encode(),
           json.dumps({**good, "stream": True, "n": 2}).encode(), json.dumps({"model": "tiny-qwen3"}).encode(),
           json.dumps({**good, "messages": [{"role": "user", "content": 5}]}).encode()] * 2
    for body in bad:
        status, reply = tiny.post("/v1/chat/completions", body)
        assert 400 <= status < 500 and set(reply["error"]) >= {"message", "type"}, (body, status, reply)
    status, reply = tiny.post("/v1/completions", json.dumps({"model": "tiny-qwen3", "prompt": 5}).encode())
    assert status == 400
    status, reply = tiny.post("/v1/chat/completions", json.dumps(good).encode())
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"


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
