"""gemma4.py and Gemma 4 checkpoints against transformers' Gemma4ForCausalLM (float32, eager attention): logits,
both config.json styles, the multimodal checkpoint's text model, save_hf, greedy generation, the KV cache that
KV-shared layers do without, the presets' sizes and every script on tiny-gemma4."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import adapters
import ckpt
import gemma4
import sample
from hf_models import GEMMA4_VARIANTS, HF_CONFIGS, hf_logits, make_hf_model, save_hf_model, to_gemma4_hub_config
from model import CONFIGS, KVCache, Transformer, get_config
from test_model import rel_err, tokens
from test_lora import trained_adapter
from test_sample import hf_greedy


def load_pair(variant, tmp_path, style="transformers5", seed=0):
    hf = make_hf_model(variant, seed=seed, attn_implementation="eager")
    path = save_hf_model(hf, tmp_path / variant)
    if style == "hub":
        to_gemma4_hub_config(path)
    return hf, ckpt.load_hf(path)


def assert_same_logits(ours, ref):
    assert rel_err(ours, ref) <= 2e-4
    assert np.mean(np.asarray(ours).argmax(-1) == ref.argmax(-1)) == 1.0


@pytest.mark.parametrize("style", ["transformers5", "hub"])
@pytest.mark.parametrize("variant", GEMMA4_VARIANTS)
def test_logits_match_transformers(variant, style, tmp_path):
    hf, model = load_pair(variant, tmp_path, style)
    x = tokens()  # 48 tokens: past the sliding window of 16
    assert_same_logits(model(jnp.asarray(x)), hf_logits(hf, x))


def test_the_switches_are_really_read(tmp_path):
    """Parity would pass vacuously if a switch were off on both sides: each is on where the test configs say."""
    cfgs = {v: ckpt.load_hf(save_hf_model(make_hf_model(v), tmp_path / v)).cfg for v in GEMMA4_VARIANTS}
    g = cfgs["gemma4"].gemma4
    assert (g.ple_dim, g.kv_shared_layers, g.k_eq_v, g.global_head_dim, g.global_kv_heads) == (8, 3, True, 32, 1)
    assert g.double_wide_mlp and g.global_rope_fraction == 0.5 and cfgs["gemma4"].rope_local_theta == 100.0
    assert gemma4.kv_sources(cfgs["gemma4"]) == (0, 1, 2, 1, 1, 2)
    assert cfgs["gemma4"].sliding_layers == (True, True, False) * 2 and cfgs["gemma4"].sliding_window == 16
    plain = cfgs["gemma4_plain"]
    assert plain.sliding_layers == (True,) * 5 + (False, False) and not plain.gemma4.ple_dim
    assert plain.gemma4.global_kv_heads == 2 and "v" in gemma4.layer_shapes(plain, 5)  # no k = v: own v
    assert cfgs["gemma4_moe"].gemma4.experts.n_experts == 6 and cfgs["gemma4_moe"].gemma4.experts.top_k == 2
    shapes = gemma4.layer_shapes(cfgs["gemma4"], 4)  # a KV-shared sliding layer: no k, v; a 2F-wide MLP
    assert "k" not in shapes and "v" not in shapes and shapes["gate"] == (96, 320)
    assert "v" not in gemma4.layer_shapes(cfgs["gemma4"], 2) and gemma4.layer_shapes(cfgs["gemma4"], 2)["k"] == (96, 1, 32)


def test_each_switch_changes_the_answer(tmp_path):
    """Turning a switch off (the same weights) changes the logits past the window, so parity really tests it."""
    hf, model = load_pair("gemma4", tmp_path)
    x = jnp.asarray(tokens())
    ref = model(x)
    for change in (dict(sliding_window=10_000), dict(rope_local_theta=1e4)):
        other = nnx.merge(*nnx.split(model))
        other.cfg = model.cfg.replace(**change)
        assert rel_err(other(x), ref) > 1e-3, change
    other = nnx.merge(*nnx.split(model))
    other.cfg = model.cfg.replace(gemma4=model.cfg.gemma4.__class__(**{**vars(model.cfg.gemma4),
                                                                         "global_rope_fraction": 1.0}))
    assert rel_err(other(x), ref) > 1e-3


def test_multimodal_checkpoint_loads_its_text_model(tmp_path, capfd):
    """Gemma4ForConditionalGeneration (text_config, model.language_model.*, vision and audio towers): the text model,
    one line on stderr saying the towers were skipped, and the multimodal model's logits on text."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                  head_dim=16, patch_size=4, position_embedding_size=64)
    audio = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                 output_proj_dims=32)
    config = transformers.Gemma4Config(text_config=HF_CONFIGS["gemma4"][1], vision_config=vision, audio_config=audio)
    torch.manual_seed(0)
    hf = transformers.Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.08)
    hf.save_pretrained(tmp_path / "mm")
    stored = ckpt.SafetensorsFile(tmp_path / "mm" / "model.safetensors").keys()
    assert any(n.startswith("model.audio_tower.") for n in stored) and "model.language_model.norm.weight" in stored
    capfd.readouterr()
    model = ckpt.load_hf(tmp_path / "mm")
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vision and audio towers skipped" in err[0], err
    x = tokens(vocab=250)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(x)).logits.numpy()
    assert model.cfg.family == "gemma4" and model.cfg.gemma4.kv_shared_layers == 3
    assert_same_logits(model(jnp.asarray(x)), ref)


