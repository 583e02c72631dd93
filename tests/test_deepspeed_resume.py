"""Checkpoints resume exactly: 4 steps in one go == 2 steps, save, a fresh engine resumes, 2 steps.

On 2 processes, for each ZeRO stage 0-3 at EP=2: resume on the same layout, and on another one
(EP=1 under the next ZeRO stage, and the plain PyTorch runner): the trainer's checkpoints are in
the layout-independent moedist format (experts by global id, AdamW state included). Experts differ
per rank, so a checkpoint that kept only rank 0's experts or optimizer state would diverge.
ZeRO-0 with bf16 (DeepSpeed's BF16_Optimizer) uses the same moedist format; nothing is ever
saved or loaded in DeepSpeed's pickle format.
"""
from __future__ import annotations

import copy

from tests._dist import run_workers
from tests.test_train_equivalence import make_cfg


def resume_worker(rank: int, world: int, out_dir: str) -> dict:
    from moedist.config import config_from_dict
    from moedist.train.trainer import Trainer

    def run(cfg_dict: dict, resume: str | None = None) -> list:
        d = copy.deepcopy(cfg_dict)
        d["train"]["resume"] = resume
        res = Trainer(config_from_dict(d), write_outputs=False, console=False).train()
        return [r["loss"] for r in res.records]

    results = {}
    for stage in (0, 1, 2, 3):
        base = make_cfg(world, 2, "deepspeed", stage, {"train": {"max_steps": 4, "save_every": 2}})
        base["train"]["output_dir"] = f"{out_dir}/zero{stage}"
        ckpt = f"{out_dir}/zero{stage}/checkpoints/step_000002"
        full = run(base)
        other = make_cfg(world, 1, "deepspeed", (stage + 1) % 4, {"train": {"max_steps": 4}})
        other["train"]["output_dir"] = f"{out_dir}/other{stage}"
        plain = make_cfg(world, 2, "pytorch", 0, {"train": {"max_steps": 4}})
        plain["train"]["output_dir"] = f"{out_dir}/plain{stage}"
        results[f"zero{stage} ep2"] = (full, {"same layout": run(base, ckpt),
                                              f"ep1 zero{(stage + 1) % 4}": run(other, ckpt),
                                              "pytorch ep2": run(plain, ckpt)})
    native = make_cfg(world, 2, "deepspeed", 0, {"train": {"max_steps": 4, "save_every": 2}})
    native["deepspeed"]["bf16"] = True
    native["train"]["output_dir"] = f"{out_dir}/bf16"
    results["bf16 zero0 ep2"] = (run(native), {"same layout": run(native, f"{out_dir}/bf16/checkpoints/step_000002")})
    return results


def test_checkpoints_resume_exactly_at_any_layout(tmp_path):
    results = run_workers(resume_worker, 2, args=(str(tmp_path),), timeout=600)
    for case, (full, resumed) in results[0].items():
        assert len(full) == 4, case
        for how, losses in resumed.items():
            assert len(losses) == 2, (case, how)
            for a, b in zip(losses, full[2:]):
                assert abs(a - b) <= 1e-5 * abs(b), f"{case} resumed ({how}): {losses} vs uninterrupted {full[2:]}"
    assert (tmp_path / "zero2" / "checkpoints" / "step_000002" / "manifest.json").exists()  # moedist format
    bf16_ckpt = tmp_path / "bf16" / "checkpoints" / "step_000002"
    assert (bf16_ckpt / "manifest.json").exists()  # the moedist format at ZeRO-0 bf16 too
    assert not [f for f in bf16_ckpt.rglob("*") if f.suffix in (".pt", ".bin")]  # no pickles anywhere
    assert (tmp_path / "zero2" / "checkpoints" / "latest").read_text().strip() == "step_000004"


def sgd_worker(rank: int, world: int, out_dir: str) -> dict:
    from moedist.config import config_from_dict
    from moedist.train.trainer import Trainer

    def run(d: dict, resume: str | None = None) -> list:
        d = copy.deepcopy(d)
        d["train"]["resume"] = resume
        return [r["loss"] for r in Trainer(config_from_dict(d), write_outputs=False, console=False).train().records]

    out = {}
    for stage in (1, 2, 3):
        cfg = make_cfg(world, 2, "deepspeed", stage, {"train": {"max_steps": 4, "save_every": 2, "optimizer": "sgd"}})
        cfg["train"]["output_dir"] = f"{out_dir}/sgd{stage}"
        out[stage] = (run(cfg), run(cfg, f"{out_dir}/sgd{stage}/checkpoints/step_000002"))
    return out


def test_sgd_under_deepspeed_saves_and_resumes_exactly(tmp_path):
    """SGD keeps no per-parameter state: a step checkpoint under ZeRO 1-3 holds none and resumes exactly
    (it used to fail writing the first checkpoint: "exp_avg not found in optimizer state fragment")."""
    results = run_workers(sgd_worker, 2, args=(str(tmp_path),), timeout=600)
    for stage, (full, resumed) in results[0].items():
        assert len(full) == 4 and len(resumed) == 2, stage
        for a, b in zip(resumed, full[2:]):
            assert abs(a - b) <= 1e-5 * abs(b), f"zero{stage}: resumed {resumed} vs uninterrupted {full[2:]}"
