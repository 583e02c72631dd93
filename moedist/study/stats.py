"""Statistics of the study, pure functions: mean, sample std, paired differences and t confidence intervals.

A 95% interval is mean +- t(0.975, n-1) * std / sqrt(n) (Student t, two-sided); t comes from the
table below (exact to 3 decimals for df <= 30, 1.960 beyond). With one value the std and the interval
are NaN: one seed gives no spread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

# t(0.975, df) for df = 1..30
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t975(df: int) -> float:
    """Two-sided 95% Student t quantile for df >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"df={df}: needs >= 1")
    return T975[df - 1] if df <= len(T975) else 1.960


@dataclass(frozen=True)
class Summary:
    """n values: mean, sample std (n-1) and the 95% half-width of the mean's interval."""

    n: int
    mean: float
    std: float
    ci95: float

    def as_dict(self) -> Dict[str, float]:
        return {"n": self.n, "mean": self.mean, "std": self.std, "ci95": self.ci95}


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample std and 95% CI half-width of values (NaN spread for one value)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize: no values")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(n, mean, std, t975(n - 1) * std / math.sqrt(n))


def paired(a: Dict[int, float], b: Dict[int, float]) -> Summary:
    """Summary of a[s] - b[s] over the seeds s both have (a paired comparison: same seeds, same data order)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("paired: no common seeds")
    return summarize([a[s] - b[s] for s in common])


def domain_mean(losses: Dict[str, float], domains: Sequence[str]) -> float:
    """Unweighted mean of per-domain losses (every domain counts the same, whatever its size)."""
    missing = [d for d in domains if d not in losses]
    if missing:
        raise KeyError(f"no loss for domain(s) {', '.join(missing)}")
    return sum(losses[d] for d in domains) / len(domains)


def forgetting(after_own: Dict[str, float], final: Dict[str, float], earlier: Sequence[str]) -> float:
    """Mean loss increase on earlier domains: final[d] - after_own[d] (loss right after training on d)."""
    if not earlier:
        return 0.0
    return sum(final[d] - after_own[d] for d in earlier) / len(earlier)


def fmt(s: Summary, digits: int = 4) -> str:
    """'1.2345 ± 0.0012 (CI ±0.0020, n=8)'; one value: '1.2345 (n=1)'."""
    if s.n == 1 or math.isnan(s.std):
        return f"{s.mean:.{digits}f} (n={s.n})"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f} (CI ±{s.ci95:.{digits}f}, n={s.n})"


def argmin(scores: Dict[float, float]) -> float:
    """The key with the smallest score (ties: the smallest key, so the choice is deterministic)."""
    if not scores:
        raise ValueError("argmin: empty")
    return min(sorted(scores), key=lambda k: scores[k])


__all__: List[str] = ["Summary", "summarize", "paired", "domain_mean", "forgetting", "fmt", "argmin", "t975"]
