"""chat.py — each family's chat template as a plain Python function (text turns; no tools).

The published templates are Jinja; these render the same text (tests/test_data.py holds every one
against the published template). data.py tokenizes with them; sample.py chats with them.

    apply_chat_template([{"role": "user", "content": "Hi"}], "qwen3")   # → "<|im_start|>user\nHi<|im_end|>\n..."
"""
from __future__ import annotations

import datetime

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


# ----------------------------------------------------------------------------- JSONL datasets
