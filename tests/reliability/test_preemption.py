"""Preemption: SIGTERM / SIGUSR1 (what SLURM sends before preempting) make a real `moedist train`
finish the current step, save a checkpoint and exit 0; `train.resume=auto` then ends bit-identical
(losses, gradient norms, final weights) to an uninterrupted run. With 2 processes only rank 1 gets
the signal: the flag is all-reduced before the optimizer step, so both ranks save the same step.
Also: all ranks must resolve the same config (a mismatch stops every rank with one line).
"""
from __future__ import annotations

import copy
import json
import signal

import pytest

from tests.reliability._runs import (cfg_dict, finish, free_port, losses, overrides, start, train_in_process,
                                     wait_for_line, weights)

pytestmark = pytest.mark.timeout(420)
STEPS = 6


def _check_identical(run, ref):
    import torch

    assert losses(run) == losses(ref)
    wa, wb = weights(run / "final"), weights(ref / "final")
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"


def _summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_one_process_signal_saves_and_exits_zero(tmp_path, sig):
    run = tmp_path / "run"
    d = cfg_dict(run, train={"max_steps": STEPS, "save_every": 0})
    proc = start(["train", *overrides(d)])
    head = wait_for_line(proc, "step     2/", timeout=150)
    proc.send_signal(sig)
    rc, out = finish(proc, head)
    assert rc == 0, out[-3000:]
    assert f"received {sig.name}" in out and "preempted" in out, out[-3000:]
    stopped = _summary(run)["steps"]
    assert 2 <= stopped < STEPS and _summary(run)["preempted"] is True
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:06d}"
    assert not (run / "final").exists()
    if sig == signal.SIGUSR1:
        return  # the continuation is checked once (SIGTERM)
    again = copy.deepcopy(d)
    again["train"]["resume"] = "auto"
    train_in_process(again)
    ref = tmp_path / "ref"
    train_in_process(cfg_dict(ref, train={"max_steps": STEPS, "save_every": 0}))
    _check_identical(run, ref)


@pytest.mark.slow
def test_two_processes_signal_one_rank_both_save_same_step(tmp_path):
    run = tmp_path / "run"
    d = cfg_dict(run, train={"max_steps": STEPS, "save_every": 0}, parallel={"ep_size": 2})
    port = free_port()
    procs = [start(["train", *overrides(d)], r, 2, port) for r in range(2)]
    head = wait_for_line(procs[0], "step     2/", timeout=200)
    procs[1].send_signal(signal.SIGTERM)
    (rc0, out0), (rc1, out1) = finish(procs[0], head), finish(procs[1])
    assert (rc0, rc1) == (0, 0), out0[-2000:] + out1[-2000:]
    stopped = _summary(run)["steps"]
    assert 2 <= stopped < STEPS
    ck = run / "checkpoints" / f"step_{stopped:06d}"
    assert (ck / "rng-rank0.safetensors").exists() and (ck / "rng-rank1.safetensors").exists()
    again = copy.deepcopy(d)
    again["train"]["resume"] = "auto"
    port = free_port()
    procs = [start(["train", *overrides(again)], r, 2, port) for r in range(2)]
    outs = [finish(p, timeout=300) for p in procs]
    assert [o[0] for o in outs] == [0, 0], outs[0][1][-2000:]
    ref = tmp_path / "ref"
    d_ref = cfg_dict(ref, train={"max_steps": STEPS, "save_every": 0}, parallel={"ep_size": 2})
    port = free_port()
    procs = [start(["train", *overrides(d_ref)], r, 2, port) for r in range(2)]
    assert [finish(p, timeout=300)[0] for p in procs] == [0, 0]
    _check_identical(run, ref)


@pytest.mark.slow
def test_config_mismatch_stops_every_rank_with_one_line(tmp_path):
    d = cfg_dict(tmp_path / "run", train={"max_steps": 2})
    port = free_port()
    procs = [start(["train", *overrides(d), *(["moe.top_k=1"] if r == 1 else [])], r, 2, port) for r in range(2)]
    (rc0, out0), (rc1, out1) = [finish(p, timeout=200) for p in procs]
    assert (rc0, rc1) == (2, 2), out0[-2000:] + out1[-2000:]
    assert "Traceback" not in out0 + out1
    err = [line for line in out0.splitlines() if line.startswith("moedist: error:")]
    assert err == ["moedist: error: config mismatch: rank 1's resolved config differs from rank 0's "
                   "(moe.top_k: 2 vs 1); every rank must be launched with the same config and overrides"], out0
    assert not [line for line in out1.splitlines() if line.startswith("moedist: error:")]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_difference_is_named():
    from moedist.train.consistency import _first_difference

    assert _first_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == "a.c: 2 vs 3"
    assert _first_difference({"a": 1}, {"a": 1}) == ""
