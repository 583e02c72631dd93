"""Refuse pickled files before anything reads a directory a user handed us.

    refuse_pickles(path, "train.resume")   # ConfigError (one line, exit 2) if path holds a pickle

moedist never unpickles: weights come from safetensors only. A directory (or
file) given to `train.resume`, `model.from_hf`, `convert`, `merge`, `extract`,
`eval` or `generate` that holds PyTorch pickles (``*.pt``, ``*.pth``, ``*.bin``,
``*.pkl``, ``*.ckpt``) is refused as a whole, before any file in it is opened,
so a planted pickle can never run code through any library we call either.
"""
from __future__ import annotations

import os
from typing import List

from moedist.config_yaml import ConfigError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def pickle_files(path: str, max_depth: int = 3) -> List[str]:
    """Pickle-suffixed files under `path` (itself, or up to `max_depth` folder levels), sorted."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path] if path.lower().endswith(PICKLE_SUFFIXES) else []
    found = []
    base = path.rstrip(os.sep).count(os.sep)
    for root, dirs, files in os.walk(path):
        if root.count(os.sep) - base >= max_depth:
            dirs[:] = []
        found += [os.path.join(root, f) for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    return sorted(found)


def refuse_pickles(path: str, what: str) -> None:
    """Raise `ConfigError` naming the first pickle file under `path` (`what` names the key or argument)."""
    found = pickle_files(path)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ConfigError(f"{what}={path!r}: holds pickle file {found[0]}{more}; moedist never unpickles "
                          "(code could run on load): convert it to safetensors first")
