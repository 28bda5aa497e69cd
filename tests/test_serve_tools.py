"""Tools through serve.py and sample.py --chat --tools, with the official `openai` client, streamed and not.

Quick: a server over a scripted engine (engine.Engine's interface, no model: it answers as the calculator demo's
model does) checks the protocol: tools listed by a chat template, calls returned as OpenAI's tool_calls with
finish_reason "tool_calls", results sent back as role "tool" messages, the ids a model without a chat template
sees equal to tools.rollout's, tool_choice, malformed tools and calls refused with OpenAI's 400. Slow: the model
`python grpo.py --tools calculator` exports, served and driven by the client, answers as the library's own greedy
rollout does (tools.generate), and sample.py --chat --tools on it."""
import json
import re
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from openai import BadRequestError
from test_serve import ROOT, Server, free_port

import chat
import data
import engine
import sample
import serve
import tasks
import tokenizer
import tools

BYTES = tokenizer.ByteTokenizer()
END = BYTES.eos_ids[0]  # where the byte-level model's turns end
CALCULATOR = tools.function_schema(tasks.calculator)


# ----------------------------------------------------------------------------- a server over a scripted engine

def calculator_script(prompt: str) -> str:
    """What the demo's model writes after a prompt: given a problem, a call of the calculator on it; given the
    call's result, the result. A prompt that opened the call for it (tool_choice) gets the rest of a call."""
    if prompt.endswith('"arguments": '):
        return '{"expression": "2+3"}}\n</tool_call>'
    if prompt.endswith('{"name": "'):
        return 'calculator", "arguments": {"expression": "4*5"}}\n</tool_call>'
    if "<tool_response>" in prompt:
        return prompt.rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>")[0]
    expression = re.findall(r"(\d+[*+]\d+)=", prompt)[-1]
    return tools.call_text("qwen3", "calculator", {"expression": expression})


class ScriptedEngine:
    """engine.Engine's interface without a model: a request's ids are script(its prompt's text) in bytes, then the
    end id, cut to its max_new_tokens; each prompt it is given is kept in `prompts`."""

    def __init__(self, script, prompts: list):
        self.script, self.prompts, self.waiting = script, prompts, {}
        self.max_prompt, self.N, self.stats = 4096, 512, {"chunks": 0, "prefills": 0, "tokens": 0}

    def add(self, prompt, *, max_new_tokens, **settings) -> int:
        self.prompts.append(list(prompt))
        ids = BYTES.encode(self.script(BYTES.decode(prompt)), add_bos=False) + [END]
        self.waiting[len(self.prompts)] = ids[:max_new_tokens]
        return len(self.prompts)

    def busy(self) -> bool:
        return bool(self.waiting)

    def admitting(self) -> bool:
        return False

    def step(self, steps=None):
        made, self.waiting = [engine.Update(r, ids, [0.0] * len(ids), True) for r, ids in self.waiting.items()], {}
        return made


class ScriptedServer:
    """serve.make_app over a ScriptedEngine, served by uvicorn in a thread of this process."""

    def __init__(self, chat_template: bool, script=calculator_script, family: str = "qwen3"):
        self.prompts = []
        worker = serve.Worker(lambda: ScriptedEngine(script, self.prompts), BYTES, (END,))
        app = serve.make_app(worker, "demo", family, 8192, chat_template=chat_template)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    client, post = Server.client, Server.post

    def seen(self) -> str:
        """The text of the last prompt the engine got."""
        return BYTES.decode(self.prompts[-1])


@pytest.fixture(scope="module")
def plain():
    """A server of a model without a chat template (the byte-level demo's)."""
    server = ScriptedServer(chat_template=False)
    yield server
    server.server.should_exit = True


@pytest.fixture(scope="module")
def templated():
    """A server of a Qwen 3 checkpoint with its chat template (in bytes here)."""
    def script(prompt):  # a few words before the call, except in a call the prompt opened (tool_choice)
        opened = prompt.endswith(('"arguments": ', '{"name": "'))
        return ("" if opened else "Let me compute that.\n") + calculator_script(prompt)
    server = ScriptedServer(chat_template=True, script=script)
    yield server
    server.server.should_exit = True


def ask(client, messages, stream: bool, **kw) -> tuple:
    """One chat request → collect's (content, calls, finish_reason)."""
    return collect(client.chat.completions.create(model="demo", messages=messages, stream=stream, **kw), stream)


