"""grpo.py --tools: a rollout is a conversation in which the policy calls functions. The learner scores the tool
results' tokens but they carry no loss and exactly zero gradient; rewards read the final answer and see the whole
conversation; the calculator demo learns to call its tool and beats the same demo without it; resume stays exact;
a bad --tools is one line. Also the demo's calculator and tools.load."""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_grpo import metrics, resumed_from_step_2, run_grpo

import chat
import data
import engine
import grpo
import rl
import tasks
import tokenizer
import tools
from model import CONFIGS, Transformer

TOK = tokenizer.ByteTokenizer()
EOS = TOK.eos_ids[0]


# ----------------------------------------------------------------------------- a scripted policy through draw()

def scripted_engine():
    """engine.generate's stand-in: a row that has not called yet calls the calculator on its prompt; a row that has a
    result answers: the even rows of the batch what the tool returned, the odd ones "7"; log-prob −0.5 per token."""
    calls = []

    def generate(model, prompts, *, max_new_tokens, return_logprobs=False, **kw):
        calls.append(len(prompts))
        ids = []
        for row, p in enumerate(prompts):
            text = TOK.decode(p)
            if "</tool_response>" in text:
                result = text.split("<tool_response>\n")[-1].split("\n")[0]
                ids.append(TOK.encode(result if row % 2 == 0 else "7", add_bos=False) + [EOS])
            else:
                expression = text.rstrip("=")
                ids.append(TOK.encode(tools.call_text("qwen3", "calculator", {"expression": expression}),
                                      add_bos=False) + [EOS])
        ids = [i[:max_new_tokens] for i in ids]
        return (ids, [[-0.5] * len(i) for i in ids]) if return_logprobs else ids
    return generate, calls


def drawn(monkeypatch, seen=None):
    """One draw() of two prompts, two completions each, through the scripted engine: in each group one completion
    answers right, the other wrong. No sampler correction: the scripted log-probs are not the model's."""
    cfg = grpo.Config(tools="calculator", prompts_per_step=2, num_generations=2, importance_sampling_correction=False)
    train = [{"prompt": "123*456=", "answer": "056088"}, {"prompt": "020*300=", "answer": "006000"}]
    ids = [TOK.encode(r["prompt"]) for r in train]
    generate, calls = scripted_engine()
    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(data, "stream", lambda n, seed, position, count: [0, 1])

    def conversation_reward(prompts, completions, messages, tool_calls, **columns):
        seen.extend(zip(completions, messages, tool_calls)) if seen is not None else None
        return [float(n) for n in tool_calls]
    sampler = tools.Sampler([tasks.accuracy_reward, conversation_reward], TOK, (EOS,), "qwen3", cfg.tool_functions,
                            cfg.max_completion_len, cfg.max_tool_calls)
    cfg.weights = np.array([1.0, 0.0])
    r, position, _ = grpo.draw(train, ids, None, sampler, cfg, step=0, position=0)
    return cfg, r, calls


def test_a_scripted_conversation_is_scored_on_its_final_answer_with_the_whole_conversation_seen(monkeypatch):
    seen = []
    cfg, r, calls = drawn(monkeypatch, seen)
    assert calls == [4, 4]  # two rounds: the calls, then the answers (rows padded to the first round's count)
    assert r.per_func[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]  # accuracy of the final answer only
    assert r.per_func[:, 1].tolist() == [1.0] * 4 and r.tool_calls.tolist() == [[1, 0]] * 4
    assert [c for c, _, _ in seen] == ["56088", "7", "6000", "7"]  # the reward's completions: the final answers
    messages = seen[0][1]
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant"]
    assert messages[0]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"expression": "123*456"}}
    assert messages[1]["content"] == "56088"
    assert grpo.tools.metrics(r.tool_calls) == {"tools/call_frequency": 1.0, "tools/failure_frequency": 0.0}


