"""ZeRO-Offload (deepspeed.offload_optimizer=cpu, offload_param=cpu under ZeRO-3) with expert parallelism.

DeepSpeed's CPU Adam is a JIT C++ build (minutes the first time; cached under
~/.cache/moedist/torch_extensions), so the tests that train are in the slow suite; where it
cannot build they fail with the reason, and preflight says so in one line (checked here too).

* ZeRO-2, EP=2, 2 gloo processes: the losses and gradient norms of offload equal
  no offload (DeepSpeed CPU Adam vs torch AdamW: 1e-4 relative over 4 steps), and
  the expert weights stay different per rank (their EP groups are kept).
* Bad combinations: one line each.
"""
from __future__ import annotations

import copy
import os

import pytest

from tests._dist import run_workers

BASE = {
    "name": "off",
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_size": 48, "max_seq_len": 32},
    "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 1.0, "min_capacity": 1, "aux_loss_coef": 0.01},
    "train": {"max_steps": 4, "lr": 3e-3, "warmup_steps": 1, "micro_batch_size": 2, "grad_accum": 1, "seed": 11,
              "eval_batches": 1, "log_every": 100, "grad_clip": 1.0},
    "data": {"source": "pydoc", "seq_len": 32},
    "parallel": {"ep_size": 2},
    "deepspeed": {"enabled": True, "zero_stage": 2},
}


@pytest.fixture(scope="module")
def cpu_adam():
    from moedist.train.deepspeed_setup import cpu_adam_problem

    problem = cpu_adam_problem()
    if problem is not None:  # a real failure: the build works on these machines (never skip to green)
        pytest.fail(f"DeepSpeed CPU Adam cannot build here: {problem}")
    return True


def _train(rank: int, world: int, jobs: list) -> dict:
    import torch

    from moedist.config import config_from_dict
    from moedist.moe.experts import EXPERT_ATTR
    from moedist.train.trainer import Trainer

    out = {}
    for label, d in jobs:
        t = Trainer(config_from_dict(d), write_outputs=False, console=False, save_checkpoints=False)
        res = t.train()
        opt = type(t.runner.engine.optimizer).__name__, type(t.runner.engine.optimizer.optimizer).__name__
        expert = next(n for n, p in t.model.named_parameters() if getattr(p, EXPERT_ATTR, False))
        full = t.runner.trainable_state()[expert]  # the optimizer's fp32 master (moedist.train.state.Runner)
        out[label] = {"records": [(r["loss"], r["grad_norm"]) for r in res.records], "optimizer": opt,
                      "expert": full.detach().float().cpu().clone(),
                      "offload_cfg": t.runner.config["zero_optimization"].get("offload_optimizer")}
        del t
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


