"""Chat conversations -> token ids and a loss mask that counts only what the assistant says.

    ids, mask = chat_ids_and_mask(tok, [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "Hello!"}])

Counted (mask 1): the content of every assistant turn and the end-of-turn text the
template puts right after it (``<|im_end|>``, ``</s>``, ...), so the model learns
to stop. Not counted: system/user turns, role headers, and whitespace that only
separates turns.

Two ways, best first:

1. The template has HF ``{% generation %}`` markers: Hugging Face's
   ``return_assistant_tokens_mask`` says which tokens are assistant text.
2. Otherwise, by character spans. For assistant message i::

       start = len(render(messages[:i], add_generation_prompt=True))
       end   = len(render(messages[:i+1]))

   ``full[start:end]`` is the content plus whatever the template appends after
   it; trailing whitespace is dropped from a span that has a non-whitespace
   suffix (``<|im_end|>`` counts, the newline after it does not). The full
   conversation is tokenized once with character offsets, and a token counts
   when its characters lie inside an assistant span.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from moedist.config_yaml import ConfigError
from moedist.data.tokenizer import HFTokenizer, Tokenizer

ASSISTANT = "assistant"


class ChatError(ConfigError):
    """One conversation cannot be turned into ids; the caller prefixes the file and line."""


def check_messages(messages: Any) -> List[Dict[str, Any]]:
    """The messages of one conversation, checked: a list of {role: str, content: str}, one assistant turn at least.

    Raises:
        ChatError: a one-line reason.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatError("field 'messages' must be a non-empty list of {role, content} (format chat)")
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatError(f"messages[{j}] must be an object with role and content, got {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg:
                raise ChatError(f"messages[{j}]: missing field {key!r} (format chat needs role and content)")
            if not isinstance(msg[key], str):
                raise ChatError(f"messages[{j}].{key}: must be a string, got {type(msg[key]).__name__}")
    if not any(m["role"] == ASSISTANT for m in messages):
        raise ChatError("no assistant turn (format chat needs at least one message with role 'assistant')")
    return messages


def _render(tok: Tokenizer, messages: List[Dict[str, Any]], add_generation_prompt: bool = False) -> str:
    try:
        return tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    except ConfigError:
        raise
    except Exception as err:  # jinja2 errors, raise_exception() in the template, ...
        raise ChatError(f"chat template failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}") from None


def _prefix(full: str, part: str, what: str) -> None:
    if not full.startswith(part):
        raise ChatError(f"the chat template is not prefix-stable: rendering {what} is not a prefix of the full "
                        "conversation (use a template with {% generation %} markers)")


def assistant_spans(tok: Tokenizer, messages: List[Dict[str, Any]]) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of the assistant turns."""
    full = _render(tok, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != ASSISTANT:
            continue
        upto = _render(tok, messages[:i + 1])
        _prefix(full, upto, f"messages[:{i + 1}]")
        end = len(upto)
        if i == 0:
            # HF refuses to render an empty conversation: the turn starts where its content does.
            found = upto.find(msg["content"]) if msg["content"] else -1
            start = found if found >= 0 else 0
        else:
            head = _render(tok, messages[:i], add_generation_prompt=True)
            _prefix(full, head, f"messages[:{i}] with the generation prompt")
            start = len(head)
        spans.append((start, _trim_end(full, start, end, msg["content"])))
    return full, spans


def _trim_end(full: str, start: int, end: int, content: str) -> int:
    """Drop trailing whitespace from a span whose text after the content is not only whitespace."""
    span = full[start:end]
    core = content.strip()
    found = span.find(core) if core else -1
    content_end = found + len(core) if found >= 0 else 0
    if span[content_end:].strip():
        return max(start + content_end, start + len(span.rstrip()))
    return end


def chat_ids_and_mask(tok: Tokenizer, messages: Any) -> Tuple[List[int], List[int]]:
    """Token ids of a rendered conversation and its loss mask (1 = assistant turn tokens).

    Args:
        tok: a tokenizer with a chat template.
        messages: ``[{"role": ..., "content": ...}, ...]`` with at least one assistant message.

    Returns:
        (ids, mask), two lists of equal length.

    Raises:
        ChatError (a ConfigError): bad messages, no assistant turn, a template that is not prefix-stable.
    """
    messages = check_messages(messages)
    if isinstance(tok, HFTokenizer) and tok.has_generation_markers():
        try:
            return tok.chat_with_assistant_mask(messages)
        except Exception as err:
            raise ChatError(f"chat template failed: {type(err).__name__}: "
                            f"{' '.join(str(err).split())[:200]}") from None
    full, spans = assistant_spans(tok, messages)
    ids, offsets = tok.encode_with_offsets(full)
    return ids, mask_from_spans(offsets, spans)


def mask_from_spans(offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[int, int]]) -> List[int]:
    """1 for each token whose characters [a, b) lie inside one of the (sorted) spans, else 0."""
    mask, j = [], 0
    for a, b in offsets:
        while j < len(spans) and spans[j][1] <= a:     # offsets only move forward
            j += 1
        mask.append(int(j < len(spans) and spans[j][0] <= a < b <= spans[j][1]))
    return mask
