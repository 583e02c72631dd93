"""A real byte-level BPE tokenizer, trained in well under a second on local text (no network).

    path = make_tokenizer_dir(tmp_path / "tok")                     # Qwen-style chat template
    path = make_tokenizer_dir(tmp_path / "tok", chat_template=None)  # no chat template
"""
from __future__ import annotations

import json
import os
from typing import Optional

from moedist.data.bpe import EOS, IM_END, IM_START, PAD, QWEN_STYLE, SPECIAL, pydoc_text  # noqa: F401

# The same rendering, with HF's {% generation %} markers around what the assistant says.
QWEN_STYLE_GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def training_text() -> str:
    return pydoc_text()


def make_tokenizer_dir(path, chat_template: Optional[str] = QWEN_STYLE, vocab_size: int = 600) -> str:
    """A HF tokenizer directory trained on pydoc text (`moedist.data.bpe.train_bpe_tokenizer`)."""
    from moedist.data.bpe import train_bpe_tokenizer

    return train_bpe_tokenizer(path, vocab_size=vocab_size, chat_template=chat_template)


def write_jsonl(path, rows) -> str:
    """Write dicts (or raw strings, written as they are) one per line; returns the path as a string."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)
