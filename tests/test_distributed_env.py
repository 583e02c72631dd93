"""Launcher detection (pure, one env per launcher) and init_distributed in real processes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moedist.distributed import DistEnv, detect_launch_env, expand_nodelist, init_distributed
from moedist.distributed.launch_env import _tasks_on_node
from tests._dist import free_port, run_workers

ROOT = Path(__file__).resolve().parents[1]

# What each launcher really sets (torchrun and deepspeed copied from their launch code,
# Open MPI / MPICH / SLURM from their documentation), for rank 3 of 8 on two nodes.
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none",
            "TORCHELASTIC_RESTART_COUNT": "0"}
DEEPSPEED = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_SIZE": "4", "CROSS_RANK": "0",
             "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "node0", "MASTER_PORT": "29501"}
MPICH = {"PMI_RANK": "3", "PMI_SIZE": "8", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4",
         "MASTER_ADDR": "node0"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}


def env_of(d: DistEnv) -> tuple:
    return (d.rank, d.world_size, d.local_rank, d.local_world_size, d.launcher, d.master_addr, d.master_port)


@pytest.mark.parametrize("environ, expected", [
    (TORCHRUN, (3, 8, 3, 4, "torchrun", "node0", 29400)),
    (DEEPSPEED, (3, 8, 3, 4, "deepspeed", "10.0.0.1", 29500)),
    (OPENMPI, (3, 8, 3, 4, "openmpi", "node0", 29501)),
    (MPICH, (3, 8, 3, 4, "mpich", "node0", 29500)),
    (SLURM, (5, 8, 1, 4, "slurm", "gpu07", 15000 + 4242)),
    ({}, (0, 1, 0, 1, "single", "", 0)),
    ({"PATH": "/usr/bin", "HOME": "/root"}, (0, 1, 0, 1, "single", "", 0)),
])
def test_detect_each_launcher(environ, expected):
    d = detect_launch_env(environ)
    assert env_of(d) == expected
    assert d.backend is None


def test_bare_rank_world_defaults_to_one_node_and_localhost():
    d = detect_launch_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert env_of(d) == (1, 2, 1, 2, "env", "127.0.0.1", 29500)


def test_single_node_mpi_defaults_master_to_localhost():
    d = detect_launch_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert env_of(d) == (1, 2, 1, 2, "openmpi", "127.0.0.1", 29500)
    d = detect_launch_env({"PMI_RANK": "0", "PMI_SIZE": "3"})  # no local ids: one node
    assert env_of(d) == (0, 3, 0, 3, "mpich", "127.0.0.1", 29500)


def test_multi_node_mpi_without_master_addr_fails():
    env = {k: v for k, v in OPENMPI.items() if k != "MASTER_ADDR"}
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        detect_launch_env(env)


def test_precedence_nested_launchers():
    # srun ... torchrun: torchrun's variables win over SLURM's
    assert detect_launch_env({**SLURM, **TORCHRUN}).launcher == "torchrun"
    # mpirun inside an sbatch job
    assert detect_launch_env({**SLURM, **OPENMPI}).launcher == "openmpi"
    assert detect_launch_env({**SLURM, **MPICH}).launcher == "mpich"
    assert detect_launch_env({**OPENMPI, **MPICH}).launcher == "openmpi"


def test_slurm_master_from_resolver_env_or_parser():
    assert detect_launch_env(SLURM, resolve_hostnames=lambda nl: ["head-node", "other"]).master_addr == "head-node"
    assert detect_launch_env(SLURM, resolve_hostnames=lambda nl: None).master_addr == "gpu07"
    d = detect_launch_env({**SLURM, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "1234"})
    assert (d.master_addr, d.master_port) == ("10.1.1.1", 1234)
    no_job = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}
    assert detect_launch_env(no_job).master_port == 29500
    assert detect_launch_env({**SLURM, "SLURM_JOB_ID": "123456789"}).master_port == 15000 + 6789
    # no tasks-per-node: one node assumed
    one = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "localhost"}
    assert env_of(detect_launch_env(one)) == (1, 2, 1, 2, "slurm", "localhost", 29500)
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("environ, names", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3"),
    # issue 12: LOCAL_WORLD_SIZE=0 was a ZeroDivisionError (rank % 0) before the range check
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE=0"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "-2"}, "LOCAL_WORLD_SIZE=-2"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "two"}, "LOCAL_WORLD_SIZE='two'"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1.5"}, "LOCAL_WORLD_SIZE='1.5'"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "0", "CROSS_RANK": "0"}, "LOCAL_SIZE=0"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK=1"),
    ({"RANK": "5", "WORLD_SIZE": "4"}, "RANK=5"),
    ({"RANK": "0", "WORLD_SIZE": "-3"}, "WORLD_SIZE=-3"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "0"}, "MASTER_PORT=0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "0"},
     "OMPI_COMM_WORLD_LOCAL_SIZE=0"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "0"}, "MPI_LOCALNRANKS=0"),
    ({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "0(x2)"}, "SLURM_STEP_TASKS_PER_NODE=0"),
    ({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "4"}, "SLURM_STEP_TASKS_PER_NODE='4' gives no task count "
                                                   "for SLURM_NODEID=1"),
    ({**SLURM, "SLURM_NODEID": "one"}, "SLURM_NODEID='one'"),
    ({**SLURM, "SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID='abc'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_RANK=4"),
    ({"PMI_RANK": "0"}, "PMI_SIZE"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2"}, "SLURM_PROCID=3"),
])
def test_inconsistent_env_names_the_variable(environ, names):
    with pytest.raises(ValueError, match=re.escape(names)) as info:
        detect_launch_env(environ)
    assert "\n" not in str(info.value)  # one line


def test_bad_launcher_env_is_one_line_from_the_cli(tmp_path):
    """`moedist train` under a broken launcher env: exit 2, one line naming the variable, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_"))}
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="0")
    res = subprocess.run([sys.executable, "-m", "moedist", "train", str(ROOT / "configs/tiny.yaml"),
                          f"train.output_dir={tmp_path / 'out'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "moedist: error: launcher environment: LOCAL_WORLD_SIZE=0 (processes on this node) must be in 1..2 "
        "(WORLD_SIZE=2)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("host[1-3,5]", ["host1", "host2", "host3", "host5"]),
    ("node[001-003]", ["node001", "node002", "node003"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("r[1-2]n[8-9]", ["r1n8", "r1n9", "r2n8", "r2n9"]),
    ("gpu[09-11]-ib", ["gpu09-ib", "gpu10-ib", "gpu11-ib"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "host[1-3", "host]1[", "host[3-1]", "host[a-b]", "h[[1]]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(bad)


def test_tasks_per_node_forms():
    assert [_tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert _tasks_on_node("4", 0) == 4
    assert _tasks_on_node("4", 1) is None
    assert _tasks_on_node("weird", 0) is None


# ---- init_distributed in this process (world size 1) and in 2 real processes ----------

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; the whole environment is restored afterwards (init_distributed
    exports variables for MPI launches, which monkeypatch alone would not undo)."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k in LAUNCH_VARS or k.startswith(("OMPI_", "PMI_", "MPI_LOCAL", "SLURM_")):
            monkeypatch.delenv(k)
    try:
        yield monkeypatch
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def test_init_single_process_has_working_group_and_is_idempotent(clean_env):
    before = dict(os.environ)
    env = init_distributed(backend="gloo", timeout_s=30)
    assert env_of(env) == (0, 1, 0, 1, "single", "", 0) and env.backend == "gloo"
    assert dist.is_initialized() and dist.get_world_size() == 1
    t = torch.tensor([2.0])
    dist.all_reduce(t)
    assert t.item() == 2.0
    assert dict(os.environ) == before  # a single process exports nothing
    again = init_distributed()
    assert again == env


def test_init_under_mpi_env_exports_torch_style_vars(clean_env):
    port = free_port()
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "0")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "1")
    clean_env.setenv("MASTER_PORT", str(port))
    env = init_distributed(backend="gloo", timeout_s=30)
    assert env_of(env) == (0, 1, 0, 1, "openmpi", "127.0.0.1", port)
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                       "MASTER_PORT")} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port)}
    assert dist.get_world_size() == 1


def test_init_rejects_bad_arguments(clean_env):
    with pytest.raises(ValueError, match="timeout_s"):
        init_distributed(timeout_s=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl"):
            init_distributed(backend="nccl")
    assert not dist.is_initialized()


@pytest.mark.gpu
def test_init_single_process_nccl_sets_device(clean_env):
    env = init_distributed(timeout_s=60)
    assert env.backend == "nccl" and torch.cuda.current_device() == 0
    t = torch.ones(1, device="cuda")
    dist.all_reduce(t)
    assert t.item() == 1.0


def _worker_preinitialized(rank, world_size):
    # run_workers initialised the group from RANK/WORLD_SIZE/LOCAL_RANK: init_distributed adopts it
    env = init_distributed()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    os.environ["RANK"] = "7"  # an environment that contradicts the group: the group wins
    odd = init_distributed()
    return env_of(env), env.backend, t.item(), env_of(odd)


def test_init_adopts_existing_group_in_two_processes():
    out = run_workers(_worker_preinitialized, world_size=2)
    for rank, (env, backend, total, odd) in enumerate(out):
        assert env[:5] == (rank, 2, rank, 2, "env")
        assert backend == "gloo" and total == 3.0
        assert odd[:5] == (rank, 2, rank, 2, "preinitialized")