@pytest.mark.slow  # the first CPU Adam JIT build takes minutes on 2 cores
def test_offload_matches_no_offload_zero2_ep2(cpu_adam):
    off = copy.deepcopy(BASE)
    off["deepspeed"]["offload_optimizer"] = "cpu"
    ranks = run_workers(_train, 2, args=([("plain", BASE), ("offload", off)],), timeout=280)
    for r in ranks:
        assert r["offload"]["optimizer"][1] == "DeepSpeedCPUAdam"
        assert r["offload"]["offload_cfg"]["device"] == "cpu"
        assert r["plain"]["offload_cfg"] is None
        for (l0, n0), (l1, n1) in zip(r["plain"]["records"], r["offload"]["records"]):
            assert l1 == pytest.approx(l0, rel=1e-4)
            assert n1 == pytest.approx(n0, rel=1e-4)
        assert r["plain"]["records"][-1][0] < r["plain"]["records"][0][0] + 0.5  # it trains
    # expert parameters kept their EP groups: rank 0 and 1 hold different experts, offload or not
    assert not __import__("torch").allclose(ranks[0]["offload"]["expert"], ranks[1]["offload"]["expert"])
    __import__("torch").testing.assert_close(ranks[0]["offload"]["expert"], ranks[0]["plain"]["expert"],
                                             rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_offload_param_zero3_trains(cpu_adam):
    d = copy.deepcopy(BASE)
    d["deepspeed"].update(zero_stage=3, offload_optimizer="cpu", offload_param="cpu")
    d["deepspeed"]["extra"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    plain = copy.deepcopy(d)
    plain["deepspeed"].update(offload_optimizer="none", offload_param="none")
    ranks = run_workers(_train, 2, args=([("plain", plain), ("offload", d)],), timeout=280)
    for r in ranks:
        for (l0, _), (l1, _) in zip(r["plain"]["records"], r["offload"]["records"]):
            assert l1 == pytest.approx(l0, rel=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.enabled=true", "deepspeed.zero_stage=2", "deepspeed.offload_param=cpu"],
     "deepspeed.offload_param='cpu': needs deepspeed.zero_stage=3 (got 2)"),
    (["deepspeed.enabled=true", "deepspeed.offload_optimizer=cpu"],
     "deepspeed.offload_optimizer='cpu': needs deepspeed.zero_stage >= 1 (got 0)"),
    (["deepspeed.enabled=true", "deepspeed.zero_stage=1", "deepspeed.offload_optimizer=cpu", "train.optimizer=sgd"],
     "deepspeed.offload_optimizer='cpu': needs train.optimizer=adamw (CPU Adam)"),
    (["deepspeed.offload_optimizer=gpu"], "deepspeed.offload_optimizer='gpu': must be one of none|cpu"),
])
def test_bad_offload_config_one_line(overrides, message):
    from moedist.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_preflight_offload_lines(monkeypatch):
    from moedist.config import ConfigError, load_config
    from moedist.train import deepspeed_setup
    from moedist.train.preflight import preflight

    cfg = load_config(None, [])
    cfg.deepspeed.offload_optimizer = "cpu"  # bypass validate: enabled=false is preflight's to refuse
    with pytest.raises(ConfigError, match="^deepspeed.offload_optimizer=cpu: needs deepspeed.enabled=true$"):
        preflight(cfg, 1, cuda=False)
    cfg = load_config(None, ["deepspeed.enabled=true", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"])
    monkeypatch.setattr(deepspeed_setup, "cpu_adam_problem", lambda: "RuntimeError: no compiler")
    with pytest.raises(ConfigError) as err:
        preflight(cfg, 1, cuda=False)
    assert str(err.value) == ("deepspeed.offload_optimizer=cpu: DeepSpeed's CPU Adam cannot be built or loaded here "
                              "(RuntimeError: no compiler); set deepspeed.offload_optimizer=none")
    assert "\n" not in str(err.value)
    extra = load_config(None, ["deepspeed.enabled=true", "deepspeed.zero_stage=2",
                               "deepspeed.extra={zero_optimization: {offload_optimizer: {device: cpu}}}"])
    with pytest.raises(ConfigError, match=r"use deepspeed.offload_optimizer=none\|cpu$"):
        preflight(extra, 1, cuda=False)


def _resume(rank: int, world: int, out_dir: str, stage: int) -> dict:
    from moedist.config import config_from_dict
    from moedist.train.trainer import Trainer

    def run(d: dict, out: str, resume=None) -> list:
        d = copy.deepcopy(d)
        d["train"].update(output_dir=f"{out_dir}/{out}", resume=resume, max_steps=4, save_every=2)
        res = Trainer(config_from_dict(d), write_outputs=False, console=False).train()
        return [(r["loss"], r["grad_norm"]) for r in res.records]

    off = copy.deepcopy(BASE)
    off["deepspeed"].update(zero_stage=stage, offload_optimizer="cpu")
    if stage == 3:
        off["deepspeed"]["offload_param"] = "cpu"
    plain = copy.deepcopy(off)
    plain["deepspeed"].update(offload_optimizer="none", offload_param="none")
    ckpt = f"{out_dir}/full/checkpoints/step_000002"
    return {"full": run(off, "full"), "resumed": run(off, "resumed", ckpt),
            "without offload": run(plain, "plain", ckpt)}


@pytest.mark.slow  # CPU Adam (cached JIT build) and three engines per stage: minutes on 2 cores
@pytest.mark.parametrize("stage", [2, 3])
def test_offload_save_resume_exact_and_layout_independent(cpu_adam, tmp_path, stage):
    """4 offload steps in one go == 2 steps, save, a fresh offload engine resumes for 2 (bitwise: the
    same CPU Adam over the same fp32 partitions, state written back exactly). The same checkpoint
    resumed without offload (torch AdamW) continues like an uninterrupted run without offload
    would from those weights: 1e-4 relative, the tolerance of CPU Adam vs torch AdamW above."""
    ranks = run_workers(_resume, 2, args=(str(tmp_path), stage), timeout=560)
    for r in ranks:
        full, resumed, plain = r["full"], r["resumed"], r["without offload"]
        assert len(full) == 4 and len(resumed) == 2 and len(plain) == 2
        assert resumed == full[2:], (resumed, full)
        for (l0, n0), (l1, n1) in zip(full[2:], plain):
            assert l1 == pytest.approx(l0, rel=1e-4) and n1 == pytest.approx(n0, rel=1e-4)
