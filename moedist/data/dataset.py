"""Training and validation sequences of named sources, read by global position.

    data = build_data(cfg)                      # tokenizes (cached) every cfg.data.sources entry
    batch = data.train_micro(position, count)   # Batch of `count` sequences from global position
    batch = data.val_micro("sft", index, count) # fixed validation micro-batch of one source

Sequences of one source (S = data.seq_len):

* ``pack: true``  the source's documents are one token stream; sequence k is the
  window ``tokens[k*S : k*S+S+1]`` (windows share their boundary token). Labels
  never cross a document boundary and honour the loss mask; ``position_ids``
  restart at 0 at every document start; ``segment_ids`` number the documents of
  the row. A trailing partial window is dropped.
* ``pack: false`` sequence k is document k, truncated to S+1 ids and right-padded
  with the tokenizer's pad id (never counted).

Split: sequences are grouped into blocks of :data:`BLOCK` neighbours and whole
blocks go to validation (seeded by data.seed and the source name).

Mixture: one epoch has N = all training sequences of all sources; source s gives
c_s = round(w_s / sum(w) * N) (at least 1) sequences, taken in turn from its own
endless stream of seeded per-source epochs, and the epoch's list is shuffled.
Position p is sequence p % num_train of epoch p // num_train, so the order does
not depend on the world size and a run resumes at a position exactly. Memory is
O(sequences): the token arrays stay memory-mapped.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from moedist.config_yaml import ConfigError
from moedist.data.batch import IGNORE, Batch
from moedist.data.cache import SourceCache, build_caches
from moedist.data.formats import source_label
from moedist.data.tokenizer import Tokenizer, resolve_tokenizer

BLOCK = 8             # neighbouring sequences that go to train or validation together
_SPLIT, _SOURCE_EPOCH, _MIX_EPOCH = 1, 2, 3   # seed streams, so that they never coincide

Row = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]  # input, labels, pos, seg [S]


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


class SourceSequences:
    """The sequences of one cached source: packed windows or single padded documents."""

    def __init__(self, cache: SourceCache, seq_len: int, pack: bool, pad_id: int):
        self.cache, self.seq_len, self.pack, self.pad_id = cache, seq_len, pack, pad_id
        total = cache.num_tokens
        self.n = ((total - 1) // seq_len if total > 1 else 0) if pack else cache.num_docs

    def row(self, k: int) -> Row:
        """Sequence k as (input_ids [S], labels [S], position_ids [S] | None, segment_ids [S] | None)."""
        return self._packed(k) if self.pack else self._padded(k)

    def _packed(self, k: int) -> Row:
        S, c = self.seq_len, self.cache
        a = k * S
        idx = np.arange(a, a + S + 1)                                        # [S+1] token indices
        w = c.read("tokens", a, a + S + 1).astype(np.int64)                 # [S+1]
        counted = c.read("mask", a + 1, a + S + 1).astype(bool)             # [S] mask of the label tokens
        doc = np.searchsorted(c.doc_offsets, idx, side="right") - 1          # [S+1] document of each token
        labels = np.where(counted & (doc[1:] == doc[:-1]), w[1:], IGNORE)    # never across documents
        positions = idx[:-1] - np.asarray(c.doc_offsets[doc[:-1]])           # offset inside its document
        return w[:-1], labels, positions, doc[:-1] - doc[0]

    def _padded(self, k: int) -> Row:
        S, c = self.seq_len, self.cache
        a = int(c.doc_offsets[k])
        b = min(int(c.doc_offsets[k + 1]), a + S + 1)
        w = np.full(S + 1, self.pad_id, dtype=np.int64)                     # [S+1]
        w[:b - a] = c.read("tokens", a, b)
        counted = np.zeros(S + 1, dtype=bool)
        counted[:b - a] = c.read("mask", a, b).astype(bool)                 # padding is never counted
        return w[:-1], np.where(counted[1:], w[1:], IGNORE), None, None


def split_blocks(n: int, val_fraction: float, seed: int, name: str, label: str, what: str
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids) of n sequences: whole blocks of BLOCK neighbours go to validation.

    Raises:
        ConfigError: fewer than two blocks (one for training, one for validation).
    """
    n_blocks = n // BLOCK
    if n_blocks < 2:
        raise ConfigError(f"{label}: gives {n} sequences {what}; needs at least {2 * BLOCK} (one block of "
                          f"{BLOCK} for training and one for validation); add data or lower data.seq_len")
    n_val = min(n_blocks - 1, max(1, round(val_fraction * n_blocks)))
    val_blocks = _rng(seed, _name_seed(name), _SPLIT).permutation(n_blocks)[:n_val]
    is_val = np.zeros(n, dtype=bool)
    for b in val_blocks:
        is_val[b * BLOCK:(b + 1) * BLOCK] = True
    ids = np.arange(n, dtype=np.int64)
    return ids[~is_val], ids[is_val]


@dataclass
class _Source:
    name: str
    weight: float
    seqs: SourceSequences
    train: np.ndarray           # [n_train] sequence ids
    val: np.ndarray             # [n_val] sequence ids
    share: int = 0              # c_s: training sequences per mixture epoch


