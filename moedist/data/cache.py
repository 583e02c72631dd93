"""Tokenized sources as memory-mapped arrays on disk, keyed by what produced them.

    caches = build_caches(cfg.data.sources, tok, cfg.data.cache_dir, progress=True)
    c = caches[0]
    c.tokens[c.doc_offsets[d]:c.doc_offsets[d + 1]]     # ids of document d (uint32, memory-mapped)

Layout of one source, ``<cache_dir>/<key>/``::

    tokens.npy       [T] uint32   every document's ids, concatenated
    mask.npy         [T] uint8    1 = counted in the loss
    doc_offsets.npy  [D+1] int64  document d is [doc_offsets[d], doc_offsets[d+1])
    meta.json        documents, tokens, loss_tokens, files, format, tokenizer

``key`` = sha256 of the files (paths relative to the source path and a hash of
their contents), the tokenizer fingerprint, the format, text_field and
:data:`FORMAT_VERSION`. Packing and seq_len are applied when reading, so they
are not part of the key.

Writes are atomic: every source is built in a temp dir next to its target and
renamed only when all sources were read without error; an existing target
(another rank got there first) wins and ours is discarded. On error nothing is
left behind.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from array import array
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from moedist.data.formats import FORMAT_VERSION, check_format, read_documents, source_files, source_label
from moedist.data.tokenizer import Tokenizer

FILES = ("tokens.npy", "mask.npy", "doc_offsets.npy", "meta.json")
FLUSH_TOKENS = 1 << 20      # buffered tokens before a write to the temp files
COPY_CHUNK = 1 << 24        # elements copied at a time from a raw temp file into its .npy


@dataclass
class SourceCache:
    """One source's tokenized documents, memory-mapped (read-only)."""

    path: str
    tokens: np.ndarray        # [T] uint32
    mask: np.ndarray          # [T] uint8
    doc_offsets: np.ndarray   # [D+1] int64
    meta: Dict[str, Any]

    def __post_init__(self):
        self._fds: Dict[str, int] = {}

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the `tokens` or `mask` array, read with os.pread.

        Reading through the memory map would leave every page it touched resident: over a
        long run the process RSS would grow towards the size of the corpus (measured:
        `moedist bench data`). A plain read copies just the bytes asked for.
        """
        arr = getattr(self, name)  # np.memmap: .filename, .offset (the .npy header size), .dtype
        start, stop = max(0, start), min(len(arr), stop)
        if stop <= start:
            return np.empty(0, dtype=arr.dtype)
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(arr.filename, os.O_RDONLY)
        size = arr.dtype.itemsize
        buf = os.pread(fd, (stop - start) * size, arr.offset + start * size)
        return np.frombuffer(buf, dtype=arr.dtype)

    def __del__(self):
        for fd in self.__dict__.get("_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])


def open_cache(path: str) -> SourceCache:
    """Open a finished cache directory without reading the token arrays into memory."""
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    load = (lambda name: np.load(os.path.join(path, name), mmap_mode="r", allow_pickle=False))
    return SourceCache(path, load("tokens.npy"), load("mask.npy"), load("doc_offsets.npy"), meta)


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read 1 MiB at a time (cache keys, checkpoint manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_key(source: Mapping[str, Any], tok: Tokenizer, index: int = 0) -> str:
    """The cache key of a source: changes when a file, the tokenizer or the format settings change."""
    label = source_label(index, source)
    root = os.path.expanduser(source["path"])
    base = root if os.path.isdir(root) else os.path.dirname(os.path.abspath(root))
    files = [[os.path.relpath(path, base), file_sha256(path)] for path, _ in source_files(source, label)]
    what = {"version": FORMAT_VERSION, "format": check_format(source, label),
            "text_field": source.get("text_field", "text"), "tokenizer": tok.fingerprint(), "files": files}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


class _Writer:
    """Appends documents to raw temp files, then turns them into the .npy files of the layout."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.offsets = array("q", [0])             # [D+1], 8 bytes per document
        self.loss_tokens = 0
        self.ids: List[int] = []
        self.mask: List[int] = []
        self.fh_ids = open(os.path.join(out_dir, "tokens.bin"), "wb")
        self.fh_mask = open(os.path.join(out_dir, "mask.bin"), "wb")

    def add(self, ids: Sequence[int], mask: Sequence[int]) -> None:
        if not ids:
            return                                  # an empty document adds nothing to learn from
        self.ids.extend(ids)
        self.mask.extend(mask)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.loss_tokens += sum(mask)
        if len(self.ids) >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        np.asarray(self.ids, dtype=np.uint32).tofile(self.fh_ids)
        np.asarray(self.mask, dtype=np.uint8).tofile(self.fh_mask)
        self.ids, self.mask = [], []

    def finish(self, meta: Dict[str, Any]) -> None:
        self._flush()
        self.fh_ids.close()
        self.fh_mask.close()
        total = self.offsets[-1]
        for raw, name, dtype in (("tokens.bin", "tokens.npy", np.uint32), ("mask.bin", "mask.npy", np.uint8)):
            _raw_to_npy(os.path.join(self.out_dir, raw), os.path.join(self.out_dir, name), dtype, total)
        np.save(os.path.join(self.out_dir, "doc_offsets.npy"), np.frombuffer(self.offsets, dtype=np.int64))
        meta = dict(meta, documents=len(self.offsets) - 1, tokens=int(total), loss_tokens=int(self.loss_tokens))
        with open(os.path.join(self.out_dir, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)

    def close(self) -> None:
        self.fh_ids.close()
        self.fh_mask.close()


def _raw_to_npy(raw: str, out: str, dtype, n: int) -> None:
    """Copy a raw file of n elements into a .npy file chunk by chunk (memory stays flat)."""
    dst = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=(n,))
    if n:
        src = np.memmap(raw, dtype=dtype, mode="r", shape=(n,))
        for a in range(0, n, COPY_CHUNK):
            dst[a:a + COPY_CHUNK] = src[a:a + COPY_CHUNK]
        del src
    dst.flush()
    del dst
    os.remove(raw)