def collect(reply, stream: bool) -> tuple:
    """A reply → (content, [(id, name, arguments text)], finish_reason); a stream put together by each call's index,
    as OpenAI's documentation does."""
    if not stream:
        choice = reply.choices[0]
        calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, reason = "", {}, None
    for piece in reply:
        delta, reason = piece.choices[0].delta, piece.choices[0].finish_reason or reason
        content += delta.content or ""
        for call in delta.tool_calls or []:
            old = calls.setdefault(call.index, ["", "", ""])
            calls[call.index] = [old[0] + (call.id or ""), old[1] + (call.function.name or ""),
                                 old[2] + (call.function.arguments or "")]
    return content or None, [tuple(calls[i]) for i in sorted(calls)], reason


def sent_back(messages, calls, results) -> list[dict]:
    """The conversation after the client ran the calls: the assistant's calls as OpenAI writes them, each result
    as a role "tool" message with its call's id."""
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": name, "arguments": arguments}}
        for i, name, arguments in calls]}
    return messages + [assistant] + [{"role": "tool", "tool_call_id": i, "content": result}
                                     for (i, _, _), result in zip(calls, results)]


def run_calls(calls) -> list[str]:
    """What the client does with the calls: runs each (only the calculator is known) on its JSON arguments."""
    assert all(name == "calculator" for _, name, _ in calls), calls
    return [tasks.calculator(**json.loads(arguments)) for _, _, arguments in calls]


# ----------------------------------------------------------------------------- the protocol

@pytest.mark.parametrize("stream", [False, True])
def test_a_model_without_a_template_calls_gets_the_result_and_answers(plain, stream):
    """The demo's protocol: a problem and the calculator's schema → a call with JSON arguments; the result sent
    back → the answer. The model sees exactly the ids tools.rollout feeds it (a scripted rollout: the same)."""
    client, messages = plain.client(), [{"role": "user", "content": "123*456="}]
    content, calls, reason = ask(client, messages, stream, tools=[CALCULATOR], max_tokens=128)
    assert (content, reason) == (None, "tool_calls") and len(calls) == 1
    assert calls[0][0].startswith("call_") and calls[0][1:] == ("calculator", '{"expression": "123*456"}')
    assert plain.prompts[-1] == BYTES.encode("123*456=")  # a plain prompt, BOS first, no tool list
    content, calls2, reason = ask(client, sent_back(messages, calls, run_calls(calls)), stream, tools=[CALCULATOR],
                                  max_tokens=128)
    assert (content, calls2, reason) == ("56088", [], "stop")
    turns = [tools.call_text("qwen3", "calculator", {"expression": "123*456"}), "56088"]
    rollout = tools.scripted(BYTES.encode("123*456="), turns, BYTES, "qwen3", [tasks.calculator], END, 192)
    answer = BYTES.encode("56088", add_bos=False) + [END]
    assert plain.prompts[-1] == BYTES.encode("123*456=") + rollout.completion[:-len(answer)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_template_lists_the_tools_and_the_text_before_a_call_is_content(templated, stream):
    client, messages = templated.client(), [{"role": "user", "content": "What is 12*34=?"}]
    content, calls, reason = ask(client, messages, stream, tools=[CALCULATOR], max_tokens=200)
    assert templated.seen() == chat.apply_chat_template(messages, "qwen3", tools=[CALCULATOR])
    assert (content, reason) == ("Let me compute that.", "tool_calls")
    assert [c[1:] for c in calls] == [("calculator", '{"expression": "12*34"}')]
    back = sent_back(messages, calls, run_calls(calls))
    back[1]["content"] = content
    content, calls2, reason = ask(client, back, stream, tools=[CALCULATOR], max_tokens=200)
    assert (calls2, reason) == ([], "stop") and content.endswith("408")
    rendered = [back[0], {"role": "assistant", "content": "Let me compute that.", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}]},
                {"role": "tool", "content": "408"}]
    assert templated.seen() == chat.apply_chat_template(rendered, "qwen3", tools=[CALCULATOR])


