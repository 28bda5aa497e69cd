"""data.py: tokenizers against transformers' tokenizer, chat templates against the published Jinja."""
import pathlib

import pytest
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

import chat
import tokenizer

TEMPLATES = pathlib.Path(__file__).parent / "chat_templates"  # published templates, verbatim
BOS = {"gemma": "<bos>", "gemma2": "<bos>", "gemma3": "<bos>", "llama3": "<|begin_of_text|>", "qwen2": None,
       "qwen3": None}
FILES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma3", "llama3": "llama3", "qwen2": "qwen2",
         "qwen3": "qwen3"}

SYSTEM = {"role": "system", "content": "You are terse.\nAnswer in one line. "}
TURNS = [{"role": "user", "content": "  Hi there!\n"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "What is 2+2?\n\nShow work."}]
CONVERSATIONS = {
    "multi-turn with system": [SYSTEM] + TURNS,
    "multi-turn": TURNS,
    "one turn": TURNS[:1],
    "ends with assistant": [SYSTEM] + TURNS + [{"role": "assistant", "content": " 4 \n"}],
    "unicode and code": [{"role": "user", "content": "Écris `print('héllo')` — ok? 😀"}],
    "reasoning in history": [TURNS[0], {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nHello!"},
                             TURNS[2], {"role": "assistant", "content": "<think>add</think>4"}],
}


def reference(family, messages, add_generation_prompt, **kw):
    template = (TEMPLATES / f"{FILES[family]}.jinja").read_text()
    out, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                   add_generation_prompt=add_generation_prompt, bos_token=BOS[family], **kw)
    return out[0]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("family", list(FILES))
def test_chat_template_matches_published(family, name):
    messages = CONVERSATIONS[name]
    ref_family = family
    if family in ("gemma", "gemma2") and messages[0]["role"] == "system":
        ref_family = "gemma3"  # the Gemma 1/2 template refuses system messages; we fold them in as Gemma 3 does
    kw = {"date": "26 Jul 2024"} if family == "llama3" else {}
    ref_kw = {"date_string": "26 Jul 2024"} if family == "llama3" else {}
    for gen in (True, False):
        assert chat.apply_chat_template(messages, family, gen, **kw) == reference(ref_family, messages, gen, **ref_kw)


def test_qwen3_thinking_switch():
    ours = chat.apply_chat_template(TURNS, "qwen3", enable_thinking=False)
    assert ours == reference("qwen3", TURNS, True, enable_thinking=False)
    assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_llama3_date_defaults_to_today():
    import datetime
    today = datetime.date.today().strftime("%d %b %Y")
    assert f"Today Date: {today}\n" in chat.apply_chat_template(TURNS, "llama3")


def test_chat_rejects_bad_messages():
    with pytest.raises(ValueError, match="alternate"):
        chat.apply_chat_template([TURNS[1], TURNS[0]], "gemma3")
    with pytest.raises(ValueError, match="message 0"):
        chat.apply_chat_template([{"role": "user"}], "qwen3")


# ----------------------------------------------------------------------------- tokenizers

STRINGS = ["The capital of France is", "", " ", "  leading and trailing  ", "tabs\tand\nnew\n\nlines\r\n",
           "multiple     spaces", "1234567890 3.14159 -42 1e10", "unicode: héllo wörld ñ ç ß æ ø",
           "CJK: 日本語のテキスト 中文", "emoji: 😀🎉👍🏽", "code: def f(x):\n    return x ** 2  # square",
           "<html><body class=\"a\">&amp;</body></html>", "mixed😀text123   \n\t end", "a" * 300]


def test_hf_tokenizer_matches_transformers_on_gemma3(gemma3_dir):
    ours = tokenizer.load_tokenizer(gemma3_dir)
    ref = transformers.AutoTokenizer.from_pretrained(gemma3_dir)
    assert isinstance(ours, tokenizer.HFTokenizer)
    assert (ours.bos_id, ours.pad_id) == (ref.bos_token_id, ref.pad_token_id) == (2, 0)
    assert ref.eos_token_id in ours.eos_ids
    for s in STRINGS:
        assert ours.encode(s) == ref(s)["input_ids"], s
        assert ours.encode(s, add_bos=False) == ref(s, add_special_tokens=False)["input_ids"], s
        assert ours.decode(ours.encode(s)) == s
    text = chat.apply_chat_template(CONVERSATIONS["multi-turn with system"], "gemma3")
    assert ours.encode(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text, add_bos=False)[:3] == [2, 105, 2364]  # <bos> <start_of_turn> user


def test_byte_tokenizer_round_trip():
    tok = tokenizer.load_tokenizer(None)
    for s in STRINGS:
        ids = tok.encode(s)
        assert ids[0] == tok.bos_id and max(ids) < tok.vocab_size
        assert tok.decode(ids) == s


def test_sentencepiece_backend(tmp_path):
    import sentencepiece as spm
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(STRINGS * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=350, minloglevel=2,
                                   bos_id=2, eos_id=1, pad_id=0, unk_id=3, character_coverage=1.0,
                                   byte_fallback=True)
    tok = tokenizer.load_tokenizer(tmp_path)
    assert isinstance(tok, tokenizer.SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (2, (1,), 0)
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for s in STRINGS[:8]:
        assert tok.encode(s) == [2] + ref.encode(s)
        assert tok.decode(tok.encode(s)) == ref.decode(ref.encode(s))


def test_missing_and_broken_tokenizers(tmp_path):
    with pytest.raises(tokenizer.TokenizerError, match="no tokenizer.json, tokenizer.model or byte_tokenizer.json"):
        tokenizer.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(tokenizer.TokenizerError, match="tokenizer.json: cannot be read"):
        tokenizer.load_tokenizer(tmp_path)
