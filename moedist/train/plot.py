"""End-of-run PNG: loss curves, the learning rate, and an expert-load heatmap per MoE layer,
all on one shared step axis.

    moedist.train.plot.plot_run("runs/tiny/metrics.jsonl", "runs/tiny/plot.png")
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

from moedist.train.metrics import read_metrics


def _ema(values: List[float], alpha: float) -> List[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def step_edges(steps: Sequence[int]) -> List[float]:
    """Cell edges along the step axis that centre each cell on its step.

    Inner edges are the midpoints between neighbouring steps; the outer ones
    extend by half the neighbouring gap (half a step for a single record), so
    steps logged every N draw N-wide cells.
    """
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:])]
    return [steps[0] - (mids[0] - steps[0])] + mids + [steps[-1] + (steps[-1] - mids[-1])]


def step_limits(steps: Sequence[int], initial: bool) -> Tuple[float, float]:
    """x-limits every panel shares: the heatmap cells, and step 0 when an initial evaluation is drawn."""
    edges = step_edges(steps)
    return (min(edges[0], -0.5) if initial else edges[0]), edges[-1]


def build_figure(recs: List[dict], title: str, initial: Optional[dict] = None, val_label: str = "val loss"):
    """The plot as a matplotlib `Figure` (no pyplot state, nothing written).

    Rows: training loss (raw and smoothed) and validation losses (`initial` =
    validation losses before the first step, drawn at step 0); the learning rate
    of each step; one heatmap per MoE layer, expert (rows) x step (columns),
    colour = share of the layer's routed pairs that went to that expert. All
    rows share the x axis; colour bars sit in a column of their own so every
    row spans the same width.
    """
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not recs:
        raise ValueError("no metrics to plot")
    steps = [r["step"] for r in recs]
    layers = len(recs[-1].get("expert_load") or [])
    initial = initial or {}
    fig = Figure(figsize=(9, 4.6 + 2.0 * layers), layout="constrained")
    grid = fig.add_gridspec(2 + layers, 2, width_ratios=[1.0, 0.025], height_ratios=[1.6, 0.7] + [1.0] * layers)
    ax = fig.add_subplot(grid[0, 0])
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
    ax.set_ylabel("loss (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_xlim(*step_limits(steps, any(k in initial for k in keys)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    shared = ax
    ax = fig.add_subplot(grid[1, 0], sharex=shared)
    ax.plot(steps, [r.get("lr", float("nan")) for r in recs], ".-" if len(recs) <= 50 else "-", color="C1",
            lw=1.2, ms=3)
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    edges = step_edges(steps)
    for l in range(layers):
        ax = fig.add_subplot(grid[2 + l, 0], sharex=shared)
        load = np.array([r["expert_load"][l] for r in recs]).T  # [E, steps]
        mesh = ax.pcolormesh(edges, np.arange(load.shape[0] + 1) - 0.5, load, cmap="viridis", shading="flat")
        ax.set_ylabel(f"layer {l}\nexpert")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(mesh, cax=fig.add_subplot(grid[2 + l, 1]), label="share of routed pairs")
    for a in fig.axes:
        if a.get_shared_x_axes().joined(a, shared):
            a.tick_params(labelbottom=True)
    ax.set_xlabel("step")
    return fig


def plot_run(metrics_path: str, out_path: str, title: Optional[str] = None, records: Optional[List[dict]] = None,
             initial: Optional[dict] = None, val_label: str = "val loss") -> str:
    """Draw `metrics.jsonl` (or `records`) into `out_path` (PNG, written atomically); returns the path."""
    recs = records if records is not None else read_metrics(metrics_path)
    if not recs:
        raise ValueError(f"{metrics_path}: no metrics to plot")
    fig = build_figure(recs, title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))), initial,
                       val_label)
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out_path)
    return out_path
