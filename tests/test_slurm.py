"""The sbatch scripts in slurm/ run for real on a local one-node SLURM cluster."""
import json
import os
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurm, missing_binaries

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.fail(f"SLURM binaries missing ({', '.join(missing)}): install slurm-wlm and munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.fail("the local SLURM cluster test needs root")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def _json_lines(path: Path) -> list:
    return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")]


def test_sbatch_two_tasks_join_one_group(slurm, tmp_path):
    out = tmp_path / "job.out"
    env = {"MOEDIST_ENTRY": "tests/scripts/dist_smoke.py", "MOEDIST_PYTHON": sys.executable, "MOEDIST_ROOT": str(ROOT)}
    res = slurm.sbatch_wait(["--ntasks=2", f"--output={out}", str(ROOT / "slurm" / "train.sbatch")], env)
    text = out.read_text() if out.exists() else ""
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{text}\n{slurm.logs()}"
    rows = sorted(_json_lines(out), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1], text
    for r in rows:
        assert r["world_size"] == 2 and r["launcher"] == "slurm"
        assert r["all_reduce"] == 3.0  # ranks contribute 1 + 2
        # rank r receives split(j, r) = j + 2r + 1 rows from each j, row i = 1000 j + 100 r + i
        want = [1000.0 * j + 100.0 * r["rank"] + i for j in range(2) for i in range(j + 2 * r["rank"] + 1)]
        assert r["recv"] == want


def test_sbatch_multinode_script_runs_torchrun(slurm, tmp_path):
    out = tmp_path / "mn.out"
    env = {"MOEDIST_ENTRY": "tests/scripts/dist_smoke.py", "MOEDIST_PYTHON": sys.executable,
           "MOEDIST_ROOT": str(ROOT), "NPROC_PER_NODE": "2"}
    res = slurm.sbatch_wait(["--nodes=1", f"--output={out}", str(ROOT / "slurm" / "train_multinode.sbatch")], env)
    text = out.read_text() if out.exists() else ""
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{text}\n{slurm.logs()}"
    rows = sorted(_json_lines(out), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1], text
    assert all(r["world_size"] == 2 and r["launcher"] == "torchrun" and r["all_reduce"] == 3.0 for r in rows)
