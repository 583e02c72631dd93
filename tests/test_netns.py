"""Two "hosts" on one machine (network namespaces + a veth pair, tests/netns.py) train as two nodes.

One process per "node", EP=2 over the veth: `torchrun --nnodes 2` with c10d rendezvous on the
first namespace's address, `launch/torchrun.sh` with NNODES/NODE_RANK (static rendezvous), and
`launch/deepspeed.sh` with a hostfile naming both addresses in
DeepSpeed's no-ssh multi-node mode (`NODE_RANK` -> `--no_ssh --node_rank`). Each must give the
losses of the same job as 2 processes on one node (torchrun --standalone) to 1e-5. Every
namespace and link made is deleted again (checked at the end of the module).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moedist.train.metrics import read_metrics
from tests._dist import free_port
from tests.netns import TwoHosts, missing_requirements

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 6
TRAIN = ["train", "configs/tiny.yaml", "parallel.ep_size=2", "model.hidden_size=32", "model.ffn_size=48",
         "data.seq_len=32", "model.max_seq_len=32", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
         "train.save_every=3", "train.plot=false", "train.eval_batches=1"]
VENV_BIN = str(Path(sys.executable).parent)


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHON=sys.executable,
               PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        if var not in extra:
            env.pop(var, None)
    return env


def _losses(run: Path) -> list:
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    return [r["loss"] for r in recs]


def _run_pair(cmds: list, envs: list, timeout: float = 240) -> list:
    """Start both "nodes" at once, wait for both; returns [(rc, output)] (a hung peer is killed)."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c, e in zip(cmds, envs)]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            text, _ = p.communicate()
            text += "\n[killed: timed out]"
        out.append((p.returncode, text))
    return out


@pytest.fixture(scope="module")
def hosts():
    why = missing_requirements()
    if why:
        pytest.fail(why)
    with TwoHosts() as h:
        yield h
    assert h.leftovers() == [], "namespaces/links left behind"


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory):
    """The same job as 2 processes on one node (the reference)."""
    run = tmp_path_factory.mktemp("one_node") / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "moedist.cli", *TRAIN, f"train.output_dir={run}"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return _losses(run)


def test_torchrun_two_namespaces_c10d_rendezvous(hosts, one_node_losses, tmp_path):
    run, port = tmp_path / "run", free_port()
    endpoint = f"{hosts.addr[0]}:{port}"
    cmds, envs = [], []
    for i in (0, 1):
        # c10d across hosts needs all three: is_host on the store's node, --local_addr, GLOO_SOCKET_IFNAME
        cmds.append(hosts.wrap(i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                   "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                                   "--rdzv_id", f"netns{port}", "--rdzv_conf", f"is_host={int(i == 0)}",
                                   "--local_addr", hosts.addr[i], "-m", "moedist.cli", *TRAIN,
                                   f"train.output_dir={run}"]))
        envs.append(_env(GLOO_SOCKET_IFNAME=hosts.ifname[i], MASTER_ADDR=hosts.addr[0]))
    results = _run_pair(cmds, envs)
    for i, (rc, text) in enumerate(results):
        assert rc == 0, f"node {i} exit {rc}\n{text[-4000:]}"
    assert "2 rank(s), EP 2 x EDP 1" in results[0][1]
    assert _losses(run) == pytest.approx(one_node_losses, rel=1e-5)
    assert (run / "final" / "manifest.json").exists()


def test_launch_torchrun_sh_static_rendezvous_two_namespaces(hosts, one_node_losses, tmp_path):
    """`NNODES=2 NODE_RANK=i MASTER_ADDR=<node 0> launch/torchrun.sh ...` on each node (static rendezvous)."""
    run, port = tmp_path / "run", free_port()
    cmds, envs = [], []
    for i in (0, 1):
        cmds.append(hosts.wrap(i, ["bash", str(ROOT / "launch" / "torchrun.sh"), *TRAIN, f"train.output_dir={run}"]))
        envs.append(_env(NPROC="1", NNODES="2", NODE_RANK=str(i), MASTER_ADDR=hosts.addr[0], MASTER_PORT=str(port),
                         GLOO_SOCKET_IFNAME=hosts.ifname[i]))
    results = _run_pair(cmds, envs)
    for i, (rc, text) in enumerate(results):
        assert rc == 0, f"node {i} exit {rc}\n{text[-4000:]}"
    assert _losses(run) == pytest.approx(one_node_losses, rel=1e-5)


def test_deepspeed_launcher_hostfile_no_ssh_two_namespaces(hosts, one_node_losses, tmp_path):
    run, port = tmp_path / "run", free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{hosts.addr[0]} slots=1\n{hosts.addr[1]} slots=1\n")
    cmds, envs = [], []
    for i in (0, 1):
        cmds.append(hosts.wrap(i, ["bash", str(ROOT / "launch" / "deepspeed.sh"), *TRAIN, f"train.output_dir={run}"]))
        envs.append(_env(HOSTFILE=str(hostfile), NODE_RANK=str(i), NPROC="1", MASTER_PORT=str(port),
                         GLOO_SOCKET_IFNAME=hosts.ifname[i]))
    results = _run_pair(cmds, envs)
    for i, (rc, text) in enumerate(results):
        assert rc == 0, f"node {i} exit {rc}\n{text[-4000:]}"
    assert "2 rank(s), EP 2 x EDP 1" in results[0][1]
    assert _losses(run) == pytest.approx(one_node_losses, rel=1e-5)
    assert (run / "final" / "manifest.json").exists()