@pytest.mark.parametrize("variant", ["gemma4", "gemma4_moe"])
def test_save_hf_gives_transformers_the_same_logits(variant, tmp_path):
    hf, model = load_pair(variant, tmp_path)
    ckpt.save_hf(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "gemma4_text" and written["global_head_dim"] == 32  # the Hub's names
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    x = tokens()
    assert rel_err(hf_logits(again, x), hf_logits(hf, x)) < 1e-6
    assert ckpt.load_hf(tmp_path / "out").cfg == model.cfg


@pytest.mark.parametrize("variant", ["gemma4", "gemma4_moe"])
def test_greedy_matches_transformers_generate(variant, tmp_path):
    hf, ours = load_pair(variant, tmp_path, seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, n).tolist() for n in (5, 17, 11)]  # ragged, left-padded; 24 new > window 16
    assert sample.generate(ours, prompts, max_new_tokens=24, eos_ids=()) == hf_greedy(hf, prompts, 24, pad_id=0)


def test_kv_sharing_saves_cache_memory():
    """E2B: 15 of 35 layers hold a cache (12 sliding of 256 dims, 3 full of 512); sharing saves 57% of it."""
    held, unshared = gemma4.kv_cache_bytes(CONFIGS["gemma4-e2b"], batch=1, length=8192)
    assert held == 2 * 2 * 8192 * (12 * 256 + 3 * 512)  # k and v, bf16, one kv head: 144 MiB (336 MiB unshared)
    assert abs(1 - held / unshared - 0.571) < 0.001
    cache = KVCache.init(CONFIGS["tiny-gemma4"], 1, 64)  # (prefill + decode = the forward: test_model's tiny presets)
    assert [k is None for k in cache.k] == [False, False, True, True]  # layers 2 and 3 read 0's and 1's
    assert sum(x.nbytes for x in jax.tree.leaves((cache.k, cache.v))) == gemma4.kv_cache_bytes(
        CONFIGS["tiny-gemma4"], 1, 64, "float32")[0]


