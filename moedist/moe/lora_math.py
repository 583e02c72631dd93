"""LoRA helpers shared by every LoRA form (pure functions)."""
from __future__ import annotations

from typing import Optional

import torch


def lora_scale(rank: int, alpha: Optional[float]) -> float:
    """alpha / r, with alpha = r when not given."""
    return float(rank if alpha is None else alpha) / float(rank)


def lora_dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator) -> torch.Tensor:
    """Inverted dropout whose mask comes from `generator` (never the global RNG).

    The mask is drawn on CPU in float32 and moved, so it is the same on every device.
    """
    if not training or p == 0.0:
        return x
    keep = (torch.rand(x.shape, generator=generator) >= p).to(device=x.device, dtype=x.dtype)
    return x * keep / (1.0 - p)
