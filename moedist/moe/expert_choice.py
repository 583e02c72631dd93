"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"), a pure function.

Each expert picks the C tokens with the highest scores, C = capacity (capacity
factor * T * K / E, `compute_capacity`), instead of each token picking K experts:
every expert gets exactly min(C, T) tokens and a token gets 0 to E experts. The
combine weight of a chosen (token, expert) pair is its router probability.

The choice is over one rank's micro-batch (its T tokens), made before dispatch,
as in other implementations (the paper's per-group choice): results do not
depend on the EP size, only on which tokens a rank holds.

The routing is returned in the layer's pair form with K = E slots per token:
slot e of token t is expert e, kept when expert e chose t.
"""
from __future__ import annotations

from typing import Tuple

import torch

from moedist.moe.capacity import CapacityResult


def expert_choice(probs_TE: torch.Tensor, capacity: int) -> Tuple[torch.Tensor, torch.Tensor, CapacityResult]:
    """Every expert keeps its `capacity` highest-probability tokens (ties: lower token id first).

    Args:
        probs_TE: [T, E] routing probabilities (differentiable; they become the combine weights).
        capacity: C >= 0 tokens per expert (clamped to T).

    Returns:
        (idx_TE [T, E] int64 with idx[t, e] = e, weight_TE = probs_TE, CapacityResult with
        keep_TE [T, E] bool (expert e chose token t), dropped_E = 0, capacity C).
    """
    T, E = probs_TE.shape
    C = min(int(capacity), T)
    order_ET = torch.argsort(probs_TE.detach().t(), dim=1, descending=True, stable=True)[:, :C]  # [E, C] token ids
    keep_ET = torch.zeros(E, T, dtype=torch.bool, device=probs_TE.device)
    keep_ET.scatter_(1, order_ET, True)  # [E, T]
    idx_TE = torch.arange(E, device=probs_TE.device).expand(T, E).contiguous()  # [T, E]
    dropped_E = torch.zeros(E, dtype=torch.long, device=probs_TE.device)
    return idx_TE, probs_TE, CapacityResult(keep_ET.t().contiguous(), dropped_E, capacity)
