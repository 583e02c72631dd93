"""Console output of a run, on the main rank only: a rich progress bar, log lines, a summary.

Every other rank gets a `Progress` whose methods do nothing, so the trainer
never asks "am I rank 0?" around a print.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table


BATCH_LAUNCHER_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")


def stdout_console() -> Console:
    """Rich console on stdout; plain text (no live bar, no ANSI escapes) under mpirun/srun.

    Open MPI runs each rank on a pseudo-terminal whose output ends up in a log file, so
    rich would take it for a terminal; under any batch launcher we write plain lines.
    """
    batch = any(v in os.environ for v in BATCH_LAUNCHER_VARS)
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, force_terminal=False if batch else None)


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


class Progress:
    """Progress bar + periodic log lines for `total` steps; silent when `enabled` is False."""

    def __init__(self, total: int, enabled: bool, log_every: int = 10, start: int = 0, title: str = "train",
                 console: Optional[Console] = None, memory: Optional[Callable[[], Optional[float]]] = None):
        """memory: returns this rank's peak memory so far in MiB (`moedist.train.memory.MemoryMeter.peak_mb`)."""
        self.enabled, self.log_every, self.total = enabled, max(1, log_every), total
        self.memory = memory
        self.console = console or stdout_console()
        self._bar = None
        if not enabled:
            return
        self._bar = RichProgress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=True,
                                 disable=not self.console.is_terminal)
        self._task = self._bar.add_task(title, total=total, completed=start, info="")
        self._bar.start()

    def print(self, *args, **kw) -> None:
        if self.enabled:
            self.console.print(*args, **kw)

    def update(self, record: dict) -> None:
        """Advance to `record['step']`; print a log line every `log_every` steps and at the end."""
        if not self.enabled:
            return
        step = record["step"]
        peak = self.memory() if self.memory is not None else None
        mem = f"  mem {_fmt(peak, ',.0f')} MiB" if peak is not None else ""
        info = f"loss {_fmt(record.get('loss'))}  {_fmt(record.get('tokens_per_s'), ',.0f')} tok/s{mem}"
        self._bar.update(self._task, completed=step, info=info)
        if step % self.log_every == 0 or step == self.total or "val_loss" in record:
            val = f"  val {_fmt(record['val_loss'])}" if "val_loss" in record else ""
            moe = (f"  aux {_fmt(record['aux_loss'])}  drop {_fmt(record['dropped_frac'], '.3f')}"
                   if record.get("expert_load") else "")  # a dense model has neither
            self.console.print(
                f"step {step:>5}/{self.total}  loss {_fmt(record['loss'])}{moe}  lr {_fmt(record['lr'], '.2e')}  "
                f"gnorm {_fmt(record.get('grad_norm'), '.3f')}  {_fmt(record['tokens_per_s'], ',.0f')} tok/s{mem}{val}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def load_bar(shares: List[float], width: int = 24) -> str:
    """Expert shares as a one-line block chart, e.g. '▅▇▃▆▄▅▆▂' (one glyph per expert)."""
    glyphs = " ▁▂▃▄▅▆▇█"
    top = max(shares) if shares else 0.0
    if top <= 0:
        return ""
    return "".join(glyphs[min(8, int(round(8 * s / top)))] for s in shares[:width])


def summary_table(summary: dict) -> Table:
    """The one-screen end-of-run summary as a rich table."""
    t = Table(title=f"moedist run '{summary['name']}'", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    rows = [
        ("layout", summary["layout"]),
        ("model", summary["model"]),
        ("steps", f"{summary['steps']}  ({summary['tokens']:,} tokens, {summary['time_s']:.1f} s)"),
        ("loss", f"first {_fmt(summary['first_loss'])}  last {_fmt(summary['last_loss'])}  "
                 f"(lm {_fmt(summary['last_lm_loss'])}, aux {_fmt(summary['last_aux_loss'])})"),
        ("val loss", _fmt(summary.get("val_loss"))),
        ("throughput", f"{_fmt(summary['tokens_per_s'], ',.0f')} tokens/s (mean over steps after the first)"),
        ("dropped", f"{100 * summary['dropped_frac']:.2f}% of routed (token, slot) pairs"),
        ("trainable", f"{summary['trainable_params']:,} of {summary['total_params']:,} parameters"),
    ]
    for kind, got in (summary.get("averages") or {}).items():  # train.ema_decay / swa_start / lawa_k
        rows.append((f"val loss {kind}", f"{_fmt(got.get('val_loss'))}  ({got.get('what')})"))
    if summary.get("peak_mem_mb") is not None:
        per = [p for p in summary.get("peak_mem_mb_per_rank") or [] if p is not None]
        rest = f"  (ranks: min {min(per):,.0f}, max {max(per):,.0f})" if len(per) > 1 else ""
        rows.append(("peak memory", f"{summary['peak_mem_mb']:,.0f} MiB on rank 0{rest}"))
    for l, shares in enumerate(summary.get("expert_load", [])):
        if shares:
            rows.append((f"expert load L{l}", f"{load_bar(shares)}  min {min(shares):.3f} max {max(shares):.3f}"))
    for k in ("metrics", "plot", "checkpoint", "final"):
        if summary.get(k):
            rows.append((k, summary[k]))
    for k, v in rows:
        t.add_row(k, str(v))
    return t
