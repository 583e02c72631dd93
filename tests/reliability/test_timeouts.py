"""parallel.timeout_s: a rank that stalls or dies makes the others exit non-zero within it.

Two real `python -m moedist train` processes (RANK/WORLD_SIZE/MASTER_* set here, no
torchrun agent that would tear the job down for us): once both are training, rank 1 is
frozen (SIGSTOP: a true stall, it holds its sockets open) or killed (SIGKILL), and rank 0
must exit non-zero on its own, within the timeout plus slack, with one line naming the
rank it waited for. gloo's own text names no rank (`Timed out waiting 5000ms for recv
operation to complete`), so moedist adds it (launch_env.collective_errors).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moedist.distributed.launch_env import (CollectiveError, DistEnv, collective_errors,
                                            describe_collective_failure)
from tests.reliability._runs import wait_for_line

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 5
# A step on a busy 2-core machine takes a few seconds; the collective that times out may
# start only after rank 0 finishes its current step's compute.
SLACK_S = 25
ARGS = ["train", "configs/tiny.yaml", f"parallel.timeout_s={TIMEOUT_S}", "train.max_steps=100000",
        "train.log_every=1", "train.plot=false", "train.eval_every=0", "model.hidden_size=32",
        "model.ffn_size=48", "data.seq_len=32", "model.max_seq_len=32", "train.micro_batch_size=2"]

pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(rank: int, port: int, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI_", "SLURM_", "TORCHELASTIC_"))}
    env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "moedist", *ARGS, f"train.output_dir={out}",
                             f"data.cache_dir={out.parent / 'cache'}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()  # also ends a SIGSTOPped process
    proc.wait(timeout=30)


@pytest.mark.parametrize("fault", ["stall", "die"])
def test_rank0_exits_within_timeout_when_rank1_stalls_or_dies(tmp_path, fault):
    port = _free_port()
    rank0, rank1 = _start(0, port, tmp_path / "run"), _start(1, port, tmp_path / "run")
    try:
        head = wait_for_line(rank0, "step     2/", timeout=150)  # both ranks are in the loop
        os.kill(rank1.pid, signal.SIGSTOP if fault == "stall" else signal.SIGKILL)
        t0 = time.monotonic()
        try:
            tail, _ = rank0.communicate(timeout=TIMEOUT_S + SLACK_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {TIMEOUT_S + SLACK_S}s after rank 1 was {fault}ed")
        elapsed = time.monotonic() - t0
    finally:
        _stop(rank0)
        _stop(rank1)
    out = head + tail
    assert rank0.returncode != 0, out[-3000:]
    assert elapsed < TIMEOUT_S + SLACK_S
    if fault == "stall":
        assert elapsed >= TIMEOUT_S - 1, f"rank 0 gave up after {elapsed:.1f}s, before the {TIMEOUT_S}s timeout"
        assert f"rank 0: collective timed out after {TIMEOUT_S}s waiting for rank 1" in out, out[-3000:]
    else:
        assert "rank 0: rank 1 died or left during a collective" in out, out[-3000:]


# ---- the message, without processes ------------------------------------------------------

ENV2 = DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, launcher="env")
ENV4 = DistEnv(rank=3, world_size=4, local_rank=3, local_world_size=4, launcher="env")
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
                "Timed out waiting 5000ms for recv operation to complete")
GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
               "by peer [127.0.0.1]:7808. This is typically caused by a remote worker crashing.")


def test_describe_names_ranks_and_timeout():
    assert describe_collective_failure(GLOO_TIMEOUT, ENV2, 5.0) == (
        "rank 0: collective timed out after 5s waiting for rank 1 (parallel.timeout_s=5; backend: "
        "Timed out waiting 5000ms for recv operation to complete); that rank stalled or died")
    assert describe_collective_failure(GLOO_CLOSED, ENV4, 600.0).startswith(
        "rank 3: another rank (one of the other 3) died or left during a collective (backend: Connection closed")
    assert describe_collective_failure("CUDA out of memory", ENV2, 5.0) is None


def test_collective_errors_rewrites_only_peer_failures():
    with pytest.raises(CollectiveError, match=r"^rank 0: collective timed out after 5s waiting for rank 1"):
        with collective_errors(ENV2, 5.0):
            raise RuntimeError(GLOO_TIMEOUT)
    with pytest.raises(RuntimeError, match="^shape mismatch$") as info:
        with collective_errors(ENV2, 5.0):
            raise RuntimeError("shape mismatch")
    assert not isinstance(info.value, CollectiveError)
    with pytest.raises(ValueError):
        with collective_errors(ENV2, 5.0):
            raise ValueError("not ours")


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_timeout_must_be_a_positive_number(value):
    from moedist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"parallel\.timeout_s"):
        load_config(None, [f"parallel.timeout_s={value}"])


def test_timeout_default_and_override():
    from moedist.config import load_config

    assert load_config(None, []).parallel.timeout_s == 600
    assert load_config(None, ["parallel.timeout_s=2.5"]).parallel.timeout_s == 2.5