class TokenData:
    """Train/validation sequences of the named sources; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, seed: int, sources: List[_Source]):
        self.tokenizer, self.seq_len, self.seed, self.sources = tokenizer, seq_len, seed, sources
        total = sum(len(s.train) for s in sources)
        wsum = sum(s.weight for s in sources)
        for s in sources:
            s.share = max(1, round(s.weight / wsum * total))
        self._by_name = {s.name: s for s in sources}
        self._epoch: Optional[Tuple[int, np.ndarray, np.ndarray]] = None   # the current epoch's order

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.sources]

    @property
    def num_train(self) -> int:
        """Training sequences per mixture epoch (sum of the sources' shares)."""
        return sum(s.share for s in self.sources)

    @property
    def stats(self) -> Dict[str, Dict[str, int]]:
        return {s.name: {"documents": s.seqs.cache.num_docs, "tokens": s.seqs.cache.num_tokens,
                         "loss_tokens": int(s.seqs.cache.meta["loss_tokens"]), "train_sequences": len(s.train),
                         "val_sequences": len(s.val)} for s in self.sources}

    @property
    def cache_paths(self) -> Dict[str, str]:
        return {s.name: s.seqs.cache.path for s in self.sources}

    def num_val(self, name: str) -> int:
        return len(self._source(name).val)

    def _source(self, name: str) -> _Source:
        if name not in self._by_name:
            raise KeyError(f"unknown data source {name!r} (sources: {', '.join(self.names)})")
        return self._by_name[name]

    def _source_stream(self, s: _Source, start: int, count: int) -> np.ndarray:
        """Items [start, start+count) of source s's endless stream of seeded epochs of its training ids."""
        n, out = len(s.train), []
        p = start
        while p < start + count:
            q, off = divmod(p, n)
            take = min(n - off, start + count - p)
            perm = _rng(self.seed, _name_seed(s.name), _SOURCE_EPOCH, q).permutation(n)
            out.append(s.train[perm[off:off + take]])
            p += take
        return np.concatenate(out)

    def _epoch_order(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(source index [num_train], sequence id [num_train]) of a mixture epoch, shuffled."""
        if self._epoch is None or self._epoch[0] != epoch:
            src = np.concatenate([np.full(s.share, i, dtype=np.int32) for i, s in enumerate(self.sources)])
            seq = np.concatenate([self._source_stream(s, epoch * s.share, s.share) for s in self.sources])
            perm = _rng(self.seed, _MIX_EPOCH, epoch).permutation(len(src))
            self._epoch = (epoch, src[perm], seq[perm])
        return self._epoch[1], self._epoch[2]

    def train_pairs(self, position: int, count: int) -> List[Tuple[int, int]]:
        """(source index, sequence id) of global positions [position, position + count)."""
        if position < 0 or count < 0:
            raise ValueError(f"position={position}, count={count}: must be >= 0")
        out, n, p = [], self.num_train, position
        while p < position + count:
            epoch, off = divmod(p, n)
            take = min(n - off, position + count - p)
            src, seq = self._epoch_order(epoch)
            out += zip(src[off:off + take].tolist(), seq[off:off + take].tolist())
            p += take
        return out

    def train_micro(self, position: int, count: int) -> Batch:
        """The training sequences at global positions [position, position + count): Batch [count, S]."""
        pairs = self.train_pairs(position, count)
        return self._batch([self.sources[i].seqs.row(k) for i, k in pairs], [i for i, _ in pairs])

    def val_micro(self, name: str, index: int, count: int) -> Batch:
        """Fixed validation micro-batch ``index`` of a source (wraps around its validation sequences)."""
        s = self._source(name)
        ids = (np.arange(count) + index * count) % len(s.val)
        return self._batch([s.seqs.row(int(k)) for k in s.val[ids]], [self.names.index(name)] * count)

    @staticmethod
    def _batch(rows: List[Row], domains: List[int]) -> Batch:
        """Rows [S] and their source indices -> Batch [B, S] with domain_ids [B]."""
        stack = (lambda j: None if not rows or rows[0][j] is None
                 else torch.from_numpy(np.stack([r[j] for r in rows]).astype(np.int64)))
        return Batch(stack(0), stack(1), stack(2), stack(3), torch.tensor(domains, dtype=torch.int64))


def build_data(cfg: Any, tokenizer: Optional[Tokenizer] = None, progress: bool = False) -> TokenData:
    """Tokenize (or open the cache of) every ``cfg.data.sources`` entry and split it into sequences.

    Args:
        cfg: the full :class:`~moedist.config.MoedistConfig`.
        tokenizer: default ``resolve_tokenizer(cfg.data.tokenizer, cfg.model.from_hf)``.
        progress: rich progress bar on stderr while tokenizing.

    Raises:
        ConfigError: no sources, bad input, or a source too small for a train and a validation block.
    """
    d = cfg.data
    if not d.sources:
        raise ConfigError("data.sources is empty: list at least one source {name, path, format} "
                          "(`moedist data prepare` reads only data.sources)")
    if tokenizer is None:
        from moedist.train.init_from import model_dir  # model.from_hf, or model.init_from's checkpoint

        tokenizer = resolve_tokenizer(d.tokenizer, model_dir(cfg))
    tok = tokenizer
    caches = build_caches(d.sources, tok, d.cache_dir, progress=progress)
    sources = []
    for i, (src, cache) in enumerate(zip(d.sources, caches)):
        seqs = SourceSequences(cache, d.seq_len, d.pack, tok.pad_id)
        what = (f"of data.seq_len={d.seq_len} from {cache.num_tokens} tokens" if d.pack
                else "(one per document, data.pack=false)")
        train, val = split_blocks(seqs.n, d.val_fraction, d.seed, src["name"], source_label(i, src), what)
        sources.append(_Source(src["name"], float(src.get("weight", 1.0)), seqs, train, val))
    return TokenData(tok, d.seq_len, d.seed, sources)
