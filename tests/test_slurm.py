"""The sbatch scripts in slurm/ run for real on a local one-node SLURM cluster.

`slurm/train.sbatch` trains `configs/tiny.yaml` at EP=2 on 2 srun tasks; its losses must equal
one plain process with twice the gradient accumulation (the same global batch). The same job
requeued (`scontrol requeue`) after its first checkpoint resumes with `train.resume=auto` and
ends with the same final weights as the uninterrupted run. `slurm/train_multinode.sbatch`
(torchrun under srun, c10d rendezvous) trains the same job on one node with 2 processes.
The smoke script (tests/scripts/dist_smoke.py) checks rank/world wiring and collectives.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moedist.train.metrics import read_metrics
from tests.slurm_cluster import LocalSlurm, missing_binaries

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS = 40
SAVE_EVERY = 5
# Small enough for 2 CPU cores, long enough (a few seconds) to requeue a running job.
COMMON = ["model.hidden_size=32", "model.ffn_size=48", "data.seq_len=32", "model.max_seq_len=32",
          "train.micro_batch_size=2", f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}",
          "train.plot=false", "train.eval_batches=1",
          "moe.capacity_factor=null"]  # dropless: no capacity cut-off to flip on 1e-7 noise over 40 steps
TRAIN = ["train", "configs/tiny.yaml", "parallel.ep_size=2", *COMMON]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.fail(f"SLURM binaries missing ({', '.join(missing)}): run `bash .ci/system-deps` (installs slurm-wlm, munge)")
    if os.geteuid() != 0:
        pytest.fail("the local SLURM cluster test needs root")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def _job_env(**extra) -> dict:
    return {"MOEDIST_PYTHON": sys.executable, "MOEDIST_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _json_lines(path: Path) -> list:
    return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")]


def _final_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run / "final").glob("*.safetensors")):
        if not f.name.startswith("rng"):
            out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory):
    """The reference: one plain process, grad_accum=2 (the 2-task job's global batch)."""
    out = tmp_path_factory.mktemp("one") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, "-m", "moedist.cli", "train", "configs/tiny.yaml", *COMMON,
                          "train.grad_accum=2", f"train.output_dir={out}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def sbatch_run(slurm, tmp_path_factory):
    """`sbatch -W --ntasks=2 slurm/train.sbatch train configs/tiny.yaml parallel.ep_size=2 ...`, uninterrupted."""
    folder = tmp_path_factory.mktemp("sbatch")
    run, log = folder / "run", folder / "job.out"
    res = slurm.sbatch_wait(["--ntasks=2", f"--output={log}", str(ROOT / "slurm" / "train.sbatch"),
                             *TRAIN, f"train.output_dir={run}"], _job_env())
    return res, run, log


def test_sbatch_trains_two_tasks_with_one_process_losses(slurm, sbatch_run, one_process_losses):
    res, run, log = sbatch_run
    text = log.read_text() if log.exists() else ""
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{text[-4000:]}\n{slurm.logs()}"
    assert "2 rank(s), EP 2 x EDP 1" in text
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert all(r["tokens"] == 2 * 2 * 32 for r in recs)  # both tasks contributed to every step
    assert [r["loss"] for r in recs] == pytest.approx(one_process_losses, rel=1e-5)
    manifest = json.loads((run / "final" / "manifest.json").read_text())
    assert manifest and (run / "checkpoints" / "latest").exists()
    assert sorted(p.name for p in (run / "final").glob("model-experts-*.safetensors"))  # experts saved


def _job_state(slurm, job: str) -> str:
    out = slurm._run("scontrol", "show", "job", job, check=False).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "GONE"


def test_requeued_sbatch_job_resumes_to_the_same_final_weights(slurm, sbatch_run, tmp_path):
    res, ref_run, _ = sbatch_run
    assert res.returncode == 0
    run, log = tmp_path / "run", tmp_path / "job.out"
    env = dict(slurm.env, **_job_env())
    sub = subprocess.run(["sbatch", "--parsable", "--ntasks=2", f"--output={log}",
                          str(ROOT / "slurm" / "train.sbatch"), *TRAIN, f"train.output_dir={run}",
                          "train.resume=auto"], env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]

    def wait_for(pred, what, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return
            time.sleep(0.1)
        log_text = log.read_text()[-4000:] if log.exists() else ""
        raise AssertionError(f"timed out waiting for {what} (state {_job_state(slurm, job)})\n{log_text}\n{slurm.logs()}")

    # Requeue once the first periodic checkpoint exists, while steps remain to train.
    wait_for(lambda: (run / "checkpoints" / "latest").exists(), "the first checkpoint")
    done = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    assert _job_state(slurm, job) == "RUNNING" and len(done) < STEPS, "job finished before the requeue"
    slurm._run("scontrol", "requeue", job)
    wait_for(lambda: _job_state(slurm, job) == "PENDING", "the requeue (state PENDING)", 60)
    # A requeued job waits ~120 s (BeginTime) unless told to start now.
    slurm._run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    seen = []  # the job record is purged MinJobAge (6 s) after the end: keep the last state polled
    wait_for(lambda: seen.append(_job_state(slurm, job)) or seen[-1] in ("COMPLETED", "FAILED", "CANCELLED",
                                                                           "TIMEOUT", "NODE_FAIL", "GONE"), "the end")
    text = log.read_text()
    assert seen[-1] == "COMPLETED", f"{seen[-1]}\n{text[-4000:]}\n{slurm.logs()}"
    assert "restart 1" in text  # the script's banner of the second run
    recs = read_metrics(run / "metrics.jsonl")
    assert recs[-1]["step"] == STEPS
    ref, got = _final_tensors(ref_run), _final_tensors(run)
    assert ref.keys() == got.keys() and ref
    for name, t in ref.items():
        assert got[name].shape == t.shape and (got[name] - t).abs().max().item() <= 1e-5 * (1 + t.abs().max().item()), name


def test_sbatch_multinode_script_trains_under_torchrun(slurm, sbatch_run, tmp_path):
    res, ref_run, _ = sbatch_run
    run, log = tmp_path / "run", tmp_path / "mn.out"
    res = slurm.sbatch_wait(["--nodes=1", f"--output={log}", str(ROOT / "slurm" / "train_multinode.sbatch"),
                             *TRAIN, f"train.output_dir={run}"], _job_env(NPROC_PER_NODE="2"))
    text = log.read_text() if log.exists() else ""
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{text[-4000:]}\n{slurm.logs()}"
    assert "2 rank(s), EP 2 x EDP 1" in text
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    ref = [r["loss"] for r in read_metrics(ref_run / "metrics.jsonl")]
    assert [r["loss"] for r in recs] == pytest.approx(ref, rel=1e-5)  # srun tasks or torchrun: same numbers
    assert (run / "final" / "manifest.json").exists()


def test_sbatch_two_tasks_join_one_group(slurm, tmp_path):
    out = tmp_path / "job.out"
    env = _job_env(MOEDIST_ENTRY="tests/scripts/dist_smoke.py")
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
