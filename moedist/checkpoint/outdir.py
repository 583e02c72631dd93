"""One output-directory rule for every command (issue 17).

* `moedist train` into a `train.output_dir` that holds another run's results (config.yaml,
  metrics.jsonl, summary.json, checkpoints/, final/) stops with one line, unless
  `train.resume=auto` (or a checkpoint inside it) continues that run, or `--overwrite`
  deletes it first.
* `convert`, `merge` and `extract` refuse an OUT that exists and is not an empty directory,
  unless `--overwrite` deletes it first.
* Files are written with the process umask (`moedist.config.chmod_umask` for temp files).

    problem = run_dir_conflict(output_dir, resume)   # None, or the one-line reason
    clear_dir(path)                                  # --overwrite: delete what is there
    check_out(path, overwrite, "OUT")                # converters: ValueError unless usable
"""
from __future__ import annotations

import os
import shutil
from typing import List, Optional

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "final")


def run_results(path: str) -> List[str]:
    """The entries of `path` that mark a moedist run's results (empty when it is not a run directory)."""
    if not os.path.isdir(path):
        return []
    return [name for name in RUN_MARKERS if os.path.exists(os.path.join(path, name))]


def run_dir_conflict(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """Why `moedist train` may not write into `output_dir` (another run's results), or None."""
    found = run_results(output_dir)
    if not found:
        return None
    if resume == "auto":
        return None  # continues that run (or starts it over when it never saved a checkpoint)
    if resume is not None:
        inside = os.path.abspath(resume).rstrip(os.sep)
        if inside == os.path.abspath(output_dir) or inside.startswith(os.path.abspath(output_dir) + os.sep):
            return None  # one of its own checkpoints
    return (f"train.output_dir={output_dir!r}: holds another run's results ({', '.join(found)}); continue it with "
            "train.resume=auto, delete it with --overwrite, or choose another train.output_dir")


def clear_dir(path: str) -> None:
    """Delete everything in `path` (a file at `path` is deleted); the directory itself stays."""
    if os.path.isfile(path) or os.path.islink(path):
        os.unlink(path)
        return
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)


def check_out(path: str, overwrite: bool, label: str = "OUT", clear: bool = True) -> None:
    """For converters: ValueError (one line) when `path` exists and is not an empty directory, unless
    `overwrite`, which deletes its contents when `clear` (the writer then renames the result into place)."""
    if not os.path.lexists(path):
        return
    empty = os.path.isdir(path) and not os.listdir(path)
    if empty:
        return
    if not overwrite:
        raise ValueError(f"{label}={path}: already exists and is not an empty directory; choose a new path or "
                         "pass --overwrite to replace it")
    if clear:
        clear_dir(path)