def test_tool_choice_none_required_named_and_one_call_at_a_time(templated):
    client, messages = templated.client(), [{"role": "user", "content": "7*8="}]
    content, calls, reason = ask(client, messages, False, tools=[CALCULATOR], tool_choice="none", max_tokens=200)
    assert templated.seen() == chat.apply_chat_template(messages, "qwen3")  # no tool list, no calls read
    assert calls == [] and reason == "stop" and "<tool_call>" in content
    for stream in (False, True):
        _, calls, reason = ask(client, messages, stream, tools=[CALCULATOR], tool_choice="required", max_tokens=200)
        assert templated.seen().endswith('<|im_start|>assistant\n<tool_call>\n{"name": "')  # the call opened
        assert [c[1:] for c in calls] == [("calculator", '{"expression": "4*5"}')] and reason == "tool_calls"
        _, calls, reason = ask(client, messages, stream, tools=[CALCULATOR], max_tokens=200,
                               tool_choice={"type": "function", "function": {"name": "calculator"}})
        assert templated.seen().endswith('{"name": "calculator", "arguments": ')
        assert [c[1:] for c in calls] == [("calculator", '{"expression": "2+3"}')] and reason == "tool_calls"
    two = ScriptedServer(chat_template=True, script=lambda p: calculator_script(p) + "\n" + calculator_script(p))
    try:
        for parallel, count in ((True, 2), (False, 1)):
            _, calls, _ = ask(two.client(), messages, False, tools=[CALCULATOR], parallel_tool_calls=parallel,
                              max_tokens=300)
            assert len(calls) == count and len({c[0] for c in calls}) == count  # each call its own id
    finally:
        two.server.should_exit = True


def test_a_call_cut_by_max_tokens_is_text(plain):
    content, calls, reason = ask(plain.client(), [{"role": "user", "content": "1*2="}], False, tools=[CALCULATOR],
                                 max_tokens=20)
    assert (calls, reason) == ([], "length") and content == tools.call_text("qwen3", "calculator",
                                                                            {"expression": "1*2"})[:20]


def test_malformed_tools_and_calls_get_openais_400(plain, templated):
    client, messages = templated.client(), [{"role": "user", "content": "7*8="}]
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="demo", messages=messages, tools=[{"type": "function",
                                                                                "function": {"name": "a b"}}])
    assert refused.value.status_code == 400 and refused.value.body["param"] == "tools"
    function = CALCULATOR["function"]
    bad_tools = [{"type": "function"}, {"type": "retrieval", "function": function}, "calculator",
                 {"type": "function", "function": {**function, "name": ""}},
                 {"type": "function", "function": {**function, "name": "x" * 65}},
                 {"type": "function", "function": {**function, "description": 5}},
                 {"type": "function", "function": {**function, "parameters": {"type": "array"}}},
                 {"type": "function", "function": {**function, "parameters": []}},
                 {"type": "function", "function": {**function, "parameters": {"type": "object", "required": ["x"]}}},
                 {"type": "function", "function": {**function, "parameters": {"properties": {"x": 5}}}}]
    good = {"model": "demo", "messages": messages, "max_tokens": 50}
    bodies = [({**good, "tools": [tool]}, "tools") for tool in bad_tools]
    bodies += [({**good, "tools": [CALCULATOR, CALCULATOR]}, "tools"), ({**good, "tools": "calculator"}, "tools"),
               ({**good, "tools": [CALCULATOR], "tool_choice": "always"}, "tool_choice"),
               ({**good, "tools": [CALCULATOR], "tool_choice": {"type": "function", "function": {"name": "abacus"}}},
                "tool_choice"),
               ({**good, "tool_choice": "required"}, "tool_choice")]
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": '}}
    for arguments in ('{"expression": ', '["7*8"]', "7*8"):
        wrong = [*messages, {"role": "assistant", "content": None,
                             "tool_calls": [{**call, "function": {**call["function"], "arguments": arguments}}]}]
        bodies.append(({**good, "messages": wrong}, "messages"))
    bodies += [({**good, "messages": [*messages, {"role": "tool"}]}, "messages"),  # a result without content
               ({**good, "messages": [*messages, {"role": "assistant", "content": None}]}, "messages")]
    for server in (templated, plain):
        for body, param in bodies:
            status, reply = server.post("/v1/chat/completions", json.dumps(body).encode())
            assert status == 400 and reply["error"]["param"] == param and reply["error"]["type"] == \
                "invalid_request_error" and reply["error"]["message"], (body, status, reply)
    second_question = [*messages, {"role": "assistant", "content": "56"}, {"role": "user", "content": "1*2="}]
    status, reply = plain.post("/v1/chat/completions", json.dumps({**good, "messages": second_question,
                                                                   "tools": [CALCULATOR]}).encode())
    assert status == 400 and "takes one user message" in reply["error"]["message"]
    assert ask(plain.client(), messages, False, tools=[CALCULATOR], max_tokens=128)[2] == "tool_calls"  # still up


