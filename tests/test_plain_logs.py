"""Under mpirun/srun the training log is plain text: Open MPI gives each rank a pseudo-terminal
whose output lands in a log file, so rich must not draw a live bar or write ANSI escapes there."""
from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_on_a_pty(tmp_path: Path, extra_env: dict) -> bytes:
    """`moedist train` with stdout on a pseudo-terminal (as Open MPI's launcher does); returns its output."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), TERM="xterm-256color", **extra_env)
    proc = subprocess.Popen([sys.executable, "-m", "moedist", "train", str(ROOT / "configs" / "tiny.yaml"),
                             "train.max_steps=2", "train.plot=false", f"train.output_dir={tmp_path / 'run'}"],
                            stdout=slave, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=300) == 0, out[-2000:]
    os.close(master)
    return out


def test_mpirun_rank_writes_plain_lines_on_a_pty(tmp_path):
    plain = _run_on_a_pty(tmp_path / "mpi", {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1",
                                             "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})
    assert b"step     2/2" in plain and b"\x1b[" not in plain, plain[-2000:]
    fancy = _run_on_a_pty(tmp_path / "tty", {})  # the same on a real terminal: rich styles it
    assert b"\x1b[" in fancy


def test_stdout_not_a_terminal_gets_plain_lines(tmp_path):
    """Redirected to a file or a pipe (`moedist train ... > log`): one plain line per logged step."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), TERM="xterm-256color")
    res = subprocess.run([sys.executable, "-m", "moedist", "train", str(ROOT / "configs" / "tiny.yaml"),
                          "train.max_steps=2", "train.plot=false", f"train.output_dir={tmp_path / 'run'}"],
                         capture_output=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert b"step     2/2" in res.stdout and b"\x1b[" not in res.stdout + res.stderr, res.stdout[-2000:]
