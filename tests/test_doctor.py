"""`moedist doctor` under each launcher: facts, per-rank rows, timed collectives and a verdict.

Runs it as a single process, under `torchrun --nproc_per_node 2` and `mpirun -np 2`, and
checks the verdict rows (`check all_reduce  ok  ... algbw X GB/s, busbw Y GB/s`), that the
numbers parse and that it exits 0; then cases that must fail with a FAIL row and exit 1:
a peer that never comes (rank 0 of a world of 2 alone), a master nobody listens on, and an
all-reduce that delivers a wrong sum.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from moedist.distributed import doctor
from moedist.distributed.launch_env import DistEnv
from tests._dist import free_port
from tests.test_launchers import VENV_BIN, base_env

ROOT = Path(__file__).resolve().parents[1]
CHECK = re.compile(r"^check (\w+)\s{2,}(ok|FAIL)\s{2,}(.*)$")
NUMBERS = re.compile(r"float32 x (\d+) \(([\d.]+) MiB\), (\d+) iters, ([\d.]+) ms/iter, "
                     r"algbw ([\d.]+|inf) GB/s, busbw ([\d.]+|inf) GB/s$")


def rows(text: str) -> dict:
    """`key  value` rows of doctor's output; lines from other processes (warnings) are ignored."""
    out = {}
    for line in text.splitlines():
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(parts) == 2 and not line.startswith(" "):
            out.setdefault(parts[0], parts[1])
    return out


def checks(text: str) -> dict:
    return {m.group(1): (m.group(2), m.group(3)) for m in map(CHECK.match, text.splitlines()) if m}


def doctor_run(cmd: list, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=base_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def assert_healthy(res: subprocess.CompletedProcess, launcher: str, world: int) -> dict:
    text = res.stdout
    assert res.returncode == 0, text[-3000:] + res.stderr[-3000:]
    r = rows(text)
    assert r["launcher"] == launcher
    assert r["world size"] == str(world) and r["local world size"] == str(world)
    assert r["torch"].startswith("2.13.0") and r["deepspeed"] != "not installed"
    for key in ("cuda version", "nccl", "mpi", "interface", "backend"):
        assert r[key], key
    for rank in range(world):
        assert re.fullmatch(rf"host \S+, local rank {rank}/{world}, interface .+", r[f"rank {rank}"])
    found = checks(text)
    assert set(found) == {"all_reduce", "all_to_all"}, text
    for name, (verdict, detail) in found.items():
        assert verdict == "ok", (name, detail)
        m = NUMBERS.match(detail)
        assert m, detail
        numel, mib, iters, ms, algbw, busbw = m.groups()
        assert int(numel) * 4 / 2**20 == pytest.approx(float(mib), abs=0.01)
        assert int(iters) == 5 and float(ms) > 0 and float(algbw) > 0
        assert (float(busbw) == 0) == (world == 1)
    assert r["verdict"] == "ok"
    return r


def test_single_process():
    res = doctor_run([sys.executable, "-m", "moedist", "doctor", "--timeout-s", "30"])
    r = assert_healthy(res, "single", 1)
    assert r["interface"].startswith("none (single process")


def test_torchrun_two_processes():
    res = doctor_run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                      "-m", "moedist", "doctor", "--timeout-s", "30"])
    r = assert_healthy(res, "torchrun", 2)
    assert r["interface"].startswith("lo (routes to MASTER_ADDR=")


def test_mpirun_two_processes():
    res = doctor_run([str(VENV_BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                      "-np", "2", "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "GLOO_SOCKET_IFNAME",
                      sys.executable, "-m", "moedist", "doctor", "--timeout-s", "30"],
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
    r = assert_healthy(res, "openmpi", 2)
    assert r["master"].startswith("127.0.0.1:")
    assert r["interface"] == "lo (from GLOO_SOCKET_IFNAME)"
    assert r["mpi"].startswith("mpirun (Open MPI)")


@pytest.mark.parametrize("rank", [0, 1], ids=["peer_never_comes", "master_unreachable"])
def test_unreachable_peer_fails_within_the_timeout(rank):
    res = doctor_run([sys.executable, "-m", "moedist", "doctor", "--timeout-s", "3"], timeout=60,
                     RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    r = rows(res.stdout)
    assert r["check init_process_group"].startswith(f"FAIL  rank {rank}: ")
    assert "timeout 3s" in r["check init_process_group"]
    assert r["verdict"] == "FAIL"


def test_wrong_all_reduce_result_fails(monkeypatch, capsys):
    import torch.distributed as dist
    real = dist.all_reduce

    def off_by_one(tensor, op=dist.ReduceOp.SUM, **kw):     # a broken fabric: sums come back wrong
        work = real(tensor, op=op, **kw)
        if op == dist.ReduceOp.SUM:
            tensor.add_(1)
        return work

    monkeypatch.setattr(dist, "all_reduce", off_by_one)
    assert doctor.main(["--timeout-s", "30", "--size-mb", "0.01", "--iters", "1"]) == 1
    out = capsys.readouterr().out
    found = checks(out)
    assert found["all_reduce"][0] == "FAIL" and found["all_to_all"][0] == "ok"
    assert "all_reduce gave 2..., expected 1" in out
    assert rows(out)["verdict"] == "FAIL"


def test_interface_choice():
    env2 = DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, launcher="torchrun",
                   master_addr="127.0.0.1", master_port=29500)
    assert doctor.chosen_interface({"GLOO_SOCKET_IFNAME": "eth7"}, env2, "gloo") == "eth7 (from GLOO_SOCKET_IFNAME)"
    assert doctor.chosen_interface({"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "eth7"}, env2,
                                   "nccl") == "ib0 (from NCCL_SOCKET_IFNAME)"
    assert doctor.chosen_interface({}, env2, "gloo") == "lo (routes to MASTER_ADDR=127.0.0.1)"
    single = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")
    assert doctor.chosen_interface({}, single, "gloo").startswith("none")


def test_bad_arguments_exit_2(capsys):
    assert doctor.main(["--iters", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
