"""`moedist demo` end to end: base training, exact dense -> LoRA-MoE conversion, EP=2 ZeRO-2
fine-tuning on 2 processes (torchrun started by the command itself), report and plot.

The default suite runs a shortened demo (a few steps); the slow suite runs `moedist demo` with
the shipped configs, as `make demo` does, and holds it to the 5-minute budget.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moedist.cli import main
from moedist.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
MOEDIST = [sys.executable, "-m", "moedist"]


def _run(args, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    t0 = time.perf_counter()
    res = subprocess.run(MOEDIST + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    return res, time.perf_counter() - t0


def _check_story(out: Path, text: str, finetune_steps: int) -> dict:
    s = json.loads((out / "demo_summary.json").read_text())
    # the converted model computes exactly what the dense base computes
    for dom in ("prose", "code"):
        assert abs(s["before"][dom] - s["dense_base"][dom]) < 1e-5, s
    assert s["world_size"] == 2 and "EP 2" in s["layout"] and "ZeRO-2" in s["layout"]
    assert s["finetune_steps"] == finetune_steps and s["tokens_per_s"] > 0
    assert len(s["expert_load"]) == 2 and all(len(row) == 8 for row in s["expert_load"])
    recs = read_metrics(out / "finetune" / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, finetune_steps + 1))
    assert recs[-1]["val_loss"] == pytest.approx(s["after"]["code"])
    assert recs[-1]["val_loss_prose"] == pytest.approx(s["after"]["prose"])
    assert (out / "finetune" / "plot.png").read_bytes()[:4] == b"\x89PNG"
    for word in ("1. base", "2. convert", "3. fine-tune", "4. validation loss", "code (new)", "prose (old)",
                 "tokens/s", "expert load, layer 1"):
        assert word in text, word
    return s


def test_short_demo_runs_and_reuses_cached_base(tmp_path):
    out = tmp_path / "demo"
    res, _ = _run(["demo", "--out", str(out), "--base-steps", "8", "--steps", "4"], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "training a dense byte-level LM" in res.stdout
    s = _check_story(out, res.stdout, 4)
    assert s["gain_code"] > 0  # even 4 steps of adapters help on the new domain
    # second run: same base config -> cached weights, no base training; this time with a shared
    # expert (it starts silent, so the conversion is still exact) that trains with the adapters
    shared = tmp_path / "demo_shared.yaml"
    shared.write_text((ROOT / "configs" / "demo.yaml").read_text()
                      .replace("  top_k: 2\n", "  top_k: 2\n  num_shared_experts: 1\n")
                      .replace("  train_router: true\n", "  train_router: true\n  train_shared_experts: true\n"))
    res2, _ = _run(["demo", "--out", str(out), "--base-steps", "8", "--steps", "2", "--config", str(shared)],
                   timeout=300)
    assert res2.returncode == 0, res2.stdout[-3000:] + res2.stderr[-3000:]
    assert "reusing the dense model cached" in res2.stdout and "training a dense" not in res2.stdout
    assert "a shared expert (w_down = 0, trains)" in res2.stdout
    s2 = _check_story(out, res2.stdout, 2)
    assert s2["dense_base"] == s["dense_base"]


def test_demo_bad_config_exits_2_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "demo.yaml").read_text().replace("hidden_size: 128", "hidden_size: 64"))
    rc = main(["demo", "--config", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "model.hidden_size=64: must equal the base model's (128" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_make_demo_story_under_five_minutes(tmp_path):
    """The shipped demo (what `make demo` runs), from scratch: base training included."""
    out = tmp_path / "demo"
    res, seconds = _run(["demo", "--out", str(out)], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s = _check_story(out, res.stdout, 300)
    assert seconds < 300, f"demo took {seconds:.0f} s"
    assert s["base"]["val_loss_prose"] < 2.0          # the base learned prose
    assert s["gain_code"] > 0.2                       # fine-tuning helps on code
    assert s["forgetting_prose"] > -0.05              # reported honestly (frozen base: moderate)
    print(f"demo: {seconds:.0f} s, code {s['before']['code']:.3f} -> {s['after']['code']:.3f}, "
          f"prose {s['before']['prose']:.3f} -> {s['after']['prose']:.3f}, {s['tokens_per_s']:,.0f} tok/s")


@pytest.mark.slow
def test_demo_hf_journey(tmp_path):
    """`moedist demo --hf`: toy Qwen3-MoE + tokenizer, JSONL data, data prepare, EP=2 ZeRO-2 LoRA fine-tune,
    generate, convert to-hf; transformers loads the export and greedy-generates what moedist generated."""
    out = tmp_path / "hf_demo"
    res, _ = _run(["demo", "--hf", "--out", str(out), "--steps", "6"], timeout=900)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "transformers greedy text equals moedist generate" in res.stdout
    recs = read_metrics(str(out / "run" / "metrics.jsonl"))
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert {"val_loss", "val_loss_sft", "val_loss_chat"} <= set(recs[-1])
    assert (out / "run" / "final" / "tokenizer.json").is_file() and (out / "export" / "config.json").is_file()
