"""Exact resume: a run saved at step 2 and resumed ends bit-identical to the uninterrupted run.

Every random stream is on (LoRA dropout 0.2 on the experts, noisy gating, router jitter), so a
resume that restarted any private generator from its seed, or the global RNG, would diverge.
Each rank's streams are saved in the checkpoint (`rng-rank<R>.safetensors`, safetensors only)
and restored (`moedist.train.rng`). Plain runner at 1 and 2 processes, DeepSpeed ZeRO-2 at EP=2.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests._dist import run_workers
from tests.reliability._runs import cfg_dict, losses, train_in_process, weights


def _interrupted(full: Path, resumed: Path, d_full: dict) -> None:
    """The config of a run that resumes from the full run's step-2 checkpoint into its own output_dir."""
    d = copy.deepcopy(d_full)
    d["train"]["output_dir"] = str(resumed)
    d["train"]["resume"] = str(full / "checkpoints" / "step_000002")
    return d


def _same_tail(full: Path, resumed: Path, what: str = "") -> None:
    """The resumed run (its own output_dir: metrics of steps 3-4 only) equals the full run's steps 3-4
    exactly, losses and gradient norms, and its final weights are bit-identical."""
    assert losses(resumed) == losses(full)[2:], what
    wa, wb = weights(full / "final"), weights(resumed / "final")
    assert wa.keys() == wb.keys() and wa, what
    bad = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not bad, f"{what}: final weights differ: {bad[:3]}"


def test_generators_are_in_the_checkpoint(tmp_path):
    d = cfg_dict(tmp_path / "a", train={"max_steps": 2, "save_every": 1})
    train_in_process(d)
    with safe_open(str(tmp_path / "a" / "checkpoints" / "step_000001" / "rng-rank0.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "torch_cpu" in keys
    assert {"gen::layers.0.mlp.router.noise", "gen::layers.1.mlp.experts.dropout"} <= keys, keys
    assert not list((tmp_path / "a").rglob("*.pt")) and not list((tmp_path / "a").rglob("*.bin"))


def test_one_process_resume_is_bit_identical(tmp_path):
    full = tmp_path / "full"
    d = cfg_dict(full, train={"save_every": 2, "keep_last": 0})
    train_in_process(d)
    resumed = tmp_path / "resumed"
    train_in_process(_interrupted(full, resumed, d))
    _same_tail(full, resumed)


def test_streams_matter(tmp_path):
    """The test can fail: the same resume with the generators reset from their seeds diverges."""
    from moedist.train import rng

    full = tmp_path / "full"
    d = cfg_dict(full, train={"save_every": 2})
    train_in_process(d)
    saved = rng.set_rng_states
    try:
        rng.set_rng_states = lambda model, states: 0  # forget every stream
        train_in_process(_interrupted(full, tmp_path / "resumed", d))
    finally:
        rng.set_rng_states = saved
    assert losses(tmp_path / "resumed") != losses(full)[2:]


def _worker(rank: int, world: int, out: str) -> dict:
    out = Path(out)
    got = {}
    for name, sec in {"plain ep2": {"parallel": {"ep_size": 2}},
                      "zero2 ep2": {"parallel": {"ep_size": 2},
                                    "deepspeed": {"enabled": True, "zero_stage": 2}}}.items():
        d = cfg_dict(out / name.replace(" ", "_") / "full", train={"save_every": 2}, **sec)
        train_in_process(d)
        full = Path(d["train"]["output_dir"])
        r = _interrupted(full, full.parent / "resumed", d)
        train_in_process(r)
        got[name] = (str(full), r["train"]["output_dir"])
    return got


@pytest.mark.slow
def test_two_processes_plain_and_zero2_resume_bit_identical(tmp_path):
    runs = run_workers(_worker, 2, args=(str(tmp_path),), timeout=600)[0]
    for name, (full, resumed) in runs.items():
        full, resumed = Path(full), Path(resumed)
        _same_tail(full, resumed, name)
        with safe_open(str(full / "checkpoints" / "step_000002" / "rng-rank1.safetensors"), "pt") as f:
            assert "gen::layers.0.mlp.experts.dropout" in f.keys()
