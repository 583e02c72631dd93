"""train.nonfinite: 'stop' names the step and the first non-finite gradient (or the loss) in one
line; 'skip' drops the update on every rank and counts it (skipped_steps in metrics.jsonl).

NaN comes from the test-only hook MOEDIST_TEST_NAN_STEP=N[:PARAM] (moedist.train.trainer):
the loss of step N, or PARAM's gradient after step N's backward, becomes NaN.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.reliability._runs import cfg_dict, finish, free_port, overrides, start, train_in_process, weights

PARAM = "layers.1.mlp.router.weight"


def _cli(args, capsys):
    from moedist.cli import main

    rc = main(args)
    return rc, capsys.readouterr().err


def test_stop_names_step_and_first_parameter(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEDIST_TEST_NAN_STEP", f"3:{PARAM}")
    d = cfg_dict(tmp_path / "run", train={"save_every": 1})
    rc, err = _cli(["train", *overrides(d)], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert lines[-1] == (f"moedist: error: train.nonfinite=stop: step 3: the gradient of {PARAM} is non-finite "
                         "(NaN/Inf; the first such parameter); nothing was saved for this step (set "
                         "train.nonfinite=skip to drop such steps)"), err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_stop_on_nonfinite_loss(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEDIST_TEST_NAN_STEP", "2")
    rc, err = _cli(["train", *overrides(cfg_dict(tmp_path / "run"))], capsys)
    assert rc == 2 and "train.nonfinite=stop: step 2: the loss is non-finite" in err.strip().splitlines()[-1], err


def test_skip_drops_the_update_and_counts_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDIST_TEST_NAN_STEP", f"2:{PARAM}")
    res = train_in_process(cfg_dict(tmp_path / "run", train={"nonfinite": "skip", "max_steps": 3}))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 1]
    assert [r["skipped"] for r in recs] == [False, True, False]
    assert res.summary["skipped_steps"] == 1
    import math

    assert all(math.isfinite(r["loss"]) for r in recs) and all(math.isfinite(v.abs().sum())
                                                               for v in weights(tmp_path / "run" / "final").values())


def test_deepspeed_skip_is_refused(tmp_path, capsys):
    d = cfg_dict(tmp_path / "run", train={"nonfinite": "skip"}, deepspeed={"enabled": True})
    rc, err = _cli(["train", *overrides(d)], capsys)
    assert rc == 2 and "train.nonfinite='skip': supported by the PyTorch runner only" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_skip_is_consistent_over_two_ranks(tmp_path):
    """NaN on rank 1 only: both ranks skip the same step, finish, and hold identical dense weights."""
    d = cfg_dict(tmp_path / "run", train={"nonfinite": "skip", "max_steps": 3}, parallel={"ep_size": 2})
    port = free_port()
    env = {"MOEDIST_TEST_NAN_STEP": "2", "MOEDIST_TEST_NAN_RANK": "1"}
    procs = [start(["train", *overrides(d)], r, 2, port, env) for r in range(2)]
    outs = [finish(p, timeout=240) for p in procs]
    assert [rc for rc, _ in outs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 1]
    w = weights(tmp_path / "run" / "final")
    assert all(torch.isfinite(v).all() for v in w.values())
