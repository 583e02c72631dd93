"""Each launcher script in launch/ runs a real 2-process `moedist train` (EP=2, DeepSpeed ZeRO-2).

The three runs train the same config, so they must also report the same losses: the launcher
changes how ranks are found (torch-style, DeepSpeed, Open MPI variables), never the numbers.
Their step-2 checkpoint then resumes in one plain PyTorch process (EP=1, twice the gradient
accumulation: the same global batch) and must continue with the same losses.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moedist.train.metrics import read_metrics
from tests._dist import free_port

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model.hidden_size=32", "model.ffn_size=48", "data.seq_len=32", "model.max_seq_len=32",
          "train.micro_batch_size=2", "train.max_steps=4", "train.plot=false"]
ARGS = ["train", "configs/tiny.yaml", "parallel.ep_size=2", "deepspeed.enabled=true", "deepspeed.zero_stage=2",
        "train.save_every=2", *COMMON]
LAUNCHERS = ["torchrun.sh", "deepspeed.sh", "mpirun.sh"]


def _launch(script: str, out: Path) -> subprocess.CompletedProcess:
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, NPROC="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK"):
        env.pop(var, None)
    return subprocess.run(["bash", str(ROOT / "launch" / script), *ARGS, f"train.output_dir={out}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for script in LAUNCHERS:
        folder = tmp_path_factory.mktemp(script.replace(".sh", ""))
        out[script] = (_launch(script, folder / "run"), folder / "run")
    return out


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_runs_two_process_training(runs, script):
    res, out = runs[script]
    assert res.returncode == 0, f"{script}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(r["tokens"] == 2 * 2 * 32 for r in recs)  # two ranks contributed to every step
    assert "2 rank(s), EP 2 x EDP 1, DeepSpeed ZeRO-2" in res.stdout
    assert res.stdout.count("moedist run 'tiny'") == 1  # rank 0 alone prints the summary
    assert (out / "final" / "manifest.json").exists() and (out / "checkpoints" / "latest").exists()


def test_launchers_give_identical_losses(runs):
    losses = {s: [r["loss"] for r in read_metrics(out / "metrics.jsonl")] for s, (res, out) in runs.items()
              if res.returncode == 0}
    assert len(losses) == len(LAUNCHERS)
    ref = losses["torchrun.sh"]
    for script, got in losses.items():
        assert got == pytest.approx(ref, rel=1e-6), script


def test_two_process_deepspeed_checkpoint_resumes_in_one_plain_process(runs, tmp_path, monkeypatch):
    from moedist.cli import main

    res, out = runs["torchrun.sh"]
    assert res.returncode == 0
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    one = tmp_path / "one"
    rc = main(["train", str(ROOT / "configs" / "tiny.yaml"), *COMMON, "train.grad_accum=2", f"train.output_dir={one}",
               f"train.resume={out / 'checkpoints' / 'step_000002'}"])
    assert rc == 0
    two_proc = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    resumed = read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx(two_proc[2:], rel=1e-5)
