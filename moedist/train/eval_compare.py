"""Several models side by side: a markdown table and a grouped bar chart of validation loss per domain.

    rows = [{"model": "runs/a", "val_loss": 1.2, "val_loss_code": 1.1, ...}, ...]
    text = markdown_table(rows)                   # rows = models, columns = overall then each domain
    write_text_atomic("cmp.md", text)
    plot_comparison(rows, "cmp.png")             # one group per column, one bar per model (matplotlib, Agg)

Used by `moedist eval A B C --table T.md --plot P.png` and by `moedist merge --method ...`.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional


def loss_columns(rows: List[Dict]) -> List[str]:
    """`val_loss` first, then every `val_loss_<name>` in order of first appearance."""
    cols = ["val_loss"]
    for row in rows:
        cols += [k for k in row if k.startswith("val_loss_") and k not in cols]
    return cols


def _label(col: str) -> str:
    return "overall" if col == "val_loss" else col[len("val_loss_"):]


def markdown_table(rows: List[Dict], digits: int = 4) -> str:
    """Rows = models (the `model` field), columns = val_loss overall and per domain; '-' where missing.
    The best (lowest) value of each column is bold."""
    cols = loss_columns(rows)
    best = {c: min((r[c] for r in rows if r.get(c) is not None), default=None) for c in cols}
    head = "| model | " + " | ".join(_label(c) for c in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    lines = [head, rule]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            text = "-" if v is None else f"{v:.{digits}f}"
            cells.append(f"**{text}**" if v is not None and v == best[c] and len(rows) > 1 else text)
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def plot_comparison(rows: List[Dict], path: str, title: Optional[str] = None) -> str:
    """A grouped bar chart (x = overall and each domain, one bar per model) saved as PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = loss_columns(rows)
    n = len(rows)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(cols) * max(1, n) * 0.5 + 2), 3.6))
    for i, r in enumerate(rows):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(cols))]
        ys = [r.get(c) if r.get(c) is not None else 0.0 for c in cols]
        ax.bar(xs, ys, width=width, label=str(r["model"]))
    ax.set_xticks(range(len(cols)), [_label(c) for c in cols])
    ax.set_ylabel("validation loss (nats/token)")
    lows = [r[c] for r in rows for c in cols if r.get(c) is not None]
    if lows:  # zoom on the differences: bars start a little below the smallest value
        ax.set_ylim(max(0.0, min(lows) * 0.9), max(lows) * 1.03)
    ax.set_title(title or "validation loss per domain")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
