"""Tables (a)-(d) of the study: which runs to make, in order; each returns its results (JSON-able).

(a) mixed multi-domain fine-tuning at equal trainable parameters: each method's lr tuned on the dev
    split (seed tune_seed), then `seeds` runs at that lr, test loss per domain.
(b) gain vs forgetting: fine-tune on `target` over methods x lrs x step_counts; gain = base loss -
    run loss on target, forgetting = run loss - base loss on the other domains (mean), test split.
(c) continual domains[0] -> [1] -> [2], no domain id at test: kinds plain | per_domain | replay |
    ema | lawa | moe_frozen (grow experts per stage, freeze the old ones and their router rows) |
    moe_replay (moe_frozen plus replay of the earlier domains: router replay, since the frozen old
    experts and router rows leave only the new experts and new router rows to learn from it).
(d) merging per-domain fine-tunes (average / task_arithmetic / ties of `methods.full`-style runs,
    lorahub of LoRA runs) vs one multi-domain run of multi_steps.
Every run directory holds the training summary.json and study_eval_<split>_<domains>.json; the
results record those paths and numbers, and report.py computes every statistic from them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from moedist.study.runner import Runner, flow, sources
from moedist.study.spec import Spec
from moedist.study.stats import argmin, domain_mean


def _lr_dir(lr: float) -> str:
    return f"lr{lr:g}"


def ft_overrides(spec: Spec, base: Path, method: Dict[str, Any], lr: float, seed: int, srcs: List[Dict[str, Any]],
                 steps: int, init: Path | None = None) -> List[str]:
    """Overrides of one fine-tune: base/init, data, lr, seed, steps, then the spec's and the method's own."""
    return [f"model.init_from={init or base}", "data.sources=" + flow(srcs), f"train.lr={lr:g}",
            f"train.seed={seed}", f"data.seed={seed}", f"train.max_steps={steps}",
            *spec.common, *method.get("overrides", [])]


def table_a(spec: Spec, r: Runner, base: Path) -> Dict[str, Any]:
    out, names = Path(spec.out), spec.domains
    mixed = sources(r.domains_dir, names, "train")
    rows: Dict[str, Any] = {}
    for m, method in spec.methods.items():
        lrs = [float(x) for x in method["lrs"]]
        dev: Dict[float, float] = {}
        if len(lrs) > 1:
            for lr in lrs:
                d = out / m / "tune" / _lr_dir(lr)
                r.train(d, ft_overrides(spec, base, method, lr, spec.tune_seed, mixed, spec.steps))
                dev[lr] = domain_mean(r.evaluate(d, names, "dev"), names)
        lr = argmin(dev) if dev else lrs[0]
        runs = {}
        for s in spec.seeds:
            d = out / m / _lr_dir(lr) / f"seed{s}"
            summ = r.train(d, ft_overrides(spec, base, method, lr, s, mixed, spec.steps))
            runs[str(s)] = {"dir": str(d), "losses": r.evaluate(d, names, "test"),
                            "trainable_params": summ.get("trainable_params")}
        rows[m] = {"lr": lr, "dev_loss_by_lr": {f"{k:g}": v for k, v in dev.items()}, "runs": runs}
    return {"table": "a", "domains": names, "base": str(base), "methods": rows}


def table_b(spec: Spec, r: Runner, base: Path) -> Dict[str, Any]:
    out, names = Path(spec.out), spec.domains
    base_losses = r.evaluate(base, names, "test", cache_dir=out / "base_eval")
    target = sources(r.domains_dir, [spec.target], "train")
    points = []
    for m, method in spec.methods.items():
        for steps in spec.step_counts or [spec.steps]:
            for lr in [float(x) for x in method["lrs"]]:
                for s in spec.seeds:
                    d = out / m / f"steps{steps}" / _lr_dir(lr) / f"seed{s}"
                    r.train(d, ft_overrides(spec, base, method, lr, s, target, steps))
                    points.append({"method": m, "steps": steps, "lr": lr, "seed": s, "dir": str(d),
                                   "losses": r.evaluate(d, names, "test")})
    return {"table": "b", "domains": names, "target": spec.target, "base": str(base), "base_losses": base_losses,
            "points": points}


def _continual(spec: Spec, r: Runner, base: Path, m: str, method: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """One method's A -> B -> C chain for one seed: losses on every domain after every stage."""
    names, kind = spec.domains, method.get("kind", "plain")
    lr = float(method["lrs"][0])
    root = Path(spec.out) / m / f"seed{seed}"
    stages: List[Dict[str, Any]] = []
    prev: Path | None = None
    experts = int(method.get("experts", 2))
    for i, dom in enumerate(names):
        d = root / f"stage{i}_{dom}"
        weights = {dom: 1.0}
        extra: List[str] = []
        replay = kind in ("replay", "moe_replay")
        seen = [dom] + (names[:i] if replay else [])
        if replay:
            weights.update({e: float(spec.replay_weight) for e in names[:i]})
        init = None if kind == "per_domain" else prev
        if kind in ("moe_frozen", "moe_replay") and prev is not None:
            add = int(method.get("add_experts", experts))
            grown = root / f"stage{i}_grown"
            # a finished (or kept) stage needs no grown init: its checkpoint's parent may be gone
            init = grown if r.trained(d) else r.grow(prev, add, names[i - 1], grown)
            old = experts + (i - 1) * add
            extra = [f"moe.num_experts={old + add}", "moe.freeze_experts=" + flow(list(range(old)))]
        srcs = sources(r.domains_dir, seen, "train", weights)
        r.train(d, ft_overrides(spec, base, method, lr, seed, srcs, spec.steps, init) + extra)
        model = d / {"ema": "final_ema", "lawa": "final_lawa"}.get(kind, "final")
        stages.append({"domain": dom, "dir": str(d), "model": str(model),
                       "losses": r.evaluate(model, names, "test", cache_dir=d)})
        prev = model
    return {"kind": kind, "lr": lr, "stages": stages}