def test_presets_have_published_sizes():
    """The model cards' totals: 31B 30.7B, 26B-A4B 25.2B. E2B and E4B's text models: 4.63B and 7.46B, of which the
    embedding and PLE tables are 2.75B and 3.49B; the cards say 5.1B and 8B "with embeddings" (2.3B and 4.5B
    effective), which also counts what we do not load (their vision and audio encoders)."""
    def n(name):
        return sum(x.size for x in jax.tree.leaves(nnx.state(ckpt.abstract_model(get_config(name)), nnx.Param)))
    sizes = {name: n(name) / 1e9 for name in ("gemma4-e2b", "gemma4-e4b", "gemma4-31b", "gemma4-26b-a4b")}
    assert abs(sizes["gemma4-31b"] - 30.7) < 0.01 and abs(sizes["gemma4-26b-a4b"] - 25.2) < 0.05
    assert abs(sizes["gemma4-e2b"] - 4.629) < 0.001 and abs(sizes["gemma4-e4b"] - 7.463) < 0.001
    assert ckpt.hub_repo("gemma4") == "google/gemma-4-E2B"


@pytest.mark.slow  # ~1 min: the engine's and beam search's programs
def test_engine_and_beam_search_follow_the_shared_cache(tmp_path):
    """engine.py's slots (continuous batching) give sample.generate's greedy ids on ragged prompts; beam search
    (its cache reordered per beam, shared layers holding none) gives transformers' beams."""
    import engine
    hf, model = load_pair("gemma4", tmp_path, seed=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (3, 19, 8, 27, 12)]
    want = sample.generate(model, prompts, max_new_tokens=20, eos_ids=())
    eng = engine.Engine(model, slots=2, max_new_tokens=20, max_prompt_len=32, chunk=4, eos_ids=())
    assert eng.generate(prompts) == want and eng.stats["prefills"] >= 3
    beams = [[5, 9, 33, 7], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    ids = torch.tensor([[299] * 5 + beams[0], beams[1]])
    mask = torch.tensor([[0] * 5 + [1] * 4, [1] * 9])
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False,
                      pad_token_id=299)[:, 9:].tolist()
    assert sample.generate(model, beams, max_new_tokens=12, num_beams=3, eos_ids=()) == ref


def test_chat_template():
    """chat.gemma4_chat renders what Gemma 4's published template does for text turns (its later revision: an empty
    thought channel after the generation prompt when thinking is off); tools: test_chat_template_tools."""
    import chat
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi "},
                {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Hello!"},
                {"role": "user", "content": "2+2?"}]
    assert chat.apply_chat_template(messages, "gemma4") == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
        "<|turn>user\n2+2?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    assert chat.apply_chat_template(messages[1:2], "gemma4", enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    assert chat.apply_chat_template(messages[1:3], "gemma4", add_generation_prompt=False) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n")
    assert chat.END_OF_TURN["gemma4"] == "<turn|>"


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def get_weather(city: str, unit: str = "celsius", days: list[int] | None = None, flags: dict | None = None,
                ok: bool = True) -> str:
    """The weather.

    Args:
        city: The city.
        unit: The unit (choices: ["celsius", "fahrenheit"])
        days: Which days.
        flags: Options.
        ok: Whether to.
    """
    return "sunny"


def _call(name, arguments, id=None):
    return {"type": "function", "function": {"name": name, "arguments": arguments}} | ({"id": id} if id else {})


SYSTEM, USER = {"role": "system", "content": " Be brief. "}, {"role": "user", "content": "1+2, and the weather? "}
WEATHER = {"city": "Paris", "days": [1, 2], "flags": {"x": True, "y": "z"}, "ok": False}
CALLS = {"role": "assistant", "content": None, "tool_calls": [_call("add", {"a": 1, "b": 2}),
                                                              _call("get_weather", WEATHER)]}
RESULTS = [{"role": "tool", "content": "3"}, {"role": "tool", "content": "sunny", "name": "get_weather"}]
ANSWER = {"role": "assistant", "content": "<|channel>thought\nok<channel|>3, and sunny."}
THINKING_CALL = {"role": "assistant", "content": "Let me see.", "reasoning_content": "add them",
                 "tool_calls": [_call("add", {"a": 1, "b": 2.5}, "c1")]}
