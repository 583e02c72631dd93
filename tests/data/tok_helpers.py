"""A real byte-level BPE tokenizer, trained in well under a second on local text (no network).

    path = make_tokenizer_dir(tmp_path / "tok")                     # Qwen-style chat template
    path = make_tokenizer_dir(tmp_path / "tok", chat_template=None)  # no chat template
"""
from __future__ import annotations

import json
import os
from typing import Optional

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL = [EOS, PAD, IM_START, IM_END]

# One turn = "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt is "<|im_start|>assistant\n".
QWEN_STYLE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))[:60_000]


def make_tokenizer_dir(path, chat_template: Optional[str] = QWEN_STYLE, vocab_size: int = 600) -> str:
    """Train a byte-level BPE on pydoc text and save it as a Hugging Face tokenizer directory.

    Args:
        path: directory to write (created).
        chat_template: Jinja chat template, or None for a tokenizer without one.
        vocab_size: BPE vocabulary size (special tokens included).

    Returns:
        The directory, as a string.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([training_text()], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=[IM_START, IM_END])
    if chat_template is not None:
        tok.chat_template = chat_template
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(str(path))
    return str(path)


def write_jsonl(path, rows) -> str:
    """Write dicts (or raw strings, written as they are) one per line; returns the path as a string."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)