def table_c(spec: Spec, r: Runner, base: Path) -> Dict[str, Any]:
    out, names = Path(spec.out), spec.domains
    base_losses = r.evaluate(base, names, "test", cache_dir=out / "base_eval")
    rows = {m: {str(s): _continual(spec, r, base, m, method, s) for s in spec.seeds}
            for m, method in spec.methods.items()}
    return {"table": "c", "domains": names, "base": str(base), "base_losses": base_losses, "methods": rows}


def table_d(spec: Spec, r: Runner, base: Path) -> Dict[str, Any]:
    out, names = Path(spec.out), spec.domains
    per_seed: Dict[str, Any] = {}
    for s in spec.seeds:
        row: Dict[str, Any] = {}
        fts: Dict[str, List[Path]] = {}
        for m, method in spec.methods.items():      # per-domain fine-tunes, one set per method
            lr = float(method["lrs"][0])
            fts[m] = []
            for dom in names:
                d = out / m / dom / f"seed{s}"
                r.train(d, ft_overrides(spec, base, method, lr, s, sources(r.domains_dir, [dom], "train"), spec.steps))
                fts[m].append(d)
                row[f"{m}:{dom}"] = {"dir": str(d), "losses": r.evaluate(d, names, "test")}
            if method.get("multi", False):
                d = out / m / "multi" / f"seed{s}"
                steps = spec.multi_steps or spec.steps * len(names)
                r.train(d, ft_overrides(spec, base, method, lr, s, sources(r.domains_dir, names, "train"), steps))
                row[f"{m}:multi"] = {"dir": str(d), "losses": r.evaluate(d, names, "test")}
        for name, mg in spec.merges.items():
            d = out / "merged" / name / f"seed{s}"
            needs_base = mg["method"] in ("task_arithmetic", "ties")
            if not r.eval_path(d, names, "test").exists():  # a kept evaluation needs no merged weights (restore)
                r.merge(mg["method"], fts[mg["of"]], d, base if needs_base else None,
                        [str(x) for x in mg.get("args", [])])
            row[f"merge:{name}"] = {"dir": str(d), "losses": r.evaluate(d, names, "test")}
        per_seed[str(s)] = row
    return {"table": "d", "domains": names, "base": str(base), "seeds": per_seed}


TABLES = {"a": table_a, "b": table_b, "c": table_c, "d": table_d}