THINKING_RESULT = {"role": "tool", "content": "3.5", "tool_call_id": "c1"}
TOOL_CONVERSATIONS = {"calls": [SYSTEM, USER, CALLS], "calls and results": [SYSTEM, USER, CALLS, *RESULTS],
                      "answered": [USER, CALLS, *RESULTS, ANSWER],
                      "next question": [USER, CALLS, *RESULTS, ANSWER, USER],
                      "reasoning and ids": [USER, THINKING_CALL, THINKING_RESULT, ANSWER, USER, THINKING_CALL],
                      "text only": [SYSTEM, USER, ANSWER, USER]}


@pytest.mark.parametrize("name", list(TOOL_CONVERSATIONS))
def test_chat_template_tools(name):
    """Gemma 4's tool format against the published template rendered by transformers (tests/chat_templates/
    gemma4.jinja): declarations in the system turn, calls, their results and the answer in one model turn."""
    import pathlib

    from transformers.utils.chat_template_utils import render_jinja_template

    import chat
    template = (pathlib.Path(__file__).parent / "chat_templates" / "gemma4.jinja").read_text()
    messages = [dict(m, content=m["content"] or "") for m in TOOL_CONVERSATIONS[name]]  # the template's content: str
    for tools in ([add, get_weather], None, []):
        schemas = None if tools is None else [chat.function_schema(t) for t in tools]
        for gen, thinking in [(True, False), (False, False), (True, True)]:
            ref, _ = render_jinja_template(conversations=[messages], chat_template=template, tools=schemas,
                                           add_generation_prompt=gen, enable_thinking=thinking, bos_token="<bos>")
            assert chat.apply_chat_template(TOOL_CONVERSATIONS[name], "gemma4", gen, tools=tools,
                                            enable_thinking=thinking) == ref[0], (tools, gen, thinking)
    assert chat.apply_chat_template([USER, CALLS, *RESULTS], "gemma4") == (
        "<bos><|turn>user\n1+2, and the weather?<turn|>\n<|turn>model\n<|tool_call>call:add{a:1,b:2}<tool_call|>"
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:[1,2],flags:{x:true,y:<|"|>z<|"|>},ok:false}'
        '<tool_call|><|tool_response>response:get_weather{value:<|"|>3<|"|>}<tool_response|>'  # sic: no ids, the
        '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>')  # last call's name (template)


QUICK = {  # a couple of steps of each script's demo on tiny-gemma4, warm-ups and evaluations cut to the bone
    "sft.py": ["--train-examples", "64", "--eval-examples", "4", "--batch-size", "8", "--eval-every", "1000"],
    "dpo.py": ["--warmup-sft-steps", "0", "--train-examples", "32", "--eval-examples", "4", "--batch-size", "4",
               "--eval-every", "1000"],
    "grpo.py": ["--warmup-sft-steps", "0", "--train-examples", "32", "--eval-examples", "4", "--prompts-per-step", "2",
                "--num-generations", "2", "--eval-every", "1000"],
    "distill.py": ["--teacher", "tiny-gemma4", "--train-examples", "32", "--eval-examples", "4", "--batch-size", "4",
                   "--eval-every", "1000"],
    "lora.py": ["--train-examples", "64", "--eval-examples", "4", "--batch-size", "8", "--eval-every", "1000",
                "--quant", "nf4", "--merge"],
}


def start_script(script, tmp_path):
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parent.parent
    return subprocess.Popen([sys.executable, script, "--model", "tiny-gemma4", "--steps", "2", *QUICK[script], "--out",
                             str(tmp_path / script)], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "XLA_FLAGS": ""})


