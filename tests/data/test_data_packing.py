"""Packed windows, padded documents and the train/validation split, against a by-hand reference."""
from __future__ import annotations

import pytest
import torch
from tok_helpers import write_jsonl

from moedist.config import config_from_dict
from moedist.config_yaml import ConfigError
from moedist.data import IGNORE, build_data
from moedist.data.tokenizer import ByteTokenizer

# 90 distinct printable characters, so that every window of the stream is unique.
CHARS = "".join(chr(c) for c in range(33, 123) if chr(c) not in "\"\\")[:88] + "{|"
LENGTHS = [3, 5, 2, 6, 1, 4, 7, 3, 9, 2, 5, 8, 4, 6, 3, 10, 5, 7]   # sum 90


def make_cfg(tmp_path, sources, **data):
    return config_from_dict({"data": {"cache_dir": str(tmp_path / "cache"), "sources": sources, **data}})


def char_docs(tmp_path):
    assert len(set(CHARS)) == 90 and sum(LENGTHS) == 90
    texts, a = [], 0
    for n in LENGTHS:
        texts.append(CHARS[a:a + n])
        a += n
    return texts, write_jsonl(tmp_path / "chars.jsonl", [{"text": t} for t in texts])


def all_rows(data, name):
    """Every sequence of a single-source dataset: one training epoch plus all validation sequences."""
    assert data.names == [name]
    train = data.train_micro(0, data.num_train)
    val = data.val_micro(name, 0, data.num_val(name))
    return train, val


def rows_of(batch):
    cols = [batch.input_ids, batch.labels, batch.position_ids, batch.segment_ids]
    return [tuple(None if c is None else tuple(c[i].tolist()) for c in cols) for i in range(batch.input_ids.shape[0])]


