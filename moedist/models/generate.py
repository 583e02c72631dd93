"""Autoregressive decoding with a KV cache: greedy, or temperature + nucleus (top-p) sampling.

    new_ids = generate(model, prompt_ids, max_new_tokens=64)                   # sampled, T=1, top_p=1
    new_ids = generate(model, prompt_ids, temperature=0, eos_ids=[tok.eos_id]) # greedy

One sequence at a time: the prompt is run once (prefill) into a `KVCache`, then
each step feeds only the last token. Sampling draws from a `torch.Generator`
seeded by `seed`, so the same call gives the same ids.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence

import torch

from moedist.models.llama import CausalLM, KVCache


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Raise ValueError (one line, naming the argument) for settings `generate` cannot use."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")


def top_p_filter(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability reaches `top_p` (renormalised).

    The most likely token is always kept; ties at the boundary follow the sort order.
    """
    if top_p >= 1:
        return probs_V
    sorted_p, order = probs_V.sort(descending=True)  # [V]
    before = sorted_p.cumsum(0) - sorted_p           # mass of the more likely tokens
    keep_sorted = before < top_p
    keep_sorted[0] = True
    keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)  # [V] back in vocab order
    kept = probs_V * keep
    return kept / kept.sum()


def next_token(logits_V: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy argmax (temperature 0) or a draw from softmax(logits / T) after top-p filtering."""
    logits_V = logits_V.float()
    if temperature == 0:
        return int(logits_V.argmax())
    probs = top_p_filter(torch.softmax(logits_V / temperature, dim=-1), top_p)  # [V]
    return int(torch.multinomial(probs, 1, generator=gen))


def new_token_room(model: CausalLM, prompt_len: int) -> int:
    """How many tokens can follow a prompt of `prompt_len` (the last new token is never fed back)."""
    if prompt_len > model.max_seq_len:
        raise ValueError(f"the prompt has {prompt_len} tokens, more than model.max_seq_len={model.max_seq_len}")
    return model.max_seq_len - prompt_len + 1


@torch.no_grad()
def generate(model: CausalLM, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 1.0,
             top_p: float = 1.0, eos_ids: Iterable[int] = (), seed: int = 0) -> List[int]:
    """Continue `prompt_ids`; returns the new ids only.

    Args:
        model: a `CausalLM` (put in eval mode; its device is used).
        prompt_ids: the prompt's token ids (at least one).
        max_new_tokens: at most this many new tokens (fewer when model.max_seq_len is reached).
        temperature: 0 = greedy (argmax); else logits are divided by it before softmax.
        top_p: nucleus sampling: draw only from the most likely tokens whose mass reaches top_p.
        eos_ids: stop at any of these ids (the stop id is not returned).
        seed: seed of the sampling generator.

    Raises:
        ValueError: bad sampling settings, an empty prompt, or a prompt longer than model.max_seq_len.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise ValueError("the prompt is empty (no token ids)")
    room = new_token_room(model, len(prompt))
    steps = min(max_new_tokens, room)
    model.eval()
    device = model.output_weight().device
    gen = torch.Generator(device=device).manual_seed(seed)
    stop = {int(i) for i in eos_ids}
    cache = KVCache(len(model.layers))
    logits = model(torch.tensor([prompt], device=device), cache=cache).logits  # [1, S, V]
    out: List[int] = []
    for step in range(steps):
        tok = next_token(logits[0, -1], temperature, top_p, gen)
        if tok in stop:
            break
        out.append(tok)
        if step + 1 < steps:  # the last token is never fed back
            logits = model(torch.tensor([[tok]], device=device), cache=cache).logits  # [1, 1, V]
    return out
