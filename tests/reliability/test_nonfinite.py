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


def test_deepspeed_zero0_skip_is_refused(tmp_path, capsys):
    d = cfg_dict(tmp_path / "run", train={"nonfinite": "skip"}, deepspeed={"enabled": True, "zero_stage": 0})
    rc, err = _cli(["train", *overrides(d)], capsys)
    assert rc == 2 and "train.nonfinite='skip': needs deepspeed.zero_stage >= 1" in err


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_skip_drops_the_update(tmp_path, stage):
    """ZeRO-2/3: a NaN loss at step 2 with skip leaves the weights exactly where step 1 put them
    (each run in its own process: DeepSpeed keeps process groups per process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ds = {"enabled": True, "zero_stage": stage}
    root = str(Path(__file__).resolve().parents[2])

    def run(out, nan_step, **train):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOEDIST_TEST_")}
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=root)
        if nan_step:
            env["MOEDIST_TEST_NAN_STEP"] = nan_step
        res = subprocess.run([sys.executable, "-m", "moedist", "train",
                              *overrides(cfg_dict(out, train=train, deepspeed=ds))],
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    run(tmp_path / "one", None, max_steps=1)
    res = run(tmp_path / "two", "2", nonfinite="skip", max_steps=2)
    assert "update skipped on every rank" in res.stderr
    recs = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, True] and recs[-1]["skipped_steps"] == 1
    one, two = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_stop_names_first_parameter(tmp_path, stage):
    """ZeRO-2/3 on 2 gloo processes (EP=2): DeepSpeed reduces gradients away from p.grad and zeroes
    them after an invalid norm; the runner's gradient hooks still name the planted parameter."""
    from tests.reliability._runs import free_port, start

    d = cfg_dict(tmp_path / "run", train={"save_every": 1},
                 deepspeed={"enabled": True, "zero_stage": stage}, parallel={"ep_size": 2})
    port = free_port()
    env = {"MOEDIST_TEST_NAN_STEP": f"3:{PARAM}"}
    procs = [start(["train", *overrides(d)], rank=r, world=2, port=port, env=env) for r in range(2)]
    outs = [finish(p, timeout=240) for p in procs]
    want = (f"moedist: error: train.nonfinite=stop: step 3: the gradient of {PARAM} is non-finite "
            "(NaN/Inf; the first such parameter); nothing was saved for this step (set "
            "train.nonfinite=skip to drop such steps)")
    for rc, out in outs:
        assert rc == 2 and "Traceback" not in out, out[-3000:]
    lines = [x for x in outs[0][1].splitlines() if x.startswith("moedist: error:")]
    assert lines == [want], outs[0][1][-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000002"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
@pytest.mark.parametrize("where", [0, 1234, -1])
def test_has_nonfinite_agrees_with_isfinite_elementwise(dtype, bad, where):
    """The one-reduction test (sum non-finite) against the elementwise definition, with one bad value at
    the start, the middle or the end, and none; also opposite infinities (their sum is NaN)."""
    from moedist.train.nonfinite import has_nonfinite

    g = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    if bad is not None:
        g[where] = bad
    assert bool(has_nonfinite(g)) == (not bool(torch.isfinite(g).all()))
    g2 = torch.zeros(8, dtype=dtype)
    g2[1], g2[5] = float("inf"), -float("inf")
    assert bool(has_nonfinite(g2))
