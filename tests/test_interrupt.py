"""Ctrl-C (issue 17, Deliver 4): SIGINT finishes the step, saves (train.save_on_interrupt), prints one line
with the step, the checkpoint and the resume command, writes the summary, and exits 130; resume names the
checkpoint and warns in one line about a changed LR schedule. Real processes, real signals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_ep_launch import _clean_env, free_port

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["configs/tiny.yaml", "train.max_steps=100000", "train.warmup_steps=1", "train.eval_batches=1",
        "train.micro_batch_size=2", "data.seq_len=32", "model.max_seq_len=32", "train.log_every=1"]


def _start(cmd, out):
    return subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_steps(proc, out: Path, n: int, limit: float = 90.0):
    t0 = time.time()
    while time.time() - t0 < limit:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1][-3000:])
        time.sleep(0.2)
    raise AssertionError("training did not start")


def _interrupt(proc, out, group=False):
    _wait_steps(proc, out, 2)
    if group:  # what a terminal does: the whole foreground process group gets SIGINT
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


def test_ctrl_c_saves_prints_one_line_and_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = _start([sys.executable, "-m", "moedist", "train", *ARGS, f"train.output_dir={out}"], out)
    rc, stdout, stderr = _interrupt(proc, out)
    assert rc == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("moedist: interrupted at step")]
    assert len(lines) == 1, stderr
    step = int(lines[0].split("at step ")[1].split("/")[0])
    ckpt = out / "checkpoints" / f"step_{step:06d}"
    assert f"saved checkpoint {ckpt}" in lines[0] and (ckpt / "manifest.json").exists()
    assert "train.resume=auto" in lines[0] and f"train.output_dir={out}" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps"] == step
    # resume with the printed command (fewer steps: a changed schedule is one warning line)
    cmd = lines[0].split("resume with: ")[1].split()
    assert cmd[:2] == ["moedist", "train"]
    res = subprocess.run([sys.executable, "-m", "moedist", *cmd[1:], f"train.max_steps={step + 1}", "train.plot=false"],
                         cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed at step {step} from {ckpt}" in res.stdout
    warn = [ln for ln in res.stderr.splitlines() if "learning-rate schedule" in ln]
    assert len(warn) == 1 and f"train.max_steps 100000 -> {step + 1}" in warn[0]


def test_ctrl_c_without_save_on_interrupt(tmp_path):
    out = tmp_path / "run"
    proc = _start([sys.executable, "-m", "moedist", "train", *ARGS, f"train.output_dir={out}",
                   "train.save_on_interrupt=false"], out)
    rc, _, stderr = _interrupt(proc, out)
    assert rc == 130 and "no checkpoint saved" in stderr and "Traceback" not in stderr
    assert not (out / "checkpoints").exists() and (out / "summary.json").exists()


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_on_every_rank(tmp_path):
    out = tmp_path / "run"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = _start([torchrun, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), "-m", "moedist", "train", *ARGS, "parallel.ep_size=2",
                   f"train.output_dir={out}"], out)
    rc, _, stderr = _interrupt(proc, out, group=True)
    assert rc != 0
    lines = [ln for ln in stderr.splitlines() if ln.startswith("moedist: interrupted at step")]
    assert len(lines) == 1, stderr[-3000:]
    step = int(lines[0].split("at step ")[1].split("/")[0])
    assert (out / "checkpoints" / f"step_{step:06d}" / "manifest.json").exists()


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_the_final_plot_still_writes_the_summary(tmp_path, monkeypatch, presses):
    """Ctrl-C while plot.png is drawn (the last thing a run does): once, the plot finishes; twice (a
    deliberate second press raises KeyboardInterrupt inside matplotlib), the summary is already on disk."""
    from moedist.cli import main
    from moedist.train import plot, signals

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(signals, "REPEAT_S", 0.0)
    real = plot.plot_run

    def interrupted_plot(*a, **k):
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        return real(*a, **k)

    monkeypatch.setattr(plot, "plot_run", interrupted_plot)
    out = tmp_path / "run"
    rc = main(["train", *ARGS, "train.max_steps=2", "train.plot=true", f"train.output_dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final"] and (out / "final" / "manifest.json").exists()
    if presses == 1:
        assert rc == 0 and summary["plot"] == str(out / "plot.png") and (out / "plot.png").exists()
    else:
        assert rc == 130
