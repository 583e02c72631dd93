"""Checkpoints written through DeepSpeed's `save_checkpoint` (plus each rank's expert file) resume
exactly on the same layout: 4 steps in one go == 2 steps, save, a fresh engine resumes, 2 steps.

ZeRO 0/1/2/3 with EP=2 on 2 processes (experts differ per rank, so a checkpoint that kept only
rank 0's experts, or rank 0's optimizer state, would diverge after the resume).
"""
from __future__ import annotations

import copy

from tests._dist import run_workers
from tests.test_train_equivalence import make_cfg


def resume_worker(rank: int, world: int, out_dir: str) -> dict:
    from moedist.config import config_from_dict
    from moedist.train.trainer import Trainer

    results = {}
    for stage in (0, 1, 2, 3):
        base = make_cfg(world, 2, "deepspeed", stage, {"train": {"max_steps": 4, "save_every": 2}})
        base["train"]["output_dir"] = f"{out_dir}/zero{stage}"
        full = Trainer(config_from_dict(base), write_outputs=False, console=False).train()
        again = copy.deepcopy(base)
        again["train"]["resume"] = f"{out_dir}/zero{stage}/checkpoints/step_000002"
        resumed = Trainer(config_from_dict(again), write_outputs=False, console=False).train()
        results[stage] = ([r["loss"] for r in full.records], [r["loss"] for r in resumed.records])
    return results


def test_deepspeed_checkpoint_resumes_exactly(tmp_path):
    results = run_workers(resume_worker, 2, args=(str(tmp_path),), timeout=600)
    for stage, (full, resumed) in results[0].items():
        assert len(full) == 4 and len(resumed) == 2, stage
        for a, b in zip(resumed, full[2:]):
            assert abs(a - b) <= 1e-6 * abs(b), f"ZeRO-{stage}: resumed {resumed} vs uninterrupted {full[2:]}"
    assert (tmp_path / "zero2" / "checkpoints" / "latest").read_text().strip() == "step_000004"
