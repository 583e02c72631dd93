"""Capacity and token dropping (pure functions).

capacity = max(min_capacity, ceil(capacity_factor * T * K / E)); a capacity
factor of None or 0 means dropless. Decisions are made on one rank's own
tokens before any all-to-all (GShard-style per-group capacity), so dropped
tokens never travel and results do not depend on the EP size. A dropped
(token, slot) contributes zero to the output: the residual carries the token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch

from moedist.choices import DROP_POLICIES
from moedist.moe.counts import count_ids


@dataclass
class CapacityResult:
    """Which (token, slot) pairs an expert accepts.

    keep_TK: [T, K] bool; dropped_E: [E] int64 pairs refused per expert;
    capacity: tokens per expert, or None when dropless.
    """

    keep_TK: torch.Tensor
    dropped_E: torch.Tensor
    capacity: Optional[int]


def compute_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: Optional[float], min_capacity: int = 0) -> Optional[int]:
    """ceil(capacity_factor * num_tokens * top_k / num_experts), at least min_capacity.

    Returns None (dropless) when capacity_factor is None or 0.
    """
    if capacity_factor is None or capacity_factor == 0:
        return None
    if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor={capacity_factor}: must be a finite number > 0, or 0/None for dropless")
    if min_capacity < 0:
        raise ValueError(f"min_capacity={min_capacity}: must be >= 0")
    # Exact arithmetic on the decimal the user wrote: in floats 1.1 * 100 / 10
    # is 11.000000000000002 and ceil would give 12.
    exact = Fraction(str(capacity_factor)) * num_tokens * top_k / num_experts
    return max(int(min_capacity), math.ceil(exact))


def select_tokens(idx_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int, capacity: Optional[int],
                  policy: str = "position", active_TK: Optional[torch.Tensor] = None) -> CapacityResult:
    """Decide which routed pairs each expert keeps, at most `capacity` each.

    policy "position": first come first served in slot-major order (every
    token's first choice before any second choice, then token order), as
    GShard/DeepSpeed top-2 do. policy "probs": each expert keeps the pairs with
    the largest routing weight (ties broken by position).
    active_TK: [T, K] bool, the pairs routed at all (None = every pair); an
    inactive pair is never kept and takes no capacity (GShard's random second
    expert). dropped_E counts active pairs only.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy={policy!r}: allowed {', '.join(DROP_POLICIES)}")
    T, K = idx_TK.shape
    if capacity is None:
        keep = torch.ones_like(idx_TK, dtype=torch.bool) if active_TK is None else active_TK.clone()
        return CapacityResult(keep, torch.zeros(num_experts, dtype=torch.long, device=idx_TK.device), None)
    e_P = idx_TK.t().reshape(-1)  # [K*T] slot-major: pair p = k*T + t
    if active_TK is not None:  # inactive pairs go to a virtual expert E past the real ones
        e_P = torch.where(active_TK.t().reshape(-1), e_P, torch.full_like(e_P, num_experts))
    if policy == "position":
        order = torch.argsort(e_P, stable=True)  # by expert, then slot-major position
    else:
        w_P = weight_TK.detach().t().reshape(-1)  # [K*T]
        by_w = torch.argsort(w_P, descending=True, stable=True)
        order = by_w[torch.argsort(e_P[by_w], stable=True)]  # by expert, then weight desc
    counts_E = count_ids(e_P, num_experts + 1)  # [E + 1] (the last: inactive pairs)
    start_E = torch.cumsum(counts_E, 0) - counts_E  # [E + 1]
    rank_sorted = torch.arange(e_P.numel(), device=e_P.device) - start_E[e_P[order]]  # place within its expert
    rank_P = torch.empty_like(rank_sorted)
    rank_P[order] = rank_sorted
    keep_P = (rank_P < capacity) & (e_P < num_experts)  # [K*T]
    keep_TK = keep_P.view(K, T).t().contiguous()  # [T, K]
    kept_E = count_ids(e_P, num_experts + 1, keep_P)[:num_experts]  # (no boolean indexing: no host sync)
    return CapacityResult(keep_TK, counts_E[:num_experts] - kept_E, capacity)
