"""The memory-mapped cache: layout, reuse without re-tokenizing, keys, atomic and clean on error."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tok_helpers import write_jsonl

import moedist.data.cache as cache_mod
from moedist.config import config_from_dict
from moedist.config_yaml import ConfigError
from moedist.data import build_data, source_key
from moedist.data.tokenizer import ByteTokenizer

PC = [{"prompt": f"Prompt {i}: ", "completion": f"completion number {i} is here."} for i in range(30)]


def make_cfg(tmp_path, sources, **data):
    return config_from_dict({"data": {"cache_dir": str(tmp_path / "cache"), "seq_len": 8, "sources": sources,
                                      **data}})


def pc_source(tmp_path, rows=PC, name="pc"):
    return {"name": name, "path": write_jsonl(tmp_path / f"{name}.jsonl", rows), "format": "prompt_completion"}


def test_layout_and_meta(tmp_path, tok):
    src = pc_source(tmp_path)
    data = build_data(make_cfg(tmp_path, [src]), tokenizer=tok)
    [key] = os.listdir(tmp_path / "cache")
    assert key == source_key(src, tok)
    d = tmp_path / "cache" / key
    assert sorted(os.listdir(d)) == ["doc_offsets.npy", "mask.npy", "meta.json", "tokens.npy"]
    tokens = np.load(d / "tokens.npy", mmap_mode="r")
    mask = np.load(d / "mask.npy", mmap_mode="r")
    offsets = np.load(d / "doc_offsets.npy", mmap_mode="r")
    assert tokens.dtype == np.uint32 and mask.dtype == np.uint8 and offsets.dtype == np.int64
    ids = [tok.encode(r["prompt"]) + tok.encode(r["completion"]) + [tok.eos_id] for r in PC]
    counted = sum(len(tok.encode(r["completion"])) + 1 for r in PC)
    assert tokens.tolist() == [t for doc in ids for t in doc]
    assert offsets.tolist() == list(np.cumsum([0] + [len(doc) for doc in ids]))
    assert int(mask.sum()) == counted
    meta = json.loads((d / "meta.json").read_text())
    assert (meta["documents"], meta["tokens"], meta["loss_tokens"]) == (30, len(tokens), counted)
    assert data.stats["pc"]["loss_tokens"] == counted and data.stats["pc"]["documents"] == 30
    assert isinstance(data.sources[0].seqs.cache.tokens, np.memmap)        # never read into memory


def test_second_build_reuses_the_cache(tmp_path, tok, monkeypatch):
    cfg = make_cfg(tmp_path, [pc_source(tmp_path)])
    first = build_data(cfg, tokenizer=tok)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(cache_mod, "read_documents", no_tokenizing)
    second = build_data(cfg, tokenizer=tok)
    assert torch.equal(first.train_micro(3, 5).input_ids, second.train_micro(3, 5).input_ids)
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_key_changes_with_file_tokenizer_and_settings(tmp_path, tok):
    src = pc_source(tmp_path)
    key = source_key(src, tok)
    assert source_key(dict(src, weight=3, name="other"), tok) == key          # weight/name: same tokens
    assert source_key(src, ByteTokenizer()) != key
    assert source_key(dict(src, format="jsonl", text_field="prompt"), tok) != key
    build_data(make_cfg(tmp_path, [src]), tokenizer=tok)
    write_jsonl(src["path"], PC[:-1] + [{"prompt": "changed ", "completion": "line"}])
    changed = source_key(src, tok)
    assert changed != key
    data = build_data(make_cfg(tmp_path, [src]), tokenizer=tok)
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([key, changed])
    assert data.stats["pc"]["tokens"] == len(np.load(tmp_path / "cache" / changed / "tokens.npy"))


def test_directory_key_sees_renames(tmp_path, tok):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("some text")
    src = {"name": "t", "path": str(d), "format": "text"}
    key = source_key(src, tok)
    os.rename(d / "a.txt", d / "b.txt")
    assert source_key(src, tok) != key


def test_error_leaves_nothing(tmp_path, tok):
    good = pc_source(tmp_path)
    bad = pc_source(tmp_path, PC[:20] + ['{"prompt": "x", "completion": '], name="bad")
    with pytest.raises(ConfigError, match="bad.jsonl line 21: malformed JSON"):
        build_data(make_cfg(tmp_path, [good, bad]), tokenizer=tok)
    assert not (tmp_path / "cache").exists()
    build_data(make_cfg(tmp_path, [good]), tokenizer=tok)
    before = sorted(os.listdir(tmp_path / "cache"))
    with pytest.raises(ConfigError):
        build_data(make_cfg(tmp_path, [good, bad], seq_len=4), tokenizer=tok)
    assert sorted(os.listdir(tmp_path / "cache")) == before                   # no temp dir left


def test_a_finished_cache_of_another_rank_wins(tmp_path, tok):
    src = pc_source(tmp_path)
    build_data(make_cfg(tmp_path, [src]), tokenizer=tok)
    final = tmp_path / "cache" / source_key(src, tok)
    mine = tmp_path / "cache" / ".tmp-mine"
    mine.mkdir()
    (mine / "meta.json").write_text("{}")
    cache_mod._commit(str(mine), str(final))
    assert not mine.exists() and json.loads((final / "meta.json").read_text())["documents"] == 30


def test_concurrent_builders_tokenize_once(tmp_path):
    """Two processes (e.g. the ranks of a job) preparing the same cache at once: one tokenizes, the other
    waits on the cache directory's lock and opens the finished shards; no temp dirs are left."""
    import subprocess
    import sys

    rows = [{"text": f"document {i} " + "words and more words " * 200} for i in range(400)]
    src = {"name": "big", "path": write_jsonl(tmp_path / "big.jsonl", rows), "format": "jsonl"}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"data": {"cache_dir": str(tmp_path / "cache"), "seq_len": 16, "sources": [src]}}))
    code = ("import sys, moedist.data.cache as c\n"
            "orig = c._build_one\n"
            "def counted(*a, **k):\n"
            "    print('TOKENIZED', flush=True)\n"
            "    return orig(*a, **k)\n"
            "c._build_one = counted\n"
            "from moedist.data.prepare_cli import main\n"
            "sys.exit(main(['prepare', sys.argv[1]]))\n")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(o.count("TOKENIZED") for o, _ in outs) == 1, outs
    assert len(os.listdir(tmp_path / "cache")) == 1  # one key dir, no .tmp-* leftovers
