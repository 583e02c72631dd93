"""End-of-run PNG: loss curves and an expert-load heatmap per MoE layer over steps.

    moedist.train.plot.plot_run("runs/tiny/metrics.jsonl", "runs/tiny/plot.png")
"""
from __future__ import annotations

import os
from typing import List, Optional

from moedist.train.metrics import read_metrics


def _ema(values: List[float], alpha: float) -> List[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_run(metrics_path: str, out_path: str, title: Optional[str] = None, records: Optional[List[dict]] = None,
             initial: Optional[dict] = None, val_label: str = "val loss") -> str:
    """Draw `metrics.jsonl` into `out_path` (PNG); returns the path.

    Top panel: training loss (raw and smoothed) and validation losses by step
    (`initial` = validation losses before the first step, drawn at step 0). One
    panel per MoE layer: expert (rows) x step (columns), colour = share of the
    layer's routed pairs that went to that expert.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recs = records if records is not None else read_metrics(metrics_path)
    if not recs:
        raise ValueError(f"{metrics_path}: no metrics to plot")
    steps = [r["step"] for r in recs]
    layers = len(recs[-1].get("expert_load") or [])
    fig, axes = plt.subplots(1 + layers, 1, figsize=(9, 3.2 + 2.0 * layers), squeeze=False,
                             gridspec_kw={"height_ratios": [1.6] + [1.0] * layers})
    ax = axes[0][0]
    initial = initial or {}
    loss = [r["loss"] for r in recs]
    ax.plot(steps, loss, label="train loss (lm + aux)", lw=0.8, alpha=0.45, color="C0")
    if len(recs) >= 10:
        ax.plot(steps, _ema(loss, 2.0 / (1 + max(5, len(recs) // 15))), label="train loss, smoothed", lw=1.8,
                color="C0")
    keys = ["val_loss"] + sorted({k for r in recs for k in r if k.startswith("val_loss_")})
    for i, key in enumerate(keys):
        pts = ([(0, initial[key])] if key in initial else []) + \
              [(r["step"], r[key]) for r in recs if r.get(key) is not None]
        if pts:
            name = val_label if key == "val_loss" else "val loss (" + key[len("val_loss_"):] + ")"
            ax.plot(*zip(*pts), "o-" if i == 0 else "s--", label=name, ms=4, color=f"C{i + 2}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    for l in range(layers):
        ax = axes[1 + l][0]
        load = np.array([r["expert_load"][l] for r in recs]).T  # [E, steps]
        im = ax.imshow(load, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, load.shape[0] - 0.5))
        ax.set_ylabel(f"layer {l}\nexpert")
        ax.set_xlabel("step")
        fig.colorbar(im, ax=ax, label="share of routed pairs")
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
