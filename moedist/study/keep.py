"""Finished results of a table kept in the repository, so a table can be spread over machines.

A table's run directory (`runs/study/TABLE`) holds checkpoints (large, not committed) and, per
finished job, the small files that make `run` skip it: a train's `summary.json` and an
evaluation's `study_eval_*.json` (see runner.py). `keep` copies those files, with their paths,
into the table's `kept` directory (configs/study/TABLE.yaml: docs/study/TABLE/kept), together with the table's `results.json` and report; `restore`
(called by `run` first) copies back the ones the run directory lacks. A restored train whose
checkpoint is gone is skipped like any finished one; a job that needs that checkpoint again
(a merge or eval not yet done) fails with one line naming it, and `--set` of a new `out` starts
the table afresh.

    python -m moedist.study keep a        # after (part of) a table ran: commit docs/study/a/
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List

KEPT_NAMES = ("summary.json", "study_eval_*.json")
REPORT_NAMES = ("results.json", "report.md", "report.json", "report.png")


def _result_files(run_dir: Path) -> List[Path]:
    return sorted({p for pat in KEPT_NAMES for p in run_dir.rglob(pat) if p.is_file()})


def keep(run_dir: Path, dest: Path) -> int:
    """Copy the finished jobs' result files of `run_dir` into `dest` (same relative paths) and the
    table's report files beside `dest`; returns how many result files were copied."""
    files = _result_files(run_dir)
    for p in files:
        target = dest / p.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    for name in REPORT_NAMES:
        if (run_dir / name).is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / name, dest.parent / name)
    return len(files)


def restore(dest: Path, run_dir: Path) -> int:
    """Copy kept result files that `run_dir` lacks back into it; returns how many."""
    if not dest.is_dir():
        return 0
    n = 0
    for p in _result_files(dest):
        target = run_dir / p.relative_to(dest)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)
            n += 1
    return n