@pytest.mark.slow
def test_every_script_runs_on_tiny_gemma4(tmp_path):
    """Each script trains tiny-gemma4 for two steps and writes its metrics and checkpoint, all started together
    (each run is mostly compiling its programs, one thread each)."""
    runs = {script: start_script(script, tmp_path) for script in QUICK}
    errors = {script: proc.communicate(timeout=900)[1] for script, proc in runs.items()}
    for script, proc in runs.items():
        assert proc.returncode == 0, (script, errors[script][-2000:])
        rows = [json.loads(line) for line in (tmp_path / script / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"]), script
        assert ckpt.load_hf(tmp_path / script / "hf").cfg.gemma4 == CONFIGS["tiny-gemma4"].gemma4, script
    model = ckpt.load_peft(ckpt.load_hf(tmp_path / "lora.py" / "hf"), tmp_path / "lora.py" / "adapter")  # QLoRA's
    assert model.lora.targets == adapters.TARGETS and "k_lora_a" not in model.layers[3].arrays()  # KV-shared: no k


# ----------------------------------------------------------------------------- LoRA and QLoRA on the per-layer weights

@pytest.mark.parametrize("variant", ["gemma4", "gemma4_moe"])
def test_peft_loads_our_gemma4_adapter_with_the_same_logits(variant, tmp_path):
    """Adapters on every projection a layer has (KV-shared layers have no k, v; k = v layers no v; 26B-A4B's dense
    MLP beside its experts), in PEFT's layout: PEFT on transformers' model computes our logits, and merging
    them into the weights computes them too."""
    import peft
    hf, ours = load_pair(variant, tmp_path)
    adapters.add_lora(ours, 4, 8.0, targets=adapters.TARGETS)
    trained_adapter(ours)
    ckpt.save_peft(ours, tmp_path / "adapter", base_model=str(tmp_path / variant))
    x = tokens()
    base = hf_logits(hf, x)
    theirs = hf_logits(peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval(), x)
    assert rel_err(base, theirs) > 1e-2  # the adapter matters
    assert_same_logits(ours(jnp.asarray(x)), theirs)
    assert_same_logits(adapters.merge_lora(ours)(jnp.asarray(x)), theirs)


def test_an_adapter_peft_made_on_gemma4_loads_into_ours(tmp_path):
    import peft
    hf, _ = load_pair("gemma4", tmp_path)
    config = peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    theirs = peft.get_peft_model(hf, config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = ckpt.load_peft(ckpt.load_hf(tmp_path / "gemma4"), tmp_path / "adapter")
    x = tokens()
    assert_same_logits(ours(jnp.asarray(x)), hf_logits(theirs, x))


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_qlora_on_gemma4_computes_what_its_dequantized_weights_do(fmt, tmp_path):
    """Each layer's projections quantized (a k = v layer's one key projection too): the forward pass reads the
    codes as merge_lora's dequantized model does, adapters included."""
    _, ours = load_pair("gemma4", tmp_path)
    trained_adapter(adapters.add_lora(ours, 4, 8.0))
    adapters.quantize_model(ours, fmt, block=32)
    assert "q_codes" in ours.layers[0].arrays() and "q" not in ours.layers[0].arrays()
    x = jnp.asarray(tokens())
    assert rel_err(ours(x), adapters.merge_lora(ours)(x)) < 1e-4


def test_lora_dropout_reaches_gemma4s_adapters():
    model = trained_adapter(adapters.add_lora(Transformer(CONFIGS["tiny-gemma4"], nnx.Rngs(0)), 4, 8.0, dropout=0.5))
    x = jnp.asarray(tokens(vocab=CONFIGS["tiny-gemma4"].vocab_size))
    plain, dropped = model(x), model(x, dropout_key=jax.random.key(1))
    assert rel_err(model(x), plain) == 0 and rel_err(dropped, plain) > 1e-3


def test_qlora_of_the_moe_kind_is_one_line(tmp_path, capsys):
    """26B-A4B's experts (most of its weights) are not quantized yet: --quant on it is one line, as on Qwen 3 MoE."""
    import lora
    import tokenizer
    path = save_hf_model(make_hf_model("gemma4_moe"), tmp_path / "moe")
    tokenizer.ByteTokenizer().save(path)
    with pytest.raises(SystemExit) as e:
        lora.main(["--ckpt", str(path), "--quant", "nf4", "--out", str(tmp_path / "run")])
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    lines = text.strip().splitlines()
    assert e.value.code not in (0, None) and len(lines) == 1 and "QLoRA does not quantize" in lines[0], text
