"""LoRA math shared by every LoRA form (pure functions; the parameters live in `moedist.moe.lora.LoRA`).

Shapes: N rows, I / O input / output width of the projection, L stacked experts, r rank.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from moedist.moe.ffn import grouped_mm


def lora_scale(rank: int, alpha: Optional[float]) -> float:
    """alpha / r, with alpha = r when not given."""
    return float(rank if alpha is None else alpha) / float(rank)


def kaiming_uniform_a5(shape: Sequence[int], fan_in: int, g: torch.Generator) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of `shape`, fp32 on the CPU from `g`: `kaiming_uniform_(a=sqrt(5))`
    as PEFT and `nn.Linear` draw A (gain sqrt(1/3) * sqrt(3 / fan_in))."""
    return (torch.rand(*shape, generator=g, device="cpu") * 2 - 1) * (1.0 / math.sqrt(fan_in))


def lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               counts_L: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The unscaled update x @ A @ B in math orientation (pure function; x already in the factors' dtype).

    Dense: x [..., I], A [I, r], B [r, O] -> [..., O]. Stacked: x [N, I] sorted by expert, A [L, I, r],
    B [L, r, O], counts_L[l] rows for expert l -> [N, O].
    """
    if lora_A.dim() == 3:
        if counts_L is None:
            raise ValueError("lora_delta: stacked factors [L, I, r] need counts_L (rows per expert)")
        return grouped_mm(grouped_mm(x, lora_A, counts_L), lora_B, counts_L)  # [N, r] -> [N, O]
    return (x @ lora_A) @ lora_B  # [..., I] @ [I, r] @ [r, O]


def dropout_keep(shape: Sequence[int], p: float, generator: torch.Generator) -> torch.Tensor:
    """The keep mask `U >= p`, U ~ Uniform[0, 1) in float32 on the generator's device (bool)."""
    return torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32) >= p


def lora_dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator) -> torch.Tensor:
    """Inverted dropout whose mask comes from `generator` (never the global RNG).

    The mask is drawn on CPU in float32 and moved, so it is the same on every device.
    """
    if not training or p == 0.0:
        return x
    keep = dropout_keep(x.shape, p, generator).to(device=x.device, dtype=x.dtype)
    return x * keep / (1.0 - p)
