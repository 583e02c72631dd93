"""Per-expert counts on the device, with a static output size (pure functions).

`torch.bincount` sizes its output from max(ids) + 1, so it reads the device (a host
sync on a GPU, no CUDA-graph capture); a scatter-add into a fixed [n] buffer does not.
"""
from __future__ import annotations

from typing import Optional

import torch


def count_ids(ids: torch.Tensor, n: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[n] int64: how many entries of `ids` (any shape, values in [0, n)) equal each id;
    with `mask` (bool, the shape of ids) only the entries where it is True. No host sync."""
    flat = ids.reshape(-1)
    ones = torch.ones_like(flat) if mask is None else mask.reshape(-1).to(flat.dtype)
    return torch.zeros(n, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, ones)
