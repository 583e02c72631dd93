"""The launch/ wrappers and init_distributed under each launcher, 2 real processes each.

tests/scripts/dist_smoke.py prints one JSON line per rank with what an all-reduce and an
uneven all-to-all delivered; the expected values are the hand formula from its docstring.
srun and MPICH (Hydra) are imitated by starting the processes with their variables set.
"""
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._dist import free_port

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tests" / "scripts" / "dist_smoke.py"
VENV_BIN = Path(sys.executable).parent
LIMIT_S = 60


def base_env(**extra) -> dict:
    """This environment without any launcher's variables, tools from the venv first."""
    env = {k: v for k, v in os.environ.items()
           if not (k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK",
                         "MASTER_ADDR", "MASTER_PORT", "NPROC", "NNODES", "NODE_RANK", "HOSTFILE")
                   or k.startswith(("OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "SLURM_", "TORCHELASTIC_", "MOEDIST_")))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHON=sys.executable,
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def smoke_records(text: str) -> list:
    """Every dist_smoke JSON object in `text` (robust to lines from other processes)."""
    dec, out, i = json.JSONDecoder(), [], 0
    while (i := text.find('{"script": "dist_smoke"', i)) >= 0:
        obj, end = dec.raw_decode(text, i)
        out.append(obj)
        i = end
    return out


def split(src: int, dst: int) -> int:
    return src + 2 * dst + 1


def check_ranks(records: list, launcher: str, world: int = 2, argv=None) -> None:
    assert sorted(r["rank"] for r in records) == list(range(world)), records
    for rec in records:
        r = rec["rank"]
        assert rec["world_size"] == world and rec["launcher"] == launcher and rec["backend"] == "gloo"
        assert (rec["local_rank"], rec["local_world_size"]) == (r, world)
        assert rec["all_reduce"] == world * (world + 1) / 2
        want = [1000.0 * j + 100.0 * r + i for j in range(world) for i in range(split(j, r))]
        assert rec["recv"] == want
        if argv is not None:
            assert rec["argv"] == argv(r)


def run_launcher(script: str, env: dict, *args: str) -> str:
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=LIMIT_S)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert elapsed < LIMIT_S
    return proc.stdout


def smoke_env(port: int) -> dict:
    return base_env(MOEDIST_ENTRY=str(SMOKE), NPROC="2", MASTER_PORT=str(port))


def test_torchrun_sh():
    port = free_port()
    out = run_launcher("torchrun.sh", smoke_env(port), "--flag", "x y")
    recs = smoke_records(out)
    check_ranks(recs, "torchrun", argv=lambda r: ["--flag", "x y"])
    assert {r["master_port"] for r in recs} == {port}


def test_mpirun_sh():
    port = free_port()
    recs = smoke_records(run_launcher("mpirun.sh", smoke_env(port), "a"))
    check_ranks(recs, "openmpi", argv=lambda r: ["a"])
    assert {(r["master_addr"], r["master_port"]) for r in recs} == {("127.0.0.1", port)}


def test_deepspeed_sh():
    port = free_port()
    recs = smoke_records(run_launcher("deepspeed.sh", smoke_env(port), "a"))
    # the DeepSpeed launcher puts --local_rank=N in front of our arguments
    check_ranks(recs, "deepspeed", argv=lambda r: [f"--local_rank={r}", "a"])
    assert {r["master_port"] for r in recs} == {port}


def free_slurm_job_id() -> int:
    """A job id whose derived port (15000 + id % 10000) is free now."""
    for _ in range(200):
        job_id = random.randrange(10_000, 100_000_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 15000 + job_id % 10000))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in 15000..24999")


def start_ranks(per_rank_env) -> list:
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(SMOKE)], cwd=ROOT, env=per_rank_env(r), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=LIMIT_S)
            assert p.returncode == 0, f"rank exited {p.returncode}\n{out}\n{err}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert time.monotonic() - t0 < LIMIT_S
    return smoke_records("".join(outs))


def test_srun_like_env():
    job_id = free_slurm_job_id()
    recs = start_ranks(lambda r: base_env(
        SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_NODEID="0",
        SLURM_STEP_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job_id)))
    check_ranks(recs, "slurm")
    assert {(r["master_addr"], r["master_port"]) for r in recs} == {("localhost", 15000 + job_id % 10000)}


def test_mpich_like_env():
    port = free_port()
    recs = start_ranks(lambda r: base_env(PMI_RANK=str(r), PMI_SIZE="2", MPI_LOCALRANKID=str(r),
                                          MPI_LOCALNRANKS="2", MASTER_PORT=str(port)))
    check_ranks(recs, "mpich")


