"""End-of-run PNG: loss curves and an expert-load heatmap per MoE layer over steps.

    moedist.train.plot.plot_run("runs/tiny/metrics.jsonl", "runs/tiny/plot.png")
"""
from __future__ import annotations

import os
from typing import List, Optional

from moedist.train.metrics import read_metrics


def plot_run(metrics_path: str, out_path: str, title: Optional[str] = None, records: Optional[List[dict]] = None) -> str:
    """Draw `metrics.jsonl` into `out_path` (PNG); returns the path.

    Top panel: training loss (total and LM) and validation loss by step. One
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
    ax.plot(steps, [r["loss"] for r in recs], label="train loss (lm + aux)", lw=1.5)
    ax.plot(steps, [r["lm_loss"] for r in recs], label="train lm loss", lw=1.0, alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", ms=4)
    for key in sorted({k for r in recs for k in r if k.startswith("val_loss_")}):
        pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
        ax.plot(*zip(*pts), "s--", label=key.replace("_", " "), ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
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
