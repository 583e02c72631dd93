"""The runner state interface (`moedist.train.state.Runner`) on the PyTorch runner and real DeepSpeed engines.

References are independent of the code under test: a fresh model built from the same seeds
(`build_local_model`, the values every layout starts from), the module's own parameters
(gathered from ZeRO-3 partitions with DeepSpeed's `GatheredParameters`) and the torch
optimizer's own state dictionary. Round trips write values that no training step produced,
so a `load_*` that skipped a place where the values live (a master copy, a partition, the
optimizer's flat state) reads back the old values and fails.
"""
from __future__ import annotations

import pytest
import torch

from tests._dist import run_workers
from tests.test_train_equivalence import make_cfg


def _fresh(cfg, ep_rank: int) -> dict:
    """Parameters and buffers of this rank's part of a freshly built model (the same seeds as the trainer)."""
    import types

    from moedist.models import build_local_model, parallelize

    model = build_local_model(cfg, ep_rank, cfg.parallel.ep_size)
    parallelize(model, types.SimpleNamespace(size=cfg.parallel.ep_size, rank=ep_rank))
    return {**{n: p.detach().clone() for n, p in model.named_parameters()},
            **{n: b.detach().clone() for n, b in model.named_buffers()}}


def _module_values(runner) -> dict:
    """The module's own parameters, whole (gathered from ZeRO-3 partitions with DeepSpeed's own context)."""
    params = dict(runner.module.named_parameters())
    partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
    if not partitioned:
        return {n: p.detach().float().cpu().clone() for n, p in params.items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        return {n: p.detach().float().cpu().clone() for n, p in params.items()}


def _perturbed(state: dict, trainable: set, seed: int) -> dict:
    """New values for every trainable parameter (and the others unchanged), far from any trained value."""
    g = torch.Generator().manual_seed(seed)
    return {n: (v + 0.25 + 0.1 * torch.randn(v.shape, generator=g) if n in trainable else v.clone())
            for n, v in state.items()}


def _perturbed_optim(state: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, st in state.items():
        out[name] = {k: (v + 7.0 if k == "step" else
                         v.abs() + 0.5 + torch.rand(v.shape, generator=g) if k == "exp_avg_sq" else
                         v + torch.randn(v.shape, generator=g)) for k, v in st.items()}
    return out


def _close(a: dict, b: dict, exact: bool = True) -> list:
    """Keys whose tensors differ (or that only one side has)."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k].float().cpu(), b[k].float().cpu()
        ok = x.shape == y.shape and (torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-6, atol=1e-7))
        if not ok:
            bad.append(k)
    return bad


def _optim_close(a: dict, b: dict) -> list:
    bad = sorted(set(a) ^ set(b))
    for name in set(a) & set(b):
        if set(a[name]) != set(b[name]):
            bad.append(f"{name}: keys {sorted(a[name])} vs {sorted(b[name])}")
            continue
        bad += [f"{name}.{k}" for k in a[name] if not torch.equal(a[name][k].float().cpu(), b[name][k].float().cpu())]
    return bad


def check_runner(trainer, steps: int = 2) -> dict:
    """Every check of the interface on one trainer's runner; returns lists of offending keys (empty = pass)."""
    runner = trainer.runner
    cfg = trainer.cfg
    out = {}
    module_dtypes = {n: p.dtype for n, p in runner.module.named_parameters()}
    buffer_dtypes = {n: b.dtype for n, b in runner.module.named_buffers()}
    trainable = {n for n, p in runner.module.named_parameters() if p.requires_grad}
    # 1. before any step: the full state is the freshly built model (rounded to the engine's dtypes)
    fresh = _fresh(cfg, trainer.dims.ep_rank)
    fresh = {n: v.to({**module_dtypes, **buffer_dtypes}[n]) for n, v in fresh.items()}
    out["initial == fresh model"] = _close(runner.full_state(), fresh)
    for _ in range(steps):
        trainer.train_step()
    # 2. after training: the full state is the module's own parameters (fp32 masters rounded to them)
    state = runner.full_state()
    assert all(v.device.type == "cpu" for v in state.values())
    assert all(state[n].dtype == torch.float32 for n in module_dtypes)
    module = _module_values(runner)
    out["trained == module"] = _close({n: state[n].to(module_dtypes[n]) for n in module}, module)
    out["trainable_state == full_state"] = _close(
        {n: v.cpu() for n, v in runner.trainable_state().items()}, {n: state[n] for n in trainable})
    # 3. load_full_state round trip (values no step produced)
    new = _perturbed(state, trainable, seed=0)  # the same on every rank, as a loaded checkpoint is
    runner.load_full_state(new)
    out["load_full_state round trip"] = _close(runner.full_state(), new)
    module = _module_values(runner)
    out["loaded module"] = _close(module, {n: new[n].to(module_dtypes[n]).float() for n in module})
    # 4. optimizer_state round trip
    optim = runner.optimizer_state()
    out["optimizer state covers the trainable parameters"] = sorted(trainable ^ set(optim))
    out["optimizer state keys"] = sorted({k for st in optim.values() for k in st} ^ {"exp_avg", "exp_avg_sq", "step"})
    new_optim = _perturbed_optim(optim, seed=1)
    runner.load_optimizer_state(new_optim)
    out["load_optimizer_state round trip"] = _optim_close(runner.optimizer_state(), new_optim)
    out["describe"] = runner.describe()
    out["manifest_info"] = runner.manifest_info()
    return out


def _trainer(cfg_dict: dict):
    from moedist.config import config_from_dict
    from moedist.train.trainer import Trainer

    return Trainer(config_from_dict(cfg_dict), write_outputs=False, console=False, save_checkpoints=False)


def state_worker(rank: int, world: int, cases: list) -> dict:
    out = {}
    for label, cfg_dict in cases:
        trainer = _trainer(cfg_dict)
        out[label] = check_runner(trainer)
        del trainer
    return out


CASES = [("pytorch ep2", make_cfg(2, 2, "pytorch", 0), "PyTorch, fp32", 0)]
for _stage in (0, 2, 3):
    CASES.append((f"zero{_stage} ep2", make_cfg(2, 2, "deepspeed", _stage), f"DeepSpeed ZeRO-{_stage}, fp32", _stage))
_BF16 = make_cfg(2, 2, "deepspeed", 2)
_BF16["deepspeed"]["bf16"] = True
CASES.append(("zero2 bf16 ep2", _BF16, "DeepSpeed ZeRO-2, bf16", 2))


def test_runner_state_round_trips_on_every_engine():
    """PyTorch and DeepSpeed ZeRO 0/2/3 (fp32) and ZeRO-2 bf16, EP=2 on 2 gloo processes: full_state is the
    fresh model before a step and the module's own (gathered) parameters after; load_full_state and
    load_optimizer_state write back exactly what full_state / optimizer_state then read."""
    results = run_workers(state_worker, 2, args=([(label, d) for label, d, _, _ in CASES],), timeout=600)
    for rank, res in enumerate(results):
        for label, _, describe, stage in CASES:
            got = dict(res[label])
            assert got.pop("describe") == describe, label
            assert got.pop("manifest_info") == {"engine": "pytorch" if label.startswith("pytorch") else "deepspeed",
                                                "zero_stage": stage}, label
            for check, bad in got.items():
                assert bad == [], f"rank {rank}, {label}: {check}: {bad[:5]}"


def plain_worker(rank: int, world: int, break_load: bool) -> dict:
    """One process, the PyTorch runner; break_load: a runner whose load_full_state writes nothing."""
    from moedist.train.runners import PlainRunner

    if break_load:
        PlainRunner.load_full_state = lambda self, state: None
    trainer = _trainer(make_cfg(1, 1, "pytorch", 0))
    got = check_runner(trainer, steps=1)
    runner = trainer.runner
    direct = {n: {k: torch.as_tensor(v) for k, v in runner.optimizer.state[p].items()}
              for n, p in runner.module.named_parameters() if p.requires_grad}
    got["optimizer_state == torch optimizer's state"] = _optim_close(runner.optimizer_state(), direct)
    return got


def test_plain_runner_state_in_one_process():
    """The PyTorch runner at world size 1; its optimizer state is the torch optimizer's own."""
    got = run_workers(plain_worker, 1, args=(False,))[0]
    assert got.pop("describe") == "PyTorch, fp32"
    assert got.pop("manifest_info") == {"engine": "pytorch", "zero_stage": 0}
    for check, bad in got.items():
        assert bad == [], f"{check}: {bad[:5]}"


def test_the_checks_fail_when_a_load_writes_nothing():
    """The round-trip checks can fail: a runner whose load_full_state writes nothing is caught, while the
    checks that do not depend on loading still pass."""
    got = run_workers(plain_worker, 1, args=(True,))[0]
    assert got["load_full_state round trip"] and got["loaded module"]
    assert got["initial == fresh model"] == [] and got["trained == module"] == []


def test_runners_declare_the_interface():
    from moedist.train.deepspeed_runner import DeepSpeedRunner
    from moedist.train.runners import PlainRunner, runner_class
    from moedist.train.state import Runner

    from moedist.config import config_from_dict

    assert issubclass(PlainRunner, Runner) and issubclass(DeepSpeedRunner, Runner)
    assert not PlainRunner.__abstractmethods__ and not DeepSpeedRunner.__abstractmethods__
    assert runner_class(config_from_dict(make_cfg(2, 2, "deepspeed", 1))) is DeepSpeedRunner
    assert runner_class(config_from_dict(make_cfg(2, 2, "pytorch", 0))) is PlainRunner
    with pytest.raises(TypeError):
        type("Half", (Runner,), {"kind": "x", "guard_sees_gradients": True})()
