"""Mixed precision on CUDA (skipped without a GPU): DeepSpeed bf16 and fp16 train the tiny MoE LM,
EP=2 across two GPUs when there are two. bf16 on CPU is covered by test_train_equivalence.py."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moedist.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu
ARGS = ["configs/tiny.yaml", "train.max_steps=4", "deepspeed.enabled=true", "deepspeed.zero_stage=2"]


def _run(cmd, out: Path):
    env = dict(os.environ, DS_ACCELERATOR="cuda", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd + [f"train.output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = read_metrics(out / "metrics.jsonl")
    assert len(recs) == 4 and all(math.isfinite(r["loss"]) for r in recs)
    assert "cuda" in res.stdout
    return recs


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_one_gpu(tmp_path, precision):
    _run([sys.executable, "-m", "moedist", "train", *ARGS, f"deepspeed.{precision}=true"], tmp_path / precision)


def test_bf16_expert_parallel_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    recs = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                 "moedist", "train", *ARGS, "deepspeed.bf16=true", "parallel.ep_size=2"], tmp_path / "ep2")
    assert recs[-1]["tokens"] == 2 * 4 * 64