def test_tool_results_carry_no_loss_and_exactly_zero_gradient(monkeypatch):
    """The learner's batch holds the whole conversation; its mask is 1 on the model's tokens and 0 exactly on the
    result turn's (the template's text, tokenized by us); the loss's gradient with respect to the log-probs there
    is exactly 0 (so with respect to those positions' logits too), and not 0 on the sampled tokens."""
    cfg, r, _ = drawn(monkeypatch)
    call = TOK.encode(tools.call_text("qwen3", "calculator", {"expression": "123*456"}), add_bos=False) + [EOS]
    result = TOK.encode(tools.result_turn_text("qwen3", ["56088"]), add_bos=False)
    assert r.completions[0] == call + result + TOK.encode("56088", add_bos=False) + [EOS]
    assert r.loss_masks[0] == [1] * len(call) + [0] * len(result) + [1] * 6
    assert r.sampler_logps[0] == [-0.5] * len(call) + [0.0] * len(result) + [-0.5] * 6

    batch = {k: np.asarray(v) for k, v in grpo.step_batches(r, (EOS,), TOK.pad_id, cfg, None, 0)[0].items()}
    mask = batch["mask"][0]  # [N, C]
    for row, (completion, loss_mask) in enumerate(zip(r.completions, r.loss_masks)):
        assert mask[row, :len(completion)].tolist() == loss_mask and not mask[row, len(completion):].any()
    model = Transformer(CONFIGS["tiny-qwen3"], __import__("flax").nnx.Rngs(0))
    mb = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    logp, entropy, _ = rl.policy_logps(model, mb, cfg.temperature)
    assert r.advantages.std() > 0

    def loss(logp):  # the train step's loss as a function of π_θ's log-probs (make_train_step's loss_fn)
        token_loss, _ = grpo.token_losses(logp, jax.lax.stop_gradient(logp), mb["sampler_logp"], logp - 0.3,
                                          mb["advantages"], mb["mask"], entropy, cfg)
        return jnp.sum(token_loss * mb["weights"])
    grad = np.asarray(jax.grad(loss)(logp))
    tool_positions = (np.asarray(mb["mask"]) == 0) & (np.arange(grad.shape[1]) < np.array(
        [len(c) for c in r.completions])[:, None])
    assert tool_positions.sum() == sum(m.count(0) for m in r.loss_masks) > 0
    assert np.all(grad[tool_positions] == 0.0) and np.all(grad[np.asarray(mb["mask"]) > 0] != 0.0)


