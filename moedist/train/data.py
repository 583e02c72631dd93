"""Byte-level language-modelling data from real text that ships with Python.

    data = ByteLMData.from_config(cfg.data)          # train/val chunks of seq_len + 1 bytes
    x_BS, y_BS = data.train_batch(position, count)   # `count` sequences from global position

Sources (config key ``data.source``):

* ``pydoc``  -- English prose: every topic of ``pydoc_data.topics`` (about 470 KB).
* ``stdlib`` -- Python code: the standard library's top-level ``.py`` files in
  sorted order, capped at :data:`STDLIB_MAX_BYTES`.
* ``file``   -- any UTF-8 text file at ``data.path``.

Tokens are raw bytes (vocabulary 256). The text is cut into non-overlapping
windows of ``seq_len + 1`` bytes; input = window[:-1], labels = window[1:].
Windows are grouped into blocks of :data:`BLOCK` neighbours and whole blocks
go to validation (seeded), so validation text is not the neighbour of a
training window.

Positions: the training stream is an endless sequence of epochs, each a seeded
permutation of the training windows. Global position ``p`` (sequences consumed
so far, across all ranks) names one window, so a run saved after ``p``
sequences resumes exactly there, at any world size.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch

from moedist.data.batch import Batch

STDLIB_MAX_BYTES = 2_000_000
BLOCK = 8  # windows per train/val split block


@lru_cache(maxsize=8)
def load_text(source: str, path: str | None = None) -> bytes:
    """The raw bytes of a data source (deterministic for a given Python installation)."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        return "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    if source == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        out, total = [], 0
        for name in sorted(os.listdir(root)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(root, name), "rb") as fh:
                blob = fh.read()
            out.append(blob)
            total += len(blob)
            if total >= STDLIB_MAX_BYTES:
                break
        return b"".join(out)[:STDLIB_MAX_BYTES]
    if source == "file":
        if path is None:
            raise ValueError("data.path=null: must be set when data.source='file'")
        with open(path, "rb") as fh:
            return fh.read()
    raise ValueError(f"data.source={source!r}: allowed pydoc, stdlib, file")


@dataclass
class ByteLMData:
    """Train/validation windows of one text, as int64 tensors [n, seq_len + 1]."""

    train: torch.Tensor
    val: torch.Tensor
    seq_len: int
    seed: int
    source: str = ""

    @classmethod
    def from_config(cls, data_cfg) -> "ByteLMData":
        return cls.build(load_text(data_cfg.source, data_cfg.path), data_cfg.seq_len, data_cfg.val_fraction,
                         data_cfg.seed, data_cfg.source)

    @classmethod
    def build(cls, text: bytes, seq_len: int, val_fraction: float, seed: int, source: str = "") -> "ByteLMData":
        W = seq_len + 1
        n = (len(text) - 1) // seq_len  # windows share their boundary byte: stride seq_len
        if n < 2 * BLOCK:
            raise ValueError(f"data: {len(text)} bytes give only {n} windows of data.seq_len={seq_len}; "
                             f"need at least {2 * BLOCK}")
        tokens = torch.frombuffer(bytearray(text[: n * seq_len + 1]), dtype=torch.uint8).long()  # [n*S+1]
        windows = tokens.unfold(0, W, seq_len)  # [n, S+1]
        nblocks = n // BLOCK
        g = torch.Generator().manual_seed(seed * 2654435761 % (2**63) + 17)
        order = torch.randperm(nblocks, generator=g)
        n_val = max(1, round(val_fraction * nblocks))
        is_val = torch.zeros(n, dtype=torch.bool)
        for b in order[:n_val].tolist():
            is_val[b * BLOCK:(b + 1) * BLOCK] = True
        return cls(windows[~is_val].contiguous(), windows[is_val].contiguous(), seq_len, seed, source)

    @property
    def num_train(self) -> int:
        return self.train.shape[0]

    @property
    def num_val(self) -> int:
        return self.val.shape[0]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        cached = self.__dict__.get("_order")
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.__dict__["_order"] = cached = (epoch, torch.randperm(self.num_train, generator=g))
        return cached[1]

    def train_indices(self, position: int, count: int) -> torch.Tensor:
        """Window ids of global positions [position, position + count) of the training stream."""
        out, n = [], self.num_train
        p = position
        while p < position + count:
            epoch, offset = divmod(p, n)
            take = min(n - offset, position + count - p)
            out.append(self._epoch_order(epoch)[offset:offset + take])
            p += take
        return torch.cat(out)

    def train_batch(self, position: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(input [count, S], labels [count, S]) for global positions [position, position + count)."""
        w = self.train.index_select(0, self.train_indices(position, count))  # [count, S+1]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def train_micro(self, position: int, count: int) -> Batch:
        """`train_batch` as a `Batch` (the trainer's form; one document per row, all tokens count)."""
        return Batch(*self.train_batch(position, count))

    def val_micro(self, name: Optional[str], index: int, count: int) -> Batch:
        """`val_batch` as a `Batch`; one source, so `name` is ignored."""
        return Batch(*self.val_batch(index, count))

    def val_batch(self, index: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Validation micro-batch `index` (fixed, wraps around the validation windows)."""
        ids = (torch.arange(count) + index * count) % self.num_val
        w = self.val.index_select(0, ids)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def micro_batch_position(step_position: int, rank: int, accum: int, grad_accum: int, micro_batch_size: int) -> int:
    """Global position of micro-batch `accum` of `rank` inside a step that starts at `step_position`.

    A step consumes world * grad_accum * micro_batch_size sequences; rank r takes the
    contiguous run of its grad_accum micro-batches. The set of micro-batches of a step
    is therefore the same for every (world, grad_accum) with equal product.
    """
    return step_position + (rank * grad_accum + accum) * micro_batch_size
