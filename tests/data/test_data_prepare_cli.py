"""`moedist data prepare`: statistics per source; bad input exits 2 with one line and no partial cache."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from tok_helpers import write_jsonl

from moedist.data.prepare_cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_config(tmp_path, sources, tokenizer="bytes"):
    cfg = {"data": {"tokenizer": tokenizer, "seq_len": 8, "cache_dir": str(tmp_path / "cache"), "sources": sources}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_prepare_prints_one_line_per_source(tmp_path, tok_dir, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "plain text document number %d." % i} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Q%d " % i, "completion": "answer %d" % i} for i in range(40)])
    cfg = write_config(tmp_path, [{"name": "plain", "path": a, "format": "jsonl"},
                                  {"name": "qa", "path": b, "format": "prompt_completion", "weight": 2}], tok_dir)
    assert main(["prepare", cfg, "data.seq_len=4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("plain ") and out[1].startswith("qa ")
    for line in out[:2]:
        for word in ("documents", "tokens", "loss tokens", "train sequences", "val sequences"):
            assert word in line
    assert "documents 40 " in out[1]
    assert out[-1] == f"cache: {tmp_path / 'cache'}"
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_prepare_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["prepare", "--help"])
    assert info.value.code == 0 and "CONFIG" in capsys.readouterr().out


def test_prepare_without_sources(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  seq_len: 8\n")
    assert main(["prepare", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moedist: error: data.sources is empty") and err.count("\n") == 1


def test_prepare_bad_override(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    cfg = write_config(tmp_path, [{"name": "a", "path": a, "format": "jsonl"}])
    assert main(["prepare", cfg, "data.seq_len=1"]) == 2
    assert capsys.readouterr().err.startswith("moedist: error: data.seq_len=1")


def test_prepare_bad_input_subprocess(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine " * 50}] * 10)
    bad = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok"}, "", '{"text": "unterminated'])
    cfg = write_config(tmp_path, [{"name": "good", "path": good, "format": "jsonl"},
                                  {"name": "sft", "path": bad, "format": "jsonl"}])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "moedist", "data", "prepare", cfg], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"moedist: error: data.sources[1] (name 'sft'): {bad} line 3: malformed JSON ")
    assert not (tmp_path / "cache").exists()