def test_prompts_of_a_chat_model_list_the_tools(tmp_path):
    """data.prompt_data with tools: a chat checkpoint's prompts are rendered with the tool list (a text prompt becomes
    a user turn); a plain-text model's stay text."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "What is 12*34?", "answer": "408"}) + "\n")
    chat_prompts = data.prompt_data(TOK, "qwen3", str(path), None, "", 1, 0, 0, 4096, chat=True,
                                    tools=[tasks.calculator])
    text_prompts = data.prompt_data(TOK, "qwen3", str(path), None, "", 1, 0, 0, 4096, tools=[tasks.calculator])
    want = chat.apply_chat_template([{"role": "user", "content": "What is 12*34?"}], "qwen3", tools=[tasks.calculator])
    assert TOK.decode(chat_prompts.train_ids[0]) == want and "<tools>" in want
    assert TOK.decode(text_prompts.train_ids[0]) == "What is 12*34?"


# ----------------------------------------------------------------------------- the demo

@pytest.mark.slow
def test_the_calculator_demo_learns_to_call_and_beats_the_same_demo_without_the_tool(calculator_demo, tmp_path):
    """`python grpo.py --tools calculator` (the demo, tests/conftest.py): by its end the policy calls the tool in
    (nearly) every completion (tools/call_frequency ≥ 0.8), GRPO raises greedy held-out accuracy over the warm-up's
    by ≥ 0.15, and at step 30 eval/reward is ≥ 0.3 above the same demo's without the tool (3-digit products
    answered directly, same 30 steps, batch and warm-up). Measured over float orders (2 cores and one, with and
    without the custom-gradient softmax of model.py): 0.367 → 0.49-0.65 at step 30 and 0.650-0.664 at step 60 with
    the tool; 0.0 without. (Another seed can fail to learn in 60 steps: `--seed 1`'s warm-up ends at 0.309 and
    its sampled completions miscopy the tool's answer, reward 0 for 30 steps.)"""
    with_tool = metrics(calculator_demo)
    evals = {m["step"]: m["eval/reward"] for m in with_tool if "eval/reward" in m}
    last = [m for m in with_tool if "tools/call_frequency" in m][-1]
    start = time.time()
    r = run_grpo("--task", "*,3,3", "--steps", "30", "--prompts-per-step", "8", "--warmup-sft-batch-size", "32",
                 "--out", str(tmp_path / "without"))
    assert r.returncode == 0, r.stderr[-2000:]
    without = {m["step"]: m["eval/reward"] for m in metrics(tmp_path / "without") if "eval/reward" in m}
    print(f"\ncalculator demo: eval/reward {evals}, last call frequency {last['tools/call_frequency']}; "
          f"without the tool {without} ({time.time() - start:.0f} s)")
    assert last["step"] == 60 and last["tools/call_frequency"] >= 0.8
    assert evals[60] - evals[0] >= 0.15, evals
    assert evals[30] - without[30] >= 0.3, (evals, without)
    assert (calculator_demo / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_a_run_with_tools_resumes_exactly(calculator_demo, tmp_path):
    """Tool calls are functions of the sampled tokens, and each round's seed of (seed, step, round): a run resumed from
    step 2 logs steps 3 and 4 as the uninterrupted run did (from the demo's warm-up, which calls its tool)."""
    args = ["--ckpt", str(calculator_demo / "warmup_sft"), "--tools", "calculator", "--lr", "1e-3", "--beta", "0.02",
            "--temperature", "1.0", "--prompts-per-step", "2", "--num-generations", "4", "--eval-examples", "8",
            "--eval-every", "1000"]
    want = resumed_from_step_2(args, tmp_path)
    assert sum(want[step]["tools/call_frequency"] for step in (3, 4)) > 0


# ----------------------------------------------------------------------------- --tools and the calculator

USER_TOOLS = '''
def lookup(key: str) -> str:
    """A value by its key.

    Args:
        key: the key
    """
    return {"a": "1"}.get(key, "none")


def undocumented(x: int):
    return x
'''


def test_tools_load_a_module_or_a_file_and_refuse_what_cannot_be_shown(tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text(USER_TOOLS)
    assert [f.__name__ for f in tools.load(f"{tmp_path / 'my_tools.py'}:lookup")] == ["lookup"]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert tools.load("my_tools:lookup")[0]("a") == "1"
    assert tools.load("calculator") == [tasks.calculator]
    for spec, message in [("calc", "want calculator, or module:fn1,fn2"),
                          ("no_such_module:f", "importing no_such_module failed: ModuleNotFoundError"),
                          (f"{tmp_path / 'nothing.py'}:f", "no file"),
                          ("my_tools:missing", "has no function 'missing'"),
                          ("my_tools:undocumented", "tool undocumented: no docstring")]:
        with pytest.raises(ValueError, match=message):
            tools.load(spec)


@pytest.mark.parametrize("args,message", [
    (["--tools", "calc"], "--tools 'calc': want calculator, or module:fn1,fn2"),
    (["--tools", "no_such_module:f"], "--tools: importing no_such_module failed"),
    (["--tools", "calculator", "--max-tool-calls", "-1"], "--max-tool-calls >= 0"),
])
def test_a_bad_tools_flag_is_one_line(tmp_path, args, message):
    r = run_grpo(*args, "--out", str(tmp_path / "run"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr


@pytest.mark.parametrize("expression,value", [("123*456", "56088"), ("307*040", "12280"), ("007", "7"),
                                              ("1.05+0.5", "1.55"), ("(2+3)*-4", "-20"), ("7/2", "3.5"),
                                              ("2**10", "1024"), ("10//3 % 2", "1")])
def test_the_calculator_computes_arithmetic(expression, value):
    assert tasks.calculator(expression) == value


@pytest.mark.parametrize("expression,error", [
    ("__import__('os').system('true')", "is not arithmetic"), ("a+1", "is not arithmetic"),
    ("(1).__class__", "is not arithmetic"), ("[1, 2]", "is not arithmetic"), ("2**1000", "exponent 1000 is over 64"),
    ("((9**64)**64)**64", "over 1024 bits"), ("1" * 201, "over 200 characters"), ("1/0", "division by zero")])
def test_the_calculator_refuses_anything_else_as_an_error_result(expression, error):
    """Arguments are parsed into arithmetic, never evaluated as Python; a refusal is the call's error result."""
    result = tools.call_tool(tasks.calculator, {"expression": expression}, tools.function_schema(tasks.calculator), 5.0)
    assert result.failed and result.text.startswith("error: calculator() raised") and error in result.text, result