# ---- the command each wrapper builds, with stand-in tools that print their arguments ----


@pytest.fixture
def fake_tools(tmp_path):
    """torchrun, mpirun and deepspeed that print argv and DS_ACCELERATOR as JSON; a failing nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("torchrun", "mpirun", "deepspeed"):
        f = bin_dir / tool
        f.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                     "print(json.dumps({'argv': sys.argv[1:], 'ds': os.environ.get('DS_ACCELERATOR'), "
                     "'addr': os.environ.get('MASTER_ADDR'), 'port': os.environ.get('MASTER_PORT')}))\n")
        f.chmod(0o755)
    smi = bin_dir / "nvidia-smi"  # a machine without GPUs, even where there is one
    smi.write_text("#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    env = base_env()
    del env["DS_ACCELERATOR"]
    # only the stand-ins, bash and coreutils: no real launcher
    plain = [d for d in env["PATH"].split(os.pathsep) if d in ("/usr/bin", "/bin")]
    env["PATH"] = os.pathsep.join([str(bin_dir), *plain])
    return env


def fake_run(script: str, env: dict, *args: str) -> dict:
    proc = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_default_entry_is_the_cli(fake_tools):
    got = fake_run("torchrun.sh", fake_tools, "train", "configs/tiny.yaml")
    assert got["argv"] == ["--nproc_per_node", "1", "--nnodes", "1", "--node_rank", "0", "--master_addr",
                           "127.0.0.1", "--master_port", "29500", "-m", "moedist.cli", "train", "configs/tiny.yaml"]
    env = dict(fake_tools, NPROC="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="1234",
               TORCHRUN_ARGS="--max-restarts 1")
    got = fake_run("torchrun.sh", env, "train", "c.yaml")
    assert got["argv"] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr", "node0",
                           "--master_port", "1234", "--max-restarts", "1", "-m", "moedist.cli", "train", "c.yaml"]
    got = fake_run("torchrun.sh", dict(fake_tools, MOEDIST_ENTRY="-m pkg.train"), "x")
    assert got["argv"][-3:] == ["-m", "pkg.train", "x"]


def test_mpirun_command_and_hostfile(fake_tools, tmp_path):
    got = fake_run("mpirun.sh", dict(fake_tools, PYTHON="py"), "train", "c.yaml")
    assert got["argv"] == ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", "1", "-x",
                           "MASTER_ADDR", "-x", "MASTER_PORT", "py", "-m", "moedist.cli", "train", "c.yaml"]
    assert (got["addr"], got["port"]) == ("127.0.0.1", "29500")
    hosts = tmp_path / "hosts"
    hosts.write_text("# nodes\nnode7 slots=4\nnode8 slots=4\n")
    got = fake_run("mpirun.sh", dict(fake_tools, PYTHON="py", NPROC="8", HOSTFILE=str(hosts), MPIRUN_BIND="socket"),
                   "t")
    assert got["argv"][:8] == ["--allow-run-as-root", "--oversubscribe", "--bind-to", "socket", "-n", "8",
                               "--hostfile", str(hosts)]
    assert got["addr"] == "node7"


def test_deepspeed_command_cpu_default_and_hostfile(fake_tools, tmp_path):
    got = fake_run("deepspeed.sh", fake_tools, "train", "c.yaml")
    assert got["ds"] == "cpu"  # no GPU visible
    assert got["argv"] == ["--num_gpus", "1", "--master_port", "29500", "--master_addr", "127.0.0.1",
                           "--module", "moedist.cli", "train", "c.yaml"]
    hosts = tmp_path / "hostfile"
    hosts.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    got = fake_run("deepspeed.sh", dict(fake_tools, HOSTFILE=str(hosts), NPROC="2", NNODES="2",
                                        MOEDIST_ENTRY="s.py", DS_ACCELERATOR="cuda"), "a")
    assert got["ds"] == "cuda"
    assert got["argv"] == ["--num_gpus", "2", "--master_port", "29500", "--hostfile", str(hosts), "--no_ssh_check",
                           "--master_addr", "worker-0", "--num_nodes", "2", "s.py", "a"]


@pytest.mark.parametrize("script", ["torchrun.sh", "mpirun.sh", "deepspeed.sh"])
def test_script_style(script):
    text = (ROOT / "launch" / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text and '"$@"' in text
    assert f"#   launch/{script} train configs/" in text  # the command a user types
    assert os.access(ROOT / "launch" / script, os.X_OK)