def gemma4_script(prompt: str) -> str:
    """calculator_script in Gemma 4's format: a call on the problem, the result once it follows the call (inside
    the same turn), the rest of a call the prompt opened (tool_choice)."""
    if prompt.endswith("<tool_response|>"):
        return prompt.rsplit('{value:<|"|>', 1)[1].split('<|"|>}')[0]
    if prompt.endswith(("call:", "call:calculator")):
        return ("" if prompt.endswith("calculator") else "calculator") + '{expression:<|"|>4*5<|"|>}<tool_call|>'
    return tools.call_text("gemma4", "calculator", {"expression": re.findall(r"(\d+[*+]\d+)=", prompt)[-1]})


@pytest.mark.parametrize("stream", [False, True])
def test_gemma4_calls_come_back_as_tool_calls_and_results_go_on_in_the_turn(stream):
    """A Gemma 4 checkpoint's calls come back as OpenAI's tool_calls; the results sent back render inside the
    model's turn, each named by its call's id, as the published template writes them; tool_choice opens a call."""
    from transformers.utils.chat_template_utils import render_jinja_template
    server = ScriptedServer(chat_template=True, script=gemma4_script, family="gemma4")
    try:
        client, messages = server.client(), [{"role": "user", "content": "What is 12*34=?"}]
        content, calls, reason = ask(client, messages, stream, tools=[CALCULATOR], max_tokens=200)
        assert server.seen() == chat.apply_chat_template(messages, "gemma4", tools=[CALCULATOR])
        assert (content, reason) == (None, "tool_calls")
        assert [c[1:] for c in calls] == [("calculator", '{"expression": "12*34"}')]
        back = sent_back(messages, calls, run_calls(calls))
        content, calls2, reason = ask(client, back, stream, tools=[CALCULATOR], max_tokens=200)
        assert (content, calls2, reason) == ("408", [], "stop")
        template = (ROOT / "tests" / "chat_templates" / "gemma4.jinja").read_text()
        for m in back[1]["tool_calls"]:
            m["function"]["arguments"] = json.loads(m["function"]["arguments"])  # the template takes a dict
        ref, _ = render_jinja_template(conversations=[back], chat_template=template, tools=[CALCULATOR],
                                       add_generation_prompt=True, bos_token="<bos>")
        assert server.seen() == ref[0] and ref[0].endswith('response:calculator{value:<|"|>408<|"|>}<tool_response|>')
        _, calls, _ = ask(client, messages, stream, tools=[CALCULATOR], tool_choice="required", max_tokens=200)
        assert server.seen().endswith("<|turn>model\n<|channel>thought\n<channel|><|tool_call>call:")
        assert [c[1:] for c in calls] == [("calculator", '{"expression": "4*5"}')]
    finally:
        server.server.should_exit = True


# ----------------------------------------------------------------------------- the renderer and the call's start

@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
def test_plain_conversation_ids_are_a_rollouts(tmp_path, family):
    """chat.plain_conversation_ids writes what tools.rollout builds while a model samples, two rounds of calls
    (one with two calls) included; a system message as grpo's --system-prompt is written for such a model."""
    call = lambda expression: tools.call_text(family, "calculator", {"expression": expression})  # noqa: E731
    turns = [call("1+2"), call("3*4") + ("" if family == "gemma4" else "\n") + call("5-6"), "3, 12 and -1"]
    for system in ("", "Use the calculator."):
        prompt = BYTES.encode(f"{system}\n\nQuestions\n" if system else "Questions")
        r = tools.scripted(prompt, turns, BYTES, family, [tasks.calculator], END, 1000)
        messages = [{"role": "system", "content": system}] * bool(system) + [{"role": "user", "content": "Questions"}]
        for message in r.messages[:-1]:  # the rollout's turns: the assistant's text holds its calls
            messages.append({"role": message["role"], "content": message["content"]})
        want = prompt + r.completion[:-len("3, 12 and -1") - 1]  # up to the answer
        assert chat.plain_conversation_ids(messages, BYTES, family) == want
        structured = [m if m["role"] != "assistant" else {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments in tools.parse_tool_calls(m["content"], family)]} for m in messages]
        assert chat.plain_conversation_ids(structured, BYTES, family) == want
    with pytest.raises(ValueError, match="takes one user message"):
        chat.plain_conversation_ids([{"role": "tool", "content": "3"}], BYTES, "qwen3")


