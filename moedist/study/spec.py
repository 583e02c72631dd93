"""A table's study config (configs/study/<table>.yaml): read, overridden with --set, checked.

Keys (every table): table, domains_dir, max_train_bytes, base_config, base_overrides, finetune_config, out,
kept (where `keep` puts finished jobs' results and `run` restores them from), eval_batches, eval_micro_batch, domains, steps, seeds, common (overrides for every fine-tune), methods
(name -> {overrides: [...], lrs: [...], ...}); table-specific: tune_seed (a), target / step_counts (b),
replay_weight (c), multi_steps / merges (d). Bad input raises SpecError (one line).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml

TABLES = ("a", "b", "c", "d")
MERGE_METHODS = ("average", "task_arithmetic", "ties", "lorahub")


class SpecError(Exception):
    """Bad study config: one line for the user."""


@dataclass
class Spec:
    table: str
    out: str
    domains: List[str]
    methods: Dict[str, Dict[str, Any]]
    seeds: List[int]
    steps: int
    domains_dir: str = "runs/study/domains"
    max_train_bytes: int = 1_500_000
    base_config: str = "configs/study/base.yaml"
    base_overrides: List[str] = field(default_factory=list)
    cache_dir: str = "~/.cache/moedist/study"      # where base models are cached, by config hash
    finetune_config: str = "configs/study/finetune.yaml"
    eval_batches: int = 16
    eval_micro_batch: int = 8
    common: List[str] = field(default_factory=list)
    tune_seed: int = 1000
    target: str = "code"
    step_counts: List[int] = field(default_factory=list)
    replay_weight: float = 0.25
    multi_steps: int = 0
    merges: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    kept: str = ""                                  # committed results of finished jobs (keep.py); "" = none


def _parse_set(items: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def load_spec(path: str, sets: Sequence[str] = ()) -> Spec:
    """The study config at `path` with `--set key=value` overrides (values parsed as YAML)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: no such study config")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping")
    raw.update(_parse_set(sets))
    known = set(Spec.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(known))})")
    missing = [k for k in ("table", "out", "domains", "methods", "seeds", "steps") if k not in raw]
    if missing:
        raise SpecError(f"{path}: missing key {missing[0]!r}")
    spec = Spec(**raw)
    if spec.table not in TABLES:
        raise SpecError(f"{path}: table={spec.table!r}: allowed {', '.join(TABLES)}")
    if not spec.seeds or not spec.methods or spec.steps < 1 or not spec.domains:
        raise SpecError(f"{path}: seeds, methods and domains must be non-empty and steps >= 1")
    bad = [d for d in spec.domains if d not in ("code", "prose", "man")]
    if bad:
        raise SpecError(f"{path}: domains: {bad[0]!r} is not one of code, prose, man")
    for name, m in spec.methods.items():
        if not isinstance(m, dict) or not m.get("lrs"):
            raise SpecError(f"{path}: methods.{name}: needs lrs: [learning rates]")
    kinds = ("plain", "per_domain", "replay", "ema", "lawa", "moe_frozen", "moe_replay")
    for name, m in spec.methods.items():
        if spec.table == "c" and m.get("kind", "plain") not in kinds:
            raise SpecError(f"{path}: methods.{name}.kind={m.get('kind')!r}: allowed {', '.join(kinds)}")
    for name, mg in spec.merges.items():
        if not isinstance(mg, dict) or mg.get("method") not in MERGE_METHODS or mg.get("of") not in spec.methods:
            raise SpecError(f"{path}: merges.{name}: needs method: {'|'.join(MERGE_METHODS)} and of: one of the "
                            f"methods ({', '.join(spec.methods)})")
    if spec.table == "b" and spec.target not in spec.domains:
        raise SpecError(f"{path}: target={spec.target!r} is not one of domains {spec.domains}")
    return spec
