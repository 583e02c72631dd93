"""Markdown table + PNG plot + report.json of one table, computed from its results.json only.

Scores are per-domain test losses (nats/byte); a run's score is their unweighted mean over the domains.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from moedist.study.stats import domain_mean, fmt, forgetting, paired, summarize


def _plot(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_a(res: Dict[str, Any]) -> Tuple[List[str], Dict[str, Any], Any]:
    names, methods = res["domains"], res["methods"]
    scores = {m: {int(s): domain_mean(r["losses"], names) for s, r in row["runs"].items()} for m, row in methods.items()}
    ref = next(iter(methods))
    for m in methods:
        if m.startswith("lora_moe"):
            ref = m
            break
    stats: Dict[str, Any] = {"reference": ref, "methods": {}}
    lines = [f"| method | lr | trainable | mean test loss | {' | '.join(names)} | minus {ref} (paired) |",
             "|---|---|---|---|" + "---|" * len(names) + "---|"]
    for m, row in methods.items():
        s = summarize(list(scores[m].values()))
        per = {d: summarize([r["losses"][d] for r in row["runs"].values()]) for d in names}
        diff = paired(scores[m], scores[ref]) if m != ref else None
        trainable = next(iter(row["runs"].values())).get("trainable_params")
        grid = sorted(float(k) for k in row.get("dev_loss_by_lr", {}))
        edge = len(grid) > 1 and row["lr"] in (grid[0], grid[-1])    # tuned lr on the grid's edge: widen the grid
        stats["methods"][m] = {"lr": row["lr"], "lr_at_grid_edge": edge, "mean": s.as_dict(), "per_domain": {d: v.as_dict() for d, v in per.items()},
                               "minus_ref": diff.as_dict() if diff else None}
        lines.append(f"| {m} | {row['lr']:g}{' (grid edge)' if edge else ''} | {trainable} | {fmt(s)} | " + " | ".join(f"{per[d].mean:.4f}" for d in names)
                     + f" | {fmt(diff) if diff else '—'} |")

    def draw(ax):
        ms = list(methods)
        means = [stats["methods"][m]["mean"]["mean"] for m in ms]
        errs = [stats["methods"][m]["mean"]["ci95"] for m in ms]
        ax.bar(range(len(ms)), means, yerr=[0 if e != e else e for e in errs], capsize=4)
        ax.set_xticks(range(len(ms)), ms, rotation=20)
        ax.set_ylim(min(means) * 0.98, max(means) * 1.01)
        ax.set_ylabel("mean test loss over domains (nats/byte)")
        ax.set_title("(a) mixed multi-domain fine-tuning, 95% CI over seeds")
    return lines, stats, draw


def report_b(res: Dict[str, Any]) -> Tuple[List[str], Dict[str, Any], Any]:
    names, target, base = res["domains"], res["target"], res["base_losses"]
    others = [d for d in names if d != target]
    groups: Dict[Tuple[str, int, float], List[Tuple[float, float]]] = {}
    for p in res["points"]:
        gain = base[target] - p["losses"][target]
        forget = sum(p["losses"][d] - base[d] for d in others) / max(1, len(others))
        groups.setdefault((p["method"], p["steps"], p["lr"]), []).append((gain, forget))
    lines = [f"| method | steps | lr | gain on {target} | forgetting on {', '.join(others)} |", "|---|---|---|---|---|"]
    stats: Dict[str, Any] = {"points": []}
    for (m, steps, lr), vals in sorted(groups.items()):
        g, f = summarize([v[0] for v in vals]), summarize([v[1] for v in vals])
        stats["points"].append({"method": m, "steps": steps, "lr": lr, "gain": g.as_dict(), "forgetting": f.as_dict()})
        lines.append(f"| {m} | {steps} | {lr:g} | {fmt(g)} | {fmt(f)} |")

    def draw(ax):
        curves: Dict[Tuple[str, int], List[Tuple[float, float]]] = {}
        for p in stats["points"]:
            curves.setdefault((p["method"], p["steps"]), []).append((p["forgetting"]["mean"], p["gain"]["mean"]))
        for (m, steps), pts in sorted(curves.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{m}, {steps} steps")
        ax.set_xlabel("forgetting: loss increase on other domains")
        ax.set_ylabel(f"gain: loss decrease on {target}")
        ax.set_title("(b) gain vs forgetting over learning rates")
        ax.legend(fontsize=7)
    return lines, stats, draw


def continual_metrics(run: Dict[str, Any], names: List[str]) -> Dict[str, float]:
    """forgetting (mean over earlier domains), new-domain loss and mean final loss of one chain."""
    stages = run["stages"]
    if run["kind"] == "per_domain":     # the oracle: domain d is scored with its own model
        final = {st["domain"]: st["losses"][st["domain"]] for st in stages}
        after_own = dict(final)
    else:
        final = stages[-1]["losses"]
        after_own = {st["domain"]: st["losses"][st["domain"]] for st in stages}
    return {"forgetting": forgetting(after_own, final, names[:-1]), "new": final[names[-1]],
            "mean": domain_mean(final, names)}


def report_c(res: Dict[str, Any]) -> Tuple[List[str], Dict[str, Any], Any]:
    names = res["domains"]
    per = {m: {int(s): continual_metrics(run, names) for s, run in runs.items()} for m, runs in res["methods"].items()}
    plain = "plain_lora" if "plain_lora" in per else next(iter(per))
    lines = [f"| method | forgetting | new-domain loss ({names[-1]}) | mean loss | forgetting / {plain}'s | "
             f"new minus {plain} (paired) | new / {plain}'s - 1 |", "|---|---|---|---|---|---|---|"]
    stats: Dict[str, Any] = {"methods": {}}
    pf = summarize([v["forgetting"] for v in per[plain].values()]).mean
    pn = summarize([v["new"] for v in per[plain].values()]).mean
    for m, seeds in per.items():
        f, n, a = (summarize([v[k] for v in seeds.values()]) for k in ("forgetting", "new", "mean"))
        d = paired({s: v["new"] for s, v in seeds.items()}, {s: v["new"] for s, v in per[plain].items()})
        ratio = f.mean / pf if pf else float("nan")
        rel = n.mean / pn - 1      # the target: forgetting ratio <= 0.25 with |rel| <= 2%
        stats["methods"][m] = {"forgetting": f.as_dict(), "new": n.as_dict(), "mean": a.as_dict(),
                               "forgetting_ratio": ratio, "new_minus_plain": d.as_dict(), "new_relative": rel}
        lines.append(f"| {m} | {fmt(f)} | {fmt(n)} | {fmt(a)} | {ratio:.2f} | {fmt(d)} | {100 * rel:+.2f}% |")

    def draw(ax):
        for m, st in stats["methods"].items():
            ax.scatter(st["forgetting"]["mean"], st["new"]["mean"], label=m)
        ax.set_xlabel("forgetting (loss increase on earlier domains)")
        ax.set_ylabel(f"new-domain loss ({names[-1]})")
        ax.set_title(f"(c) continual {' -> '.join(names)}")
        ax.legend(fontsize=7)
    return lines, stats, draw


def report_d(res: Dict[str, Any]) -> Tuple[List[str], Dict[str, Any], Any]:
    names = res["domains"]
    rows: Dict[str, Dict[int, Dict[str, float]]] = {}
    for s, row in res["seeds"].items():
        for k, v in row.items():
            rows.setdefault(k, {})[int(s)] = v["losses"]
    multi = next((k for k in rows if k.endswith(":multi")), None)
    scores = {k: {s: domain_mean(v, names) for s, v in by.items()} for k, by in rows.items()}
    lines = [f"| model | mean test loss | {' | '.join(names)} | minus {multi} (paired) |",
             "|---|---|" + "---|" * len(names) + "---|"]
    stats: Dict[str, Any] = {"rows": {}}
    for k, by in rows.items():
        s = summarize(list(scores[k].values()))
        diff = paired(scores[k], scores[multi]) if multi and k != multi else None
        stats["rows"][k] = {"mean": s.as_dict(), "minus_multi": diff.as_dict() if diff else None}
        per = " | ".join(f"{summarize([v[d] for v in by.values()]).mean:.4f}" for d in names)
        lines.append(f"| {k} | {fmt(s)} | {per} | {fmt(diff) if diff else '—'} |")

    def draw(ax):
        ks = list(stats["rows"])
        means = [stats["rows"][k]["mean"]["mean"] for k in ks]
        ax.barh(range(len(ks)), means)
        ax.set_yticks(range(len(ks)), ks, fontsize=7)
        ax.set_xlim(min(means) * 0.98, max(means) * 1.01)
        ax.set_xlabel("mean test loss over domains")
        ax.set_title("(d) merged per-domain fine-tunes vs multi-domain training")
    return lines, stats, draw


REPORTS = {"a": report_a, "b": report_b, "c": report_c, "d": report_d}


def write_report(out: Path) -> Path:
    """OUT/report.md, report.png and report.json from OUT/results.json; returns the markdown path."""
    res = json.loads((out / "results.json").read_text())
    lines, stats, draw = REPORTS[res["table"]](res)
    md = out / "report.md"
    md.write_text(f"## Study table ({res['table']})\n\nbase: `{res['base']}`; losses in nats/byte on each domain's "
                  "test split; mean ± std over seeds, CI = 95% t interval.\n\n" + "\n".join(lines) + "\n\n![plot](report.png)\n")
    (out / "report.json").write_text(json.dumps(stats, indent=1) + "\n")
    _plot(out / "report.png", draw)
    return md
