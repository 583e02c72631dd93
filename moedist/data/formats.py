"""Reading a named source's files into documents: (ids, mask), mask 1 = counted in the loss.

    for ids, mask in read_documents(cfg.data.sources[0], tok, index=0): ...

Formats (``format`` of a source; ``path`` is a file or a directory, read
recursively in sorted order, hidden files skipped):

* ``text``               one document per UTF-8 file: encode(text) + [eos]; mask all 1.
* ``jsonl``              one JSON object per line, the document in ``text_field``
                         (default ``text``); blank lines skipped; same ids/mask.
* ``prompt_completion``  JSON lines {prompt, completion}: encode(prompt) +
                         encode(completion) + [eos]; mask 0 on the prompt.
* ``chat``               JSON lines {messages: [{role, content}, ...]} rendered by the
                         tokenizer's chat template; mask 1 on assistant turns (chat.py).
* ``parquet``            column ``text_field`` of every row (read by row-group
                         batches); same ids/mask as jsonl.

``eos`` is appended only when the tokenizer has one. Bad input raises a
one-line :class:`ConfigError` naming the source, the file, the line (or row)
and what was expected.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

from moedist.choices import SOURCE_FORMATS
from moedist.config_yaml import ConfigError
from moedist.data.chat import ChatError, chat_ids_and_mask
from moedist.data.tokenizer import Tokenizer

FORMAT_VERSION = 1          # bump when the ids/mask a format produces change (part of the cache key)
ENCODE_BATCH = 256          # documents tokenized per encode_batch call
PARQUET_BATCH = 1024        # rows read from a parquet file at a time

Doc = Tuple[List[int], List[int]]   # (ids, mask), equal lengths


def source_label(index: int, source: Mapping[str, Any]) -> str:
    """How errors name a source: ``data.sources[0] (name 'sft')``."""
    return f"data.sources[{index}] (name {source.get('name')!r})"


def _json_type(v: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


def source_files(source: Mapping[str, Any], label: str) -> List[Tuple[str, str]]:
    """(absolute path, path as shown in errors) of every file of a source, sorted.

    Raises:
        ConfigError: no such path, or a directory without (non-hidden) files.
    """
    given = source["path"]
    root = os.path.expanduser(given)
    if os.path.isfile(root):
        return [(os.path.abspath(root), given)]
    if not os.path.isdir(root):
        raise ConfigError(f"{label}: path {given!r}: no such file or directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                full = os.path.join(dirpath, name)
                out.append((os.path.abspath(full), os.path.join(given, os.path.relpath(full, root))))
    if not out:
        raise ConfigError(f"{label}: directory {given!r} has no files (hidden files are skipped)")
    return sorted(out, key=lambda pair: pair[1])


def check_format(source: Mapping[str, Any], label: str) -> str:
    fmt = source.get("format")
    if fmt not in SOURCE_FORMATS:
        raise ConfigError(f"{label}: format {fmt!r}: unknown (allowed: {'|'.join(SOURCE_FORMATS)})")
    return fmt


def read_documents(source: Mapping[str, Any], tok: Tokenizer, index: int = 0,
                   on_file: Optional[Callable[[str], None]] = None) -> Iterator[Doc]:
    """Every document of a source, in file order.

    Args:
        source: one entry of ``data.sources`` ({name, path, format, weight, text_field}).
        tok: the tokenizer.
        index: the source's position in ``data.sources`` (for error messages).
        on_file: called with each file's absolute path after its documents were yielded.

    Raises:
        ConfigError: one line naming the source, file, line and what was expected.
    """
    label = source_label(index, source)
    check_format(source, label)
    for path, shown in source_files(source, label):
        yield from read_file(source, tok, path, f"{label}: {shown}")
        if on_file is not None:
            on_file(path)


def read_file(source: Mapping[str, Any], tok: Tokenizer, path: str, where: str) -> Iterator[Doc]:
    """The documents of one file of a source; ``where`` prefixes error messages."""
    fmt = source["format"]
    field = source.get("text_field", "text")
    eos = [] if tok.eos_id is None else [tok.eos_id]
    if fmt == "text":
        with open(path, "rb") as fh:
            text = _decode(fh.read(), where)
        yield from _plain_docs(tok, [text], eos)
    elif fmt == "jsonl":
        yield from _batched(tok, (_field(obj, field, f"{where} line {n}", "jsonl", f"needs {field!r}")
                                  for n, obj in _json_lines(path, where)), eos)
    elif fmt == "prompt_completion":
        yield from _prompt_completion(tok, _json_lines(path, where), where, eos)
    elif fmt == "chat":
        for n, obj in _json_lines(path, where):
            if "messages" not in obj:
                raise ConfigError(f"{where} line {n}: missing field 'messages' (format chat needs messages: "
                                  "[{role, content}, ...])")
            try:
                yield chat_ids_and_mask(tok, obj["messages"])
            except ChatError as err:
                raise ConfigError(f"{where} line {n}: {err}") from None
    else:   # parquet
        yield from _batched(tok, _parquet_texts(path, field, where), eos)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _json_lines(path: str, where: str) -> Iterator[Tuple[int, dict]]:
    """(line number, object) of each non-blank line."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            line = _decode(raw, f"{where} line {n}")
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where} line {n}: malformed JSON ({err.msg}: column {err.colno})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{where} line {n}: expected a JSON object, got {_json_type(obj)}")
            yield n, obj


def _field(obj: dict, key: str, where: str, fmt: str, needs: str) -> str:
    if key not in obj:
        raise ConfigError(f"{where}: missing field {key!r} (format {fmt} {needs})")
    value = obj[key]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {key!r} must be a string, got {_json_type(value)}")
    return value


def _plain_docs(tok: Tokenizer, texts: Sequence[str], eos: List[int]) -> Iterator[Doc]:
    for ids in tok.encode_batch(texts):
        ids = ids + eos
        yield ids, [1] * len(ids)


def _batched(tok: Tokenizer, texts: Iterator[str], eos: List[int]) -> Iterator[Doc]:
    buf: List[str] = []
    for text in texts:
        buf.append(text)
        if len(buf) >= ENCODE_BATCH:
            yield from _plain_docs(tok, buf, eos)
            buf = []
    yield from _plain_docs(tok, buf, eos)


def _prompt_completion(tok: Tokenizer, lines: Iterator[Tuple[int, dict]], where: str, eos: List[int]
                       ) -> Iterator[Doc]:
    def flush(pairs):
        prompts = tok.encode_batch([p for p, _ in pairs])
        completions = tok.encode_batch([c for _, c in pairs])
        for p_ids, c_ids in zip(prompts, completions):
            yield p_ids + c_ids + eos, [0] * len(p_ids) + [1] * (len(c_ids) + len(eos))

    buf = []
    for n, obj in lines:
        at = f"{where} line {n}"
        needs = "needs prompt and completion"
        buf.append((_field(obj, "prompt", at, "prompt_completion", needs),
                    _field(obj, "completion", at, "prompt_completion", needs)))
        if len(buf) >= ENCODE_BATCH:
            yield from flush(buf)
            buf = []
    yield from flush(buf)


def _parquet_texts(path: str, field: str, where: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"{where}: not a parquet file ({' '.join(str(err).split())[:200]})") from None
    columns = pf.schema_arrow.names
    if field not in columns:
        raise ConfigError(f"{where}: no column {field!r} (columns: {', '.join(columns)}; set text_field)")
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise ConfigError(f"{where} row {row}: field {field!r} must be a string, got {_json_type(value)}")
            yield value
