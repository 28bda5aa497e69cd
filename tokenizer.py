"""tokenizer.py — one small interface over three tokenizer backends, picked from what a checkpoint holds:

    tok = load_tokenizer("path/to/ckpt")      # tokenizer.json (HF `tokenizers`), else tokenizer.model
    tok = load_tokenizer(None)                # the byte-level tokenizer of the tiny presets
    ids = tok.encode("Hello")                 # with the model's BOS, as transformers does
    text = tok.decode(ids)                    # special tokens dropped
    tok.bos_id, tok.eos_ids, tok.pad_id, tok.token_id("<end_of_turn>")
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

    def save(self, directory) -> None:
        """Mark a checkpoint directory as using this tokenizer (load_tokenizer finds it)."""
        (pathlib.Path(directory) / BYTE_TOKENIZER_FILE).write_text(json.dumps(
            {"type": "bytes", "vocab_size": self.vocab_size, "pad_id": self.pad_id, "bos_id": self.bos_id,
             "eos_ids": list(self.eos_ids)}) + "\n")

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


BYTE_TOKENIZER_FILE = "byte_tokenizer.json"  # marks a checkpoint trained with ByteTokenizer


def load_tokenizer(path=None):
    """The tokenizer of a checkpoint directory (tokenizer.json preferred over tokenizer.model,
    then the byte-level marker that tiny-preset exports carry); ByteTokenizer when path is None."""
    if path is None:
        return ByteTokenizer()
    path = pathlib.Path(path)
    if (path / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    if (path / "tokenizer.json").is_file():
        try:
            tok = HFTokenizer(path)
            tok.decode(tok.encode("Hello, world 123!"))  # some broken files fail only when used
            return tok
        except Exception as e:  # the tokenizers package raises its own exception type
            raise TokenizerError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
    if (path / "tokenizer.model").is_file():
        try:
            return SentencePieceTokenizer(path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path / 'tokenizer.model'}: cannot be read ({e})") from None
    raise TokenizerError(f"{path}: no tokenizer.json, tokenizer.model or {BYTE_TOKENIZER_FILE}")


def check_same_tokenizer(tok_s, rows_s: int, tok_t, rows_t: int) -> None:
    """Two models may share log-probs when their tokenizers agree: embedding tables of different sizes
    only when both go past the tokenizer's ids (padding rows). Otherwise a TokenizerError naming both."""
    ids_s, ids_t = (getattr(t, "vocab_size", 259) for t in (tok_s, tok_t))
    if rows_s != rows_t and not (type(tok_s) is type(tok_t) and ids_s == ids_t <= min(rows_s, rows_t)):
        raise TokenizerError(f"the teacher's vocabulary ({rows_t} rows, tokenizer of {ids_t} ids) and the student's "
                             f"({rows_s} rows, {ids_s} ids) differ beyond padding: distillation needs the same tokenizer")
