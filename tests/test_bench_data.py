"""`moedist bench data` at a tiny size: the JSON it writes has every field and sane numbers.

A benchmark, not a timed test: nothing here asserts a time or a memory limit (the targets
are recorded in the JSON and in benchmarks/RESULTS.md, whatever their outcome).
"""
import json
import os

from moedist.bench.cli import main

TINY = ["--set", "model.hidden_size=32", "--set", "model.ffn_size=64", "--set", "model.max_seq_len=32",
        "--set", "data.seq_len=32", "--set", "train.micro_batch_size=2", "--set", "train.eval_batches=1"]


def test_bench_data_tiny(tmp_path, capsys):
    out, png = tmp_path / "data.json", tmp_path / "data.png"
    rc = main(["data", "--sizes", "1,3", "--steps", "3", "--base-tokens", "20000", "--workdir",
               str(tmp_path / "work"), "--json", str(out), "--plot", str(png)] + TINY)
    assert rc == 0
    res = json.loads(out.read_text())
    assert png.stat().st_size > 0
    assert "| 1x |" in capsys.readouterr().out           # the markdown table was printed

    assert [r["size"] for r in res["sizes"]] == [1, 3]
    for r in res["sizes"]:
        for key in ("corpus_tokens", "corpus_bytes_on_disk", "rss_peak_mb", "rss_after_first_step_mb",
                    "rss_growth_mb", "data_time_s", "step_time_s", "data_share"):
            assert isinstance(r[key], (int, float)), key
        assert r["steps"] == 3 and r["sequences_read"] == 3 * 2
        # byte tokenizer: tokens = UTF-8 bytes of the text; shards hold 4 (uint32) + 1 (mask) bytes per token
        assert r["corpus_tokens"] >= r["size"] * 20000
        assert r["corpus_bytes_on_disk"] >= 5 * r["corpus_tokens"]
        assert 50 < r["rss_after_first_step_mb"] <= r["rss_peak_mb"] < 16384    # a process with torch, MiB
        assert 0 < r["data_time_s"] < r["step_time_s"] and 0 < r["data_share"] < 1
        assert len(r["series"]["rss_mb"]) == r["steps"] + 1
    small, large = res["sizes"]
    assert 2.5 < large["corpus_tokens"] / small["corpus_tokens"] < 3.5
    assert res["rss_ratio_10x"] == large["rss_peak_mb"] / small["rss_peak_mb"]
    assert set(res["targets"]) == {"rss_flat", "data_share_below_5pct"}
    assert all(isinstance(v, bool) for v in res["targets"].values())
    assert res["environment"]["torch"] and res["config"]["trained"]["data"]["seq_len"] == 32
    assert os.path.isfile(tmp_path / "work" / "x3" / "config.yaml")    # what was trained, kept with --workdir
