"""A real byte-level BPE tokenizer trained on local text in about a second (no downloads).

    path = train_bpe_tokenizer("runs/toy/tokenizer")                    # Qwen-style chat template
    path = train_bpe_tokenizer(out, text=my_text, vocab_size=2000, chat_template=None)

The result is a Hugging Face tokenizer directory (`PreTrainedTokenizerFast.save_pretrained`)
that `transformers.AutoTokenizer` and `moedist.data.load_tokenizer` load: what the demo,
the tests and `python -m moedist.models.toy_hf` put beside a small random model.
"""
from __future__ import annotations

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


def pydoc_text(limit: int = 60_000) -> str:
    """English prose that ships with every Python: the pydoc topics, sorted by name."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))[:limit]


def train_bpe_tokenizer(path, text: Optional[str] = None, vocab_size: int = 600,
                        chat_template: Optional[str] = QWEN_STYLE) -> str:
    """Train a byte-level BPE on `text` (default: pydoc prose) and save it as a HF tokenizer directory.

    Args:
        path: directory to write (created).
        text: training text; None = the first 60 kB of `pydoc_text()`.
        vocab_size: BPE vocabulary size, special tokens included.
        chat_template: Jinja chat template, or None for a tokenizer without one.

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
    bpe.train_from_iterator([pydoc_text() if text is None else text], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=[IM_START, IM_END])
    if chat_template is not None:
        tok.chat_template = chat_template
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(str(path))
    return str(path)