@pytest.mark.parametrize("family,text,start", [
    ("qwen3", "Sure.\n<tool_call>\n{}", 6), ("qwen3", "Sure, <tool_c", 6), ("qwen3", "no calls <tools>", 16),
    ("qwen3", "<think>draft <tool_call></think>\nok", 35), ("qwen3", "<think>draft <tool_call>", 13),
    ("llama3", '  {"name": "f"', 0), ("llama3", "<|python_tag|>{", 0), ("llama3", "  ", 0), ("llama3", "Hi {", 4),
    ("gemma3", 'Sure.\n  {"name": "f"}', 6), ("gemma3", "Sure {", 6),
    ("gemma4", "Sure.<|tool_call>call:f{}", 5), ("gemma4", "Sure, <|tool_c", 6), ("gemma4", "no <|tool>", 10),
    ("gemma4", "<|channel>thought\n<|tool_call><channel|>ok", 42), ("gemma4", "<|channel>draft <|tool_call>", 16),
])
def test_call_start(family, text, start):
    assert chat.call_start(text, family) == start


# ----------------------------------------------------------------------------- the demo's exported model (slow)

def demo_problems(n: int) -> list[str]:
    return [r["prompt"] for r in tasks.builtin_task("*,3,3").examples("eval", n)]


def greedy_rollouts(hf, problems: list[str]) -> list[str]:
    """The library's own greedy conversations' final answers (tools.generate on the exported model)."""
    loaded = sample.load(sample.LoadFlags(ckpt=str(hf)))
    outs = tools.generate(loaded.model, [loaded.tok.encode(p) for p in problems], [tasks.calculator], loaded.tok,
                          "qwen3", max_completion_len=192, temperature=0.0,
                          eos_ids=data.stop_ids(loaded.tok, loaded.model.cfg))
    return [tools.final_answer(o) for o in outs]


def client_conversation(client, model: str, problem: str, stream: bool) -> tuple[str, int]:
    """An application's loop: ask with the calculator's schema, run the calls it gets, send the results back,
    until an answer comes. → (the answer, calls made)."""
    messages, made = [{"role": "user", "content": problem}], 0
    for _ in range(5):
        reply = client.chat.completions.create(model=model, messages=messages, tools=[CALCULATOR], max_tokens=160,
                                               temperature=0, stream=stream)
        content, calls, reason = collect(reply, stream)
        if reason != "tool_calls":
            return content or "", made
        messages, made = sent_back(messages, calls, run_calls(calls)), made + len(calls)
    return "", made


@pytest.mark.slow
def test_the_demo_model_calls_the_calculator_through_the_openai_client(calculator_demo):
    hf, problems = calculator_demo / "hf", demo_problems(16)
    want = greedy_rollouts(hf, problems)
    server = Server("--ckpt", str(hf))
    try:
        client = server.client()
        got = [client_conversation(client, "hf", p, stream=False) for p in problems]
        streamed = [client_conversation(client, "hf", p, stream=True)[0] for p in problems[:8]]
    finally:
        server.close()
    right = [answer.strip() == tasks.calculator(p.rstrip("=")) for p, (answer, _) in zip(problems, got)]
    print(f"\nthe demo's model through the openai client: {sum(right)}/16 right, "
          f"{sum(made for _, made in got)} calls; the library's greedy rollouts: {want}")
    assert [answer for answer, _ in got] == want
    assert streamed == want[:8]
    assert all(made >= 1 for _, made in got) and sum(right) >= 0.4 * len(problems)


@pytest.mark.slow
def test_sample_chat_with_tools_on_the_demo_model(calculator_demo):
    hf, problems = calculator_demo / "hf", demo_problems(4)
    want = greedy_rollouts(hf, problems)
    args = [sys.executable, "sample.py", "--ckpt", str(hf), "--chat", "--tools", "calculator",
            "--max-new-tokens", "160"]
    r = subprocess.run(args + [a for p in problems for a in ("--prompt", p)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == want
    assert r.stderr.count("[tool call] calculator(") >= len(problems), r.stderr
    talk = subprocess.run(args, cwd=ROOT, input=problems[0] + "\n", capture_output=True, text=True, timeout=600)
    assert talk.returncode == 0 and talk.stdout == f"> {want[0]}\n> ", talk.stdout + talk.stderr  # then Ctrl-D
    assert "[tool call] calculator(" in talk.stderr
