"""Checkpoint integrity: rotation (train.keep_last), resume=auto falls back past corrupt
checkpoints with a warning naming the bad file, one line when none is good, and a process
SIGKILLed in the middle of a save leaves the previous checkpoint loadable.

The kill uses the test-only hook MOEDIST_TEST_SAVE_PAUSE=<checkpoint name>
(moedist.checkpoint.io): the save sleeps after every file is written and before the
rename, and the test kills the real `moedist train` process there.
"""
from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import pytest

from moedist.checkpoint.io import CorruptCheckpoint, verify_checkpoint
from moedist.train.checkpointing import pick_auto_resume, rotate
from tests.reliability._runs import (cfg_dict, finish, losses, overrides, start, train_in_process, wait_for_line,
                                     weights)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 4-step run that saved every step and kept them all (module-scoped: copied per test)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    train_in_process(cfg_dict(out, train={"save_every": 1, "keep_last": 0}))
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _corrupt(ckpt: Path, name: str = "model-dense.safetensors") -> Path:
    f = ckpt / name
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    return f


def test_keep_last_rotates_but_never_latest_or_final(tmp_path):
    out = tmp_path / "run"
    train_in_process(cfg_dict(out, train={"max_steps": 5, "save_every": 1, "keep_last": 2}))
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_000004", "step_000005"]
    assert (ck / "latest").read_text().strip() == "step_000005"
    assert (out / "final" / "manifest.json").exists()
    # rotate keeps the one `latest` names even when it is older than the kept ones
    for s in (6, 7):
        (ck / f"step_{s:06d}").mkdir()
    (ck / ".tmp-step_000008").mkdir()  # leftover of a killed save
    rotate(str(ck), 1)
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_000005", "step_000007"]
    assert not (ck / ".tmp-step_000008").exists()
    rotate(str(ck), 0)  # 0 = keep all
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_000005", "step_000007"]


def test_keep_last_zero_keeps_all(saved_run):
    assert len(list((saved_run / "checkpoints").glob("step_*"))) == 4


def test_auto_falls_back_to_newest_good_with_a_warning(saved_run, tmp_path, capsys):
    run = _copy(saved_run, tmp_path / "run")
    ck = run / "checkpoints"
    bad4 = _corrupt(ck / "step_000004")
    (ck / "step_000003" / "optim-dense.safetensors").unlink()  # missing file
    with pytest.raises(CorruptCheckpoint, match="SHA-256 mismatch"):
        verify_checkpoint(ck / "step_000004")
    warnings = []
    assert pick_auto_resume(str(ck), warnings.append) == str(ck / "step_000002")
    assert len(warnings) == 2 and str(bad4) in warnings[0] and "optim-dense.safetensors" in warnings[1]
    # through the trainer: resumes at step 2, warns on stderr naming the bad file, finishes the run
    d = cfg_dict(run, train={"resume": "auto", "save_every": 1, "keep_last": 0})
    res = train_in_process(d)
    err = capsys.readouterr().err
    assert f"skipping a corrupt checkpoint: {bad4}: SHA-256 mismatch" in err, err
    assert [r["step"] for r in res.records] == [1, 2, 3, 4]
    assert losses(run) == losses(saved_run)  # steps 3-4 redone exactly
    verify_checkpoint(ck / "step_000004")  # rewritten, good again


def _cli(args, capsys):
    from moedist.cli import main

    rc = main(args)
    return rc, capsys.readouterr().err


def test_auto_with_no_good_checkpoint_is_one_line(saved_run, tmp_path, capsys):
    run = _copy(saved_run, tmp_path / "run")
    for ck in (run / "checkpoints").glob("step_*"):
        (ck / "manifest.json").write_text("{not json")
    d = cfg_dict(run, train={"resume": "auto"})
    rc, err = _cli(["train", *overrides(d)], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moedist: error: train.resume=auto: no loadable checkpoint"), err
    assert "manifest.json: unreadable" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_explicit_corrupt_resume_is_one_line(saved_run, tmp_path, capsys, damage):
    run = _copy(saved_run, tmp_path / "run")
    ck = run / "checkpoints" / "step_000002"
    f = ck / "model-dense.safetensors"
    if damage == "flip":
        _corrupt(ck)
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "delete":
        f.unlink()
    else:
        (ck / "manifest.json").write_text(json.dumps({"format": "something else"}))
    d = cfg_dict(tmp_path / "new", train={"resume": str(ck)})
    rc, err = _cli(["train", *overrides(d)], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("moedist: error: train.resume=") and str(ck) in lines[0], err


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    """A real `moedist train` is killed while step 3's checkpoint is half-saved; resume=auto resumes from
    step 2 and ends bit-identical (losses, final weights) to an uninterrupted run."""
    run = tmp_path / "run"
    d = cfg_dict(run, train={"save_every": 1, "keep_last": 0})
    proc = start(["train", *overrides(d)], env={"MOEDIST_TEST_SAVE_PAUSE": "step_000003"})
    head = wait_for_line(proc, "pausing in the save of step_000003", timeout=150)
    proc.send_signal(signal.SIGKILL)
    rc, out = finish(proc, head, timeout=30)
    assert rc == -signal.SIGKILL, out[-2000:]
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000002"
    assert not (ck / "step_000003").exists() and (ck / ".tmp-step_000003").is_dir()
    verify_checkpoint(ck / "step_000002")
    again = copy.deepcopy(d)
    again["train"]["resume"] = "auto"
    res = train_in_process(again)
    assert [r["step"] for r in res.records][-2:] == [3, 4]
    assert not (ck / ".tmp-step_000003").exists()  # cleared by the next save's rotation
    ref = tmp_path / "ref"
    train_in_process(cfg_dict(ref, train={"save_every": 1, "keep_last": 0}))
    assert losses(run) == losses(ref)
    wa, wb = weights(run / "final"), weights(ref / "final")
    import torch

    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_kill_between_the_renames_of_a_resave_loses_nothing(saved_run, tmp_path):
    """Re-saving a name that exists moves the old one to `.old-<name>`, then the new one in. A process killed
    between the two renames leaves only `.old-<name>`: every reader finds that complete checkpoint."""
    from moedist.checkpoint.io import resolve_checkpoint
    from moedist.train.evaluate import main_eval

    run = _copy(saved_run, tmp_path / "run")
    (run / "final").rename(run / ".old-final")                          # the state after the first rename
    assert resolve_checkpoint(run) == run / ".old-final"
    ck = run / "checkpoints"
    (ck / "step_000004").rename(ck / ".old-step_000004")
    assert resolve_checkpoint(ck) == ck / ".old-step_000004"             # via `latest`
    assert resolve_checkpoint(ck / "step_000004") == ck / ".old-step_000004"
    verify_checkpoint(resolve_checkpoint(run))
    assert main_eval([str(run), "--json"]) == 0
    (run / ".old-final" / "manifest.json").unlink()                      # an incomplete leftover is not used
    assert resolve_checkpoint(run) == ck / ".old-step_000004"