def reference_windows(docs, S):
    """By hand: every packed window as (input, labels, positions, segments) tuples."""
    stream, mask, doc_of, pos_of = [], [], [], []
    for d, (ids, m) in enumerate(docs):
        for j in range(len(ids)):
            stream.append(ids[j])
            mask.append(m[j])
            doc_of.append(d)
            pos_of.append(j)
    out = []
    for k in range((len(stream) - 1) // S):
        a = k * S
        labels = [stream[a + t + 1] if doc_of[a + t + 1] == doc_of[a + t] and mask[a + t + 1] else IGNORE
                  for t in range(S)]
        out.append((tuple(stream[a:a + S]), tuple(labels), tuple(pos_of[a:a + S]), tuple(doc_of[a:a + S])))
    return out


def canonical(row):
    """A row with its segment ids renumbered in order of first appearance."""
    first = {}
    return row[:3] + (tuple(first.setdefault(s, len(first)) for s in row[3]),)


def test_packed_windows_spot_check(tmp_path):
    texts, path = char_docs(tmp_path)
    data = build_data(make_cfg(tmp_path, [{"name": "c", "path": path, "format": "jsonl"}], seq_len=4),
                      tokenizer=ByteTokenizer())
    train, val = all_rows(data, "c")
    by_input = {r[0]: r for r in rows_of(train) + rows_of(val)}
    # Documents are CHARS[0:3] | CHARS[3:8] | CHARS[8:10] ...; window 0 = CHARS[0:5].
    c = [ord(ch) for ch in CHARS]
    inp, labels, pos, seg = by_input[tuple(c[0:4])]
    assert labels == (c[1], c[2], IGNORE, c[4])          # c[2] -> c[3] crosses from doc 0 to doc 1
    assert pos == (0, 1, 2, 0)
    assert seg[0] == seg[1] == seg[2] != seg[3]
    # Window 1 = CHARS[4:9]: doc 1 began in window 0, so positions continue at 1; c[7] -> c[8] crosses.
    inp, labels, pos, seg = by_input[tuple(c[4:8])]
    assert labels == (c[5], c[6], c[7], IGNORE)
    assert pos == (1, 2, 3, 4) and len(set(seg)) == 1


def test_packed_windows_match_reference_with_prompt_mask(tmp_path, tok):
    rows = [{"prompt": f"Question {i}: what is {i} times {i}?\n", "completion": f"It is {i * i}."} for i in range(40)]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    S = 8
    data = build_data(make_cfg(tmp_path, [{"name": "pc", "path": path, "format": "prompt_completion"}], seq_len=S),
                      tokenizer=tok)
    docs = []
    for r in rows:
        p, c = tok.encode(r["prompt"]), tok.encode(r["completion"])
        docs.append((p + c + [tok.eos_id], [0] * len(p) + [1] * (len(c) + 1)))
    want = reference_windows(docs, S)
    train, val = all_rows(data, "pc")
    got = rows_of(train) + rows_of(val)
    # Compare as multisets; segments as "which tokens share a document" (first-seen numbering).
    assert sorted(canonical(r) for r in got) == sorted(canonical(w) for w in want)
    # The prompt is never a target, and no label predicts the first token of the next document.
    assert sum(1 for r in got for lab in r[1] if lab != IGNORE) == sum(1 for w in want for lab in w[1] if lab != IGNORE)
    assert train.input_ids.dtype == torch.int64 and train.input_ids.shape == (data.num_train, S)


def test_unpacked_documents_are_padded_and_masked(tmp_path, tok):
    rows = [{"prompt": f"P{i} ", "completion": "word " * (i % 7)} for i in range(24)]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    S = 8
    data = build_data(make_cfg(tmp_path, [{"name": "pc", "path": path, "format": "prompt_completion"}],
                               seq_len=S, pack=False), tokenizer=tok)
    want = {}
    for r in rows:
        p, c = tok.encode(r["prompt"]), tok.encode(r["completion"])
        ids, mask = (p + c + [tok.eos_id])[:S + 1], ([0] * len(p) + [1] * (len(c) + 1))[:S + 1]
        w = ids + [tok.pad_id] * (S + 1 - len(ids))
        labels = [w[t + 1] if t + 1 < len(ids) and mask[t + 1] else IGNORE for t in range(S)]
        want[tuple(w[:S])] = tuple(labels)
    assert len(want) == len(rows)
    train, val = all_rows(data, "pc")
    assert train.position_ids is None and train.segment_ids is None
    got = rows_of(train) + rows_of(val)
    assert len(got) == 24 and {r[0]: r[1] for r in got} == want
    assert data.stats["pc"]["train_sequences"] + data.stats["pc"]["val_sequences"] == 24


def test_split_is_whole_blocks(tmp_path):
    texts, path = char_docs(tmp_path)
    S = 2                                                   # (90 - 1) // 2 = 44 windows = 5 blocks + 4
    data = build_data(make_cfg(tmp_path, [{"name": "c", "path": path, "format": "jsonl"}], seq_len=S,
                               val_fraction=0.3), tokenizer=ByteTokenizer())
    c = [ord(ch) for ch in CHARS]
    index = {tuple(c[k * S:k * S + S]): k for k in range(44)}
    train, val = all_rows(data, "c")
    val_k = sorted(index[r[0]] for r in rows_of(val))
    train_k = sorted(index[r[0]] for r in rows_of(train))
    assert sorted(train_k + val_k) == list(range(44))
    assert len(val_k) == 8 * 2                              # round(0.3 * 5) = 2 blocks
    blocks = {k // 8 for k in val_k}
    assert val_k == sorted(k for b in blocks for k in range(8 * b, 8 * b + 8)) and 5 not in blocks
    splits = set()
    for seed in range(6):
        other = build_data(make_cfg(tmp_path, [{"name": "c", "path": path, "format": "jsonl"}], seq_len=S,
                                    val_fraction=0.3, seed=seed), tokenizer=ByteTokenizer())
        splits.add(tuple(sorted(index[r[0]] for r in rows_of(other.val_micro("c", 0, 16)))))
    assert len(splits) > 1                                   # data.seed chooses the validation blocks


def test_val_micro_wraps(tmp_path):
    _, path = char_docs(tmp_path)
    data = build_data(make_cfg(tmp_path, [{"name": "c", "path": path, "format": "jsonl"}], seq_len=4),
                      tokenizer=ByteTokenizer())
    n = data.num_val("c")
    assert n == 8
    a, b = data.val_micro("c", 0, 3), data.val_micro("c", 3, 3)   # rows 0,1,2 and 9,10,11 = 1,2,3
    assert torch.equal(a.input_ids[1:], b.input_ids[:2])
    assert torch.equal(data.val_micro("c", 0, n).input_ids, data.val_micro("c", 1, n).input_ids)


def test_too_small_source(tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "x" * 21}])
    with pytest.raises(ConfigError) as info:
        build_data(make_cfg(tmp_path, [{"name": "tiny", "path": path, "format": "jsonl"}], seq_len=2),
                   tokenizer=ByteTokenizer())
    msg = str(info.value)
    assert msg.startswith("data.sources[0] (name 'tiny'): gives 10 sequences") and "needs at least 16" in msg
    assert "\n" not in msg
