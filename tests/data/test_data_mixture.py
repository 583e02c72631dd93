"""Mixture shares, positions that do not depend on the world size, and exact resumption."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from tok_helpers import write_jsonl

from moedist.config import config_from_dict
from moedist.data import Batch, build_data
from moedist.data.tokenizer import ByteTokenizer

S = 4


@pytest.fixture
def two_sources(tmp_path):
    """Source 'letters' (all bytes 'a'..'z') and 'digits' (all bytes '0'..'9'): a row's first id names its source."""
    letters = write_jsonl(tmp_path / "letters.jsonl", [{"text": "abcdefghijklmnopqrstuvwxyz"[i % 26:] + "xyz"}
                                                       for i in range(12)])
    digits = write_jsonl(tmp_path / "digits.jsonl", [{"text": "0123456789" * 4} for _ in range(10)])

    def build(weights=(3, 1), seed=0, tmp=tmp_path):
        sources = [{"name": "letters", "path": letters, "format": "jsonl", "weight": weights[0]},
                   {"name": "digits", "path": digits, "format": "jsonl", "weight": weights[1]}]
        cfg = config_from_dict({"data": {"cache_dir": str(tmp / "cache"), "sources": sources, "seq_len": S,
                                         "seed": seed}})
        return build_data(cfg, tokenizer=ByteTokenizer())
    return build


def source_of(batch: Batch):
    return ["digits" if chr(i).isdigit() else "letters" for i in batch.input_ids[:, 0].tolist()]


def rows(batch: Batch):
    return [tuple(r) for r in batch.input_ids.tolist()]


def cat(batches):
    return Batch(*(None if getattr(batches[0], f) is None else torch.cat([getattr(b, f) for b in batches])
                   for f in ("input_ids", "labels", "position_ids", "segment_ids")))


def assert_same(a: Batch, b: Batch):
    for f in ("input_ids", "labels", "position_ids", "segment_ids"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_shares_follow_weights(two_sources):
    for weights in [(3, 1), (1, 1), (1, 5)]:
        data = two_sources(weights)
        st = data.stats
        n_total = st["letters"]["train_sequences"] + st["digits"]["train_sequences"]
        shares = {name: round(w / sum(weights) * n_total) for name, w in zip(data.names, weights)}
        assert data.num_train == sum(shares.values())
        for epoch in range(3):
            got = Counter(source_of(data.train_micro(epoch * data.num_train, data.num_train)))
            for name, w in zip(data.names, weights):
                assert abs(got[name] - w / sum(weights) * data.num_train) <= 1, (weights, epoch, got)


def test_source_sizes(two_sources):
    data = two_sources()
    letters_tokens = sum(len("abcdefghijklmnopqrstuvwxyz"[i % 26:] + "xyz") for i in range(12))
    st = data.stats
    assert st["letters"]["documents"] == 12 and st["letters"]["tokens"] == letters_tokens
    assert st["digits"]["tokens"] == st["digits"]["loss_tokens"] == 400
    assert st["digits"]["train_sequences"] + st["digits"]["val_sequences"] == (400 - 1) // S
    assert st["letters"]["train_sequences"] + st["letters"]["val_sequences"] == (letters_tokens - 1) // S


def test_downsampled_source_sees_everything_before_repeating(tmp_path):
    """A source drawn less than its size per epoch goes through all its training sequences first."""
    unique = "".join(chr(c) for c in range(33, 123) if chr(c) not in "\"\\")    # 88 distinct bytes
    u = write_jsonl(tmp_path / "u.jsonl", [{"text": unique[i:i + 11]} for i in range(0, 88, 11)])
    z = write_jsonl(tmp_path / "z.jsonl", [{"text": "}~" * 100}, {"text": "~}" * 100}])
    sources = [{"name": "u", "path": u, "format": "jsonl", "weight": 0.1},
               {"name": "z", "path": z, "format": "jsonl", "weight": 1}]
    cfg = config_from_dict({"data": {"cache_dir": str(tmp_path / "cache"), "sources": sources, "seq_len": S}})
    data = build_data(cfg, tokenizer=ByteTokenizer())
    n_u = data.stats["u"]["train_sequences"]                       # (88 - 1) // 4 = 21 windows - 8 val
    per_epoch = round(0.1 / 1.1 * data.num_train)
    assert n_u == 13 and per_epoch < n_u < 2 * per_epoch
    epochs = [data.train_micro(e * data.num_train, data.num_train) for e in range(2)]
    drawn = [[r for r in rows(b) if r[0] not in (ord("}"), ord("~"))] for b in epochs]
    assert len(drawn[0]) == per_epoch and len(set(drawn[0])) == per_epoch      # no repeats in epoch 0
    val = set(rows(data.val_micro("u", 0, data.num_val("u"))))
    windows = {tuple(ord(ch) for ch in unique[k * S:k * S + S]) for k in range(21)}
    assert set(drawn[0] + drawn[1]) == windows - val               # the whole source within two epochs
    assert len(val) == 8 and val < windows


@pytest.mark.parametrize("position", [0, 5, 37])
def test_positions_are_layout_free(two_sources, position):
    data = two_sources()
    n = data.num_train
    for p in (position, n - 2, 3 * n + position):
        assert_same(data.train_micro(p, 4), cat([data.train_micro(p, 2), data.train_micro(p + 2, 2)]))
    # One step of 8 sequences read by 1, 2 or 4 ranks (each rank: grad_accum micro-batches of 2).
    whole = data.train_micro(position, 8)
    for world in (1, 2, 4):
        accum = 8 // (world * 2)
        parts = [data.train_micro(position + (rank * accum + a) * 2, 2) for rank in range(world)
                 for a in range(accum)]
        assert_same(cat(parts), whole)


def test_resume_exactly_and_seed_changes_order(two_sources, tmp_path):
    data = two_sources()
    p = 2 * data.num_train + 11
    later = data.train_micro(p, 6)
    data.train_micro(0, 3)                           # touch another epoch first
    assert_same(data.train_micro(p, 6), later)
    fresh = two_sources()                            # a restarted run, from the cache
    assert_same(fresh.train_micro(p, 6), later)
    other = two_sources(seed=1, tmp=tmp_path / "other")
    assert rows(other.train_micro(0, 16)) != rows(data.train_micro(0, 16))
    assert rows(data.train_micro(0, 16)) != rows(data.train_micro(data.num_train, 16))   # epochs differ
