"""Merge math for several fine-tunes of one base: pure functions on {key: tensor} dicts (torch only).

    average(states, weights)                          # model soup / WARM: sum_i w_i * theta_i, w normalised
    task_arithmetic(base, states, scale, weights)     # base + scale * sum_i w_i * (theta_i - base)
    ties(base, states, density, scale, weights)       # TIES-Merging (Yadav et al. 2023)
    linear_combination(states, weights, keys)         # LoraHub: sum_i w_i * theta_i on `keys` (no normalising)

Every input dict has the same keys and shapes (the caller checks, naming the key); values
are combined in fp32 and returned in fp32. TIES works per tensor: each task vector
tau_i = theta_i - base (times w_i) is trimmed to its ceil(density * numel) largest
magnitudes (the rest set to 0); the elected sign of each entry is the sign of sum_i tau_i
(the sign with the larger summed magnitude; 0 when they cancel); the merged entry is the
mean of the trimmed tau_i that are non-zero and agree with the elected sign (0 when none),
then base + scale * merged.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch

State = Dict[str, torch.Tensor]


def _weights(n: int, weights: Optional[Sequence[float]]) -> List[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"--weights: {len(weights)} values for {n} models")
    return [float(w) for w in weights]


def average(states: List[State], weights: Optional[Sequence[float]] = None) -> State:
    """Weighted mean sum_i w_i theta_i / sum_i w_i (uniform by default)."""
    w = _weights(len(states), weights)
    total = sum(w)
    if total == 0:
        raise ValueError("--weights: they sum to 0; a weighted average needs a non-zero sum")
    return {k: sum(wi * s[k].to(torch.float32) for wi, s in zip(w, states)) / total for k in states[0]}


def task_vectors(base: State, states: List[State]) -> List[State]:
    """tau_i = theta_i - base for every key."""
    return [{k: s[k].to(torch.float32) - base[k].to(torch.float32) for k in base} for s in states]


def task_arithmetic(base: State, states: List[State], scale: float = 1.0,
                    weights: Optional[Sequence[float]] = None) -> State:
    """base + scale * sum_i w_i * tau_i (Ilharco et al. 2023)."""
    w = _weights(len(states), weights)
    taus = task_vectors(base, states)
    return {k: base[k].to(torch.float32) + scale * sum(wi * t[k] for wi, t in zip(w, taus)) for k in base}


def trim_top_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """`tau` with all but its ceil(density * numel) largest-magnitude entries set to 0 (ties: lower index wins)."""
    if not 0 < density <= 1:
        raise ValueError(f"--density={density}: must be in (0, 1]")
    flat = tau.reshape(-1)  # [N]
    k = min(flat.numel(), math.ceil(density * flat.numel()))
    if k >= flat.numel():
        return tau.clone()
    order = torch.sort(flat.abs(), descending=True, stable=True).indices  # [N]
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def elect_sign(taus_N: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign (+1, -1, or 0 on a tie) with the larger summed magnitude over the N task vectors.

    taus_N: [N, ...] trimmed task vectors; returns [...]. sum of positive magnitudes minus sum of
    negative ones is the plain sum, so the elected sign is sign(sum_i tau_i).
    """
    return torch.sign(taus_N.sum(dim=0))


def disjoint_mean(taus_N: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the non-zero tau_i whose sign equals `sign` (0 where none agrees).

    taus_N: [N, ...]; sign: [...].
    """
    agree = (torch.sign(taus_N) == sign.unsqueeze(0)) & (taus_N != 0)  # [N, ...]
    count = agree.sum(dim=0)  # [...]
    total = torch.where(agree, taus_N, torch.zeros_like(taus_N)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def ties(base: State, states: List[State], density: float = 0.2, scale: float = 1.0,
         weights: Optional[Sequence[float]] = None) -> State:
    """TIES-Merging: trim, elect sign, disjoint mean, then base + scale * merged (see the module docstring)."""
    w = _weights(len(states), weights)
    taus = task_vectors(base, states)
    out = {}
    for k in base:
        taus_N = torch.stack([wi * trim_top_density(t[k], density) for wi, t in zip(w, taus)])  # [N, ...]
        out[k] = base[k].to(torch.float32) + scale * disjoint_mean(taus_N, elect_sign(taus_N))
    return out


def linear_combination(states: List[State], weights: Sequence[float], keys: Iterable[str]) -> State:
    """LoraHub's composition: sum_i w_i theta_i on `keys` (LoRA factors, each combined on its own),
    the first state's value elsewhere (frozen tensors, equal in every input)."""
    w = _weights(len(states), weights)
    keys = set(keys)
    return {k: (sum(wi * s[k].to(torch.float32) for wi, s in zip(w, states)) if k in keys
                else states[0][k].to(torch.float32)) for k in states[0]}
