"""PNG plots of `bench layer` results: ratios for one run, cost curves for a sweep."""
from __future__ import annotations

import os
from typing import List

COLORS = {"moedist": "#1f77b4", "deepspeed": "#d62728", "fairscale": "#9467bd", "dense": "#7f7f7f",
          "floor": "#2ca02c", "moedist-lora": "#17becf", "dense-lora": "#bcbd22"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(r: dict) -> str:
    name = r["impl"] if r["mode"] == "-" else f"{r['impl']}\n{r['mode']}"
    return f"{name}\n{r['ffn']}" if r.get("ffn") else name


def plot_layer(res: dict, path: str) -> str:
    """Bars of fwd+bwd time (wall and CPU) and memory, each divided by the dense FFN's
    (or, for the LoRA rows, by dense-lora's; without a dense row, by the first row)."""
    plt = _pyplot()
    rows: List[dict] = res["results"]
    ref = next((r for r in rows if r["impl"] == "dense"), None) or rows[0]

    def base(r):  # the reference of the same expert FFN (plain | recompute)
        want = "dense-lora" if r["impl"].endswith("lora") else "dense"
        return next((q for q in rows if q["impl"] == want and q.get("ffn") == r.get("ffn")), ref)

    metrics = [("fwd_bwd_ms", "fwd+bwd time (wall)"), ("fwd_bwd_cpu_ms", "fwd+bwd time (CPU)"),
               ("act_mem_mb", "memory after forward"), ("peak_mem_mb", "peak memory")]
    metrics = [m for m in metrics if all(r.get(m[0]) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2), squeeze=False)
    labels = [_label(r) for r in rows]
    colors = [COLORS.get(r["impl"], "#333333") for r in rows]
    for ax, (key, title) in zip(axes[0], metrics):
        vals = [r[key] / base(r)[key] if base(r)[key] else 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{title}\n/ {'dense FFN' if ref['impl'] == 'dense' else ref['impl']}", fontsize=9)
    c = res["config"]
    fig.suptitle(f"MoE layer T={c['tokens']} H={c['hidden']} F={c['ffn']} E={c['experts']} top-{c['topk']} "
                 f"cf={c['capacity_factor']} {c['dtype']} skew={res['routing']['load_max_over_mean']:.1f} "
                 f"({res['environment']['device']})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(res: dict, path: str) -> str:
    """fwd+bwd time against tokens (at fixed E) and against experts (at fixed T), per impl/mode,
    plus the same divided by the dense FFN."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (which, xkey) in enumerate((("tokens", "tokens"), ("experts", "experts"))):
        rows = [r for r in res["results"] if r.get("sweep") == which]
        keys = sorted({(r["impl"], r["mode"], r.get("ffn") or "") for r in rows})
        for impl, mode, ffn in keys:
            dense = {r[xkey]: r for r in rows if r["impl"] == "dense" and (r.get("ffn") or "") == ffn}
            pts = sorted(((r[xkey], r) for r in rows if (r["impl"], r["mode"], r.get("ffn") or "") == (impl, mode, ffn)),
                         key=lambda p: p[0])
            xs = [p[0] for p in pts]
            label = (impl if mode == "-" else f"{impl}/{mode}") + (f" ({ffn})" if ffn else "")
            style = dict(color=COLORS.get(impl, "#333333"), marker="o" if ffn != "plain" else "s",
                         ls="-" if mode in ("capacity", "-") else "--")
            axes[0][col].plot(xs, [p[1]["fwd_bwd_ms"] for p in pts], label=label, **style)
            if dense:
                axes[1][col].plot(xs, [p[1]["fwd_bwd_ms"] / dense[x]["fwd_bwd_ms"] for x, p in zip(xs, pts) if x in dense],
                                  label=label, **style)
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xlabel(xkey)
            axes[row][col].grid(alpha=0.3)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("fwd+bwd ms (median, wall)")
        axes[1][col].set_ylabel("fwd+bwd time / dense FFN")
        axes[1][col].axhline(1.0, color="black", lw=0.8, ls="--")
        c = res["config"]
        fixed = f"E={c['experts']}" if which == "tokens" else f"T={c['tokens']}"
        axes[0][col].set_title(f"cost vs {which} ({fixed}, H={c['hidden']}, F={c['ffn']}, top-{c['topk']})", fontsize=9)
        axes[0][col].legend(fontsize=7)
    fits = res.get("fits", {})
    if fits:
        txt = "  ".join(f"{k}: R²={v['r2']:.3f}" for k, v in fits.items())
        fig.text(0.5, 0.005, f"linear fit of time vs tokens: {txt}", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
