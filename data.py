"""data.py — text in: tokenizers and chat templates.

One small interface over three backends, picked from what a checkpoint directory holds:

    tok = load_tokenizer("path/to/ckpt")      # tokenizer.json (HF `tokenizers`), else tokenizer.model
    tok = load_tokenizer(None)                # the byte-level tokenizer of the tiny presets
    ids = tok.encode("Hello")                 # with the model's BOS, as transformers does
    text = tok.decode(ids)                    # special tokens dropped
    tok.bos_id, tok.eos_ids, tok.pad_id

Chat templates are plain functions from [{"role", "content"}, ...] to text (no jinja).
"""
from __future__ import annotations

import json
import pathlib


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message names the directory and the problem."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad 256, bos 257, eos 258 (the tiny presets' vocabulary)."""
    vocab_size, pad_id, bos_id, eos_ids = 259, 256, 257, (258,)
    family = None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return [self.bos_id] * add_bos + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        return None  # no special tokens beyond pad/bos/eos


class HFTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` package; special tokens from
    tokenizer_config.json, config.json and generation_config.json beside it."""

    def __init__(self, path: pathlib.Path):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        special = _special_tokens(path)
        self.bos_id = self._id(special.get("bos_token"), special.get("bos_token_id"))
        self.pad_id = self._id(special.get("pad_token"), special.get("pad_token_id"))
        eos = [self._id(special.get("eos_token"), None)] + list(special.get("eos_token_ids", []))
        self.eos_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
        self.vocab_size = self.tok.get_vocab_size()
        self.family = special.get("family")
        # Does the post-processor add BOS itself (Gemma, Llama) or not at all (Qwen)?
        self._adds_bos = self.bos_id is not None and self.tok.encode("a").ids[:1] == [self.bos_id]

    def _id(self, token, fallback):
        if isinstance(token, dict):
            token = token.get("content")
        found = self.tok.token_to_id(token) if token else None
        return found if found is not None else fallback

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos and self._adds_bos and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


class SentencePieceTokenizer:
    """A SentencePiece tokenizer.model (Gemma's original format)."""

    def __init__(self, path: pathlib.Path):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        special = _special_tokens(path)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else special.get("bos_token_id")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else special.get("pad_token_id")
        eos = [self.sp.eos_id()] + list(special.get("eos_token_ids", []))
        self.eos_ids = tuple(dict.fromkeys(i for i in eos if i is not None and i >= 0))
        self.vocab_size = self.sp.get_piece_size()
        self.family = special.get("family")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return [self.bos_id] * (add_bos and self.bos_id is not None) + self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.pad_id, *self.eos_ids)])

    def token_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() else i


def _special_tokens(path: pathlib.Path) -> dict:
    """Special tokens and ids from the JSON files that sit beside a tokenizer."""
    out: dict = {}
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            d = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{file}: not valid JSON ({e})") from None
        for key in ("bos_token", "eos_token", "pad_token", "bos_token_id", "pad_token_id"):
            if d.get(key) is not None:
                out.setdefault(key, d[key])
        eos = d.get("eos_token_id")
        if eos is not None:
            out.setdefault("eos_token_ids", [])
            out["eos_token_ids"] += eos if isinstance(eos, list) else [eos]
        if name == "config.json" and "model_type" in d:
            out["family"] = d["model_type"]
    return out


def load_tokenizer(path=None):
    """The tokenizer of a checkpoint directory (tokenizer.json preferred over tokenizer.model);
    the byte-level tokenizer when path is None."""
    if path is None:
        return ByteTokenizer()
    path = pathlib.Path(path)
    if (path / "tokenizer.json").is_file():
        try:
            return HFTokenizer(path)
        except Exception as e:  # the tokenizers package raises its own exception type
            raise TokenizerError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
    if (path / "tokenizer.model").is_file():
        try:
            return SentencePieceTokenizer(path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path / 'tokenizer.model'}: cannot be read ({e})") from None
    raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")


# ----------------------------------------------------------------------------- chat templates
# Plain-Python renderings of each family's published chat template (text turns; no tools).
# tests/test_data.py holds every one against the published Jinja template.

def _alternating(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError("conversation roles must alternate user/assistant/user/... after an optional system")


def gemma_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Gemma 1/2/3: turns of <start_of_turn>{user|model}; a system message opens the first
    user turn, followed by a blank line (Gemma 3's rule; Gemma 1/2 templates have no system)."""
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    _alternating(messages)
    text = "<bos>"
    for i, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else m["role"]
        text += f"<start_of_turn>{role}\n" + (prefix if i == 0 else "") + m["content"].strip() + "<end_of_turn>\n"
    return text + ("<start_of_turn>model\n" if add_generation_prompt else "")


def llama3_chat(messages: list[dict], add_generation_prompt: bool = True, date: str | None = None) -> str:
    """Llama 3.1/3.2: a system header that always states the knowledge cutoff and today's date."""
    import datetime
    date = date or datetime.date.today().strftime("%d %b %Y")  # the template's strftime_now
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}<|eot_id|>")
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


QWEN2_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def qwen2_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Qwen 2/2.5 ChatML, with Qwen's default system message when none is given."""
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN2_DEFAULT_SYSTEM}] + list(messages)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def qwen3_chat(messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = True) -> str:
    """Qwen 3 ChatML: no default system; reasoning (<think>...</think>) is dropped from
    assistant turns before the last user message and kept in a block after it."""
    last_query = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    text = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
            continue
        content, reasoning = m["content"], m.get("reasoning_content")
        if reasoning is None:
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        if i > last_query and (i == len(messages) - 1 or reasoning):
            content = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        text += f"<|im_start|>assistant\n{content}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
    return text


# The token that closes an assistant turn: generation in chat mode stops there too.
END_OF_TURN = {"gemma": "<end_of_turn>", "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>",
               "llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>"}

CHAT_TEMPLATES = {"gemma": gemma_chat, "gemma2": gemma_chat, "gemma3": gemma_chat, "llama3": llama3_chat,
                  "qwen2": qwen2_chat, "qwen3": qwen3_chat}


def apply_chat_template(messages: list[dict], family: str, add_generation_prompt: bool = True, **kw) -> str:
    """Render [{"role", "content"}, ...] with the model family's template (model.Config.family).
    The text starts with the BOS token where the family uses one: encode it with add_bos=False."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: expected {{'role': str, 'content': str}}, got {m!r}")
    return CHAT_TEMPLATES[family](messages, add_generation_prompt, **kw)
