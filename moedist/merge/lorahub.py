"""LoraHub (Huang et al. 2023): a gradient-free search for the weights w that combine N LoRA adapters
(or LoRA experts) as sum_i w_i * theta_i, minimising validation loss + l1 * sum_i |w_i| on a few examples.

    w, f, evals = search(objective, n, budget=40)   # nevergrad's NGOpt when installed, else coordinate_search

`coordinate_search` (used when nevergrad is not installed): start at `init` (default 1/N each);
sweep the coordinates in order, trying w_i + step then w_i - step (clipped to [-1.5, 1.5],
LoraHub's bounds) and keeping the first that lowers the objective; after a sweep with no
improvement halve the step (0.5, 0.25, ... down to 1/64). A point already evaluated is not
evaluated again. Deterministic; at most `budget` objective calls (the first is the starting point).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

BOUND = 1.5
Objective = Callable[[List[float]], float]


def coordinate_search(objective: Objective, n: int, budget: int, init: Optional[Sequence[float]] = None,
                      step: float = 0.5, min_step: float = 1.0 / 64) -> Tuple[List[float], float, int]:
    """(best weights, best objective, objective calls); see the module docstring."""
    w = [float(x) for x in init] if init is not None else [1.0 / n] * n
    best = objective(w)
    calls = 1
    seen = {tuple(w): best}  # a point met again is not evaluated (nor counted) again
    while calls < budget and step >= min_step:
        improved = False
        for i in range(n):
            for delta in (step, -step):
                if calls >= budget:
                    break
                cand = list(w)
                cand[i] = max(-BOUND, min(BOUND, cand[i] + delta))
                if cand[i] == w[i]:
                    continue
                if tuple(cand) in seen:
                    f = seen[tuple(cand)]
                else:
                    f = seen[tuple(cand)] = objective(cand)
                    calls += 1
                if f < best:
                    w, best, improved = cand, f, True
                    break
        if not improved:
            step /= 2
    return w, best, calls


def search(objective: Objective, n: int, budget: int,
           init: Optional[Sequence[float]] = None) -> Tuple[List[float], float, int, str]:
    """(weights, objective, calls, optimizer name): nevergrad NGOpt when importable, else coordinate search."""
    try:
        import nevergrad as ng
    except ImportError:
        w, f, calls = coordinate_search(objective, n, budget, init)
        return w, f, calls, "coordinate search"
    import numpy as np

    start = np.array(list(init) if init is not None else [1.0 / n] * n, dtype=float)
    param = ng.p.Array(init=start, lower=-BOUND, upper=BOUND)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    seen: List[Tuple[float, List[float]]] = []

    def counted(x) -> float:
        w = [float(v) for v in x]
        f = objective(w)
        seen.append((f, w))
        return f

    opt.minimize(counted)
    f, w = min(seen, key=lambda t: t[0])
    return w, f, len(seen), "nevergrad NGOpt"