def _build_one(source: Mapping[str, Any], tok: Tokenizer, index: int, tmp: str, progress) -> None:
    label = source_label(index, source)
    files = source_files(source, label)
    task = None
    if progress is not None:
        total = sum(os.path.getsize(p) for p, _ in files)
        task = progress.add_task(f"tokenizing {source['name']}", total=max(total, 1))
    writer = _Writer(tmp)
    try:
        advance = (None if task is None else (lambda path: progress.advance(task, os.path.getsize(path))))
        for ids, mask in read_documents(source, tok, index, on_file=advance):
            writer.add(ids, mask)
        writer.finish({"name": source["name"], "format": source["format"],
                       "text_field": source.get("text_field", "text"), "tokenizer": tok.fingerprint(),
                       "files": [shown for _, shown in files], "version": FORMAT_VERSION})
    finally:
        writer.close()


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)   # erased: errors and the summary stay alone


def build_caches(sources: Sequence[Mapping[str, Any]], tok: Tokenizer, cache_dir: str,
                 progress: bool = False) -> List[SourceCache]:
    """Tokenize every source not cached yet and open all of them.

    Args:
        sources: ``cfg.data.sources``.
        tok: the tokenizer.
        cache_dir: ``cfg.data.cache_dir`` (``~`` is expanded).
        progress: show a rich progress bar on stderr while tokenizing.

    Returns:
        One :class:`SourceCache` per source, in order.

    Raises:
        ConfigError: bad input in any source; then no cache directory is left behind.
    """
    root = os.path.expanduser(cache_dir)
    keys = [source_key(src, tok, i) for i, src in enumerate(sources)]
    todo = [i for i, key in enumerate(keys) if not os.path.isfile(os.path.join(root, key, "meta.json"))]
    built: Dict[int, str] = {}
    made = _first_missing(root)              # the top directory we create (None: root exists)
    bar = _progress(progress and bool(todo))
    lock = None
    try:
        if todo:
            os.makedirs(root, exist_ok=True)
            # One builder at a time (the ranks of a job, or two jobs sharing a cache): the others wait,
            # then find the shards done. The lock is on the directory itself: no lock file to leave behind.
            lock = os.open(root, os.O_RDONLY)
            fcntl.flock(lock, fcntl.LOCK_EX)
            todo = [i for i in todo if not os.path.isfile(os.path.join(root, keys[i], "meta.json"))]
        if bar is not None and todo:
            bar.start()
        for i in todo:
            built[i] = tempfile.mkdtemp(prefix=f".tmp-{keys[i]}-", dir=root)
            _build_one(sources[i], tok, i, built[i], bar)
        for i, tmp in built.items():
            _commit(tmp, os.path.join(root, keys[i]))
    except BaseException:
        for tmp in built.values():
            shutil.rmtree(tmp, ignore_errors=True)
        if made is not None:
            _remove_empty(root, made)
        raise
    finally:
        if bar is not None and bar.live.is_started:
            bar.stop()
        if lock is not None:
            os.close(lock)  # releases the flock
    return [open_cache(os.path.join(root, key)) for key in keys]


def _commit(tmp: str, final: str) -> None:
    """Rename a finished temp dir into place; when another process already did, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isfile(os.path.join(final, "meta.json")):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _first_missing(path: str) -> Optional[str]:
    """The outermost directory of ``path`` that does not exist yet (None when ``path`` exists)."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.isdir(path):
        missing = path
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_empty(path: str, top: str) -> None:
    """Remove ``path`` and its parents up to ``top`` (directories we created) while they are empty."""
    path, top = os.path.abspath(path), os.path.abspath(top)
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == top:
            return
        path = os.path.dirname(path)
