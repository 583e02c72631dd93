"""Tokenizers: a local Hugging Face tokenizer directory, or raw UTF-8 bytes.

    tok = resolve_tokenizer(cfg.data.tokenizer, cfg.model.from_hf)   # config default rules
    tok = load_tokenizer("path/to/hf_dir")  |  load_tokenizer("bytes")
    ids = tok.encode("text")                # no special tokens
    ids_per_text = tok.encode_batch(texts)  # the same, many texts at once (fast for HF)
    ids, offsets = tok.encode_with_offsets(text)   # offsets[i] = (start, end) characters of ids[i]
    tok.save(run_dir)                       # HF files, or moedist_tokenizer.json for bytes
    tok = tokenizer_from_dir(ckpt_dir)      # what `save` wrote (None when nothing was saved)

Both kinds implement the `Tokenizer` protocol; nothing else in moedist talks to
`transformers` tokenizers directly. Hugging Face tokenizers load with
`local_files_only=True` (no downloads, ever).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from moedist.config_yaml import ConfigError

BYTES = "bytes"
BYTES_FILE = "moedist_tokenizer.json"  # marks a saved byte-level tokenizer
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # HF's marker of assistant text in a chat template
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@runtime_checkable
class Tokenizer(Protocol):
    """What moedist needs from a tokenizer."""

    kind: str                    # "bytes" | "hf"
    vocab_size: int              # number of ids the model must embed (len(tokenizer) for HF)
    eos_id: Optional[int]        # appended after each document (None for bytes)
    pad_id: int                  # padding id (never counted in the loss)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]: ...

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def fingerprint(self) -> str: ...

    def save(self, out_dir: str) -> None: ...

    def has_chat_template(self) -> bool: ...

    def render_chat(self, messages: List[Dict[str, Any]], add_generation_prompt: bool = False) -> str: ...


class ByteTokenizer:
    """Token = one byte of the UTF-8 text (vocabulary 256, no special tokens)."""

    kind = "bytes"
    vocab_size = 256
    eos_id: Optional[int] = None
    pad_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        ids, offsets = [], []
        for i, ch in enumerate(text):          # every byte of character i spans characters [i, i+1)
            b = ch.encode("utf-8")
            ids.extend(b)
            offsets.extend([(i, i + 1)] * len(b))
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes-v1"

    def save(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, BYTES_FILE), "w") as fh:
            json.dump({"type": BYTES, "vocab_size": 256}, fh)

    def has_chat_template(self) -> bool:
        return False

    def render_chat(self, messages, add_generation_prompt: bool = False) -> str:
        raise ConfigError("data.tokenizer='bytes': the chat format needs a Hugging Face tokenizer with a chat_template")


class HFTokenizer:
    """A `transformers` tokenizer loaded from a local directory."""

    kind = "hf"

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = os.path.abspath(path)
        try:
            self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"data.tokenizer={path!r}: cannot load a Hugging Face tokenizer: "
                              f"{' '.join(str(err).split())[:200]}") from None
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        pad = self.tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return list(self.tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if not texts:
            return []
        # verbose=False: documents longer than model_max_length are fine here (they are packed or cut later)
        return [list(ids) for ids in self.tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in sorted(os.listdir(self.path)):
            if name in HF_TOKENIZER_FILES or name in ("special_tokens_map.json", "merges.txt", "chat_template.jinja",
                                                      "added_tokens.json"):
                with open(os.path.join(self.path, name), "rb") as fh:
                    h.update(name.encode() + b"\0" + fh.read())
        return "hf-" + h.hexdigest()[:16]

    def save(self, out_dir: str) -> None:
        self.tok.save_pretrained(out_dir)

    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def render_chat(self, messages, add_generation_prompt: bool = False) -> str:
        if not self.has_chat_template():
            raise ConfigError(f"data.tokenizer={self.path!r}: has no chat_template (needed by the chat format)")
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def has_generation_markers(self) -> bool:
        """Whether the chat template marks assistant text with ``{% generation %}`` blocks."""
        template = self.tok.chat_template if self.has_chat_template() else ""
        return isinstance(template, str) and _GENERATION.search(template) is not None

    def chat_with_assistant_mask(self, messages: List[Dict[str, Any]]) -> Tuple[List[int], List[int]]:
        """(ids, mask) of a conversation from HF's ``{% generation %}`` markers (mask 1 = assistant text)."""
        enc = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), [int(m) for m in enc["assistant_masks"]]


def has_hf_tokenizer(path: Optional[str]) -> bool:
    return bool(path) and os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in HF_TOKENIZER_FILES)


def load_tokenizer(spec: str) -> Tokenizer:
    """'bytes' or a local Hugging Face tokenizer directory (ConfigError when neither)."""
    if spec == BYTES:
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if os.path.isfile(os.path.join(path, BYTES_FILE)) and not has_hf_tokenizer(path):
        return ByteTokenizer()
    if not os.path.isdir(path):
        raise ConfigError(f"data.tokenizer={spec!r}: no such directory (allowed: 'bytes' or a local Hugging Face "
                          "tokenizer directory)")
    if not has_hf_tokenizer(path):
        raise ConfigError(f"data.tokenizer={spec!r}: no tokenizer files in it (expected one of "
                          f"{', '.join(HF_TOKENIZER_FILES)})")
    from moedist.checkpoint.safety import refuse_pickles

    refuse_pickles(path, "data.tokenizer")
    return HFTokenizer(path)


def resolve_tokenizer(spec: Optional[str], from_hf: Optional[str]) -> Tokenizer:
    """The config's rule: data.tokenizer, else the model.from_hf directory when it has one, else bytes."""
    if spec is not None:
        return load_tokenizer(spec)
    if has_hf_tokenizer(from_hf):
        return load_tokenizer(from_hf)
    return ByteTokenizer()


def tokenizer_from_dir(path: str) -> Optional[Tokenizer]:
    """The tokenizer saved in a run, checkpoint or Hugging Face directory, or None."""
    if has_hf_tokenizer(path):
        return load_tokenizer(path)
    if os.path.isfile(os.path.join(path, BYTES_FILE)):
        return ByteTokenizer()
    return None
