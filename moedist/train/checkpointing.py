"""Trainer checkpoints in the layout-independent `moedist.checkpoint` format.

    path = save(trainer, tag)     # collective; <output_dir>/checkpoints/<tag>/ + checkpoints/latest
    extra = load(trainer, path)   # collective; any world size, EP size, ZeRO stage or engine

Weights are the optimizer's full fp32 values (`export.full_fp32_state`) and the
AdamW state (exp_avg, exp_avg_sq, step) per parameter, experts keyed by global
id, so a run saved at EP=4 under ZeRO-3 resumes at EP=2 under ZeRO-1 or in one
plain process. The data position and step travel in the manifest's extra state.

Loading pushes the values into whatever holds them: module parameters (and, for
ZeRO-3, their partitions, re-scattered from each partition group's first rank),
DeepSpeed's fp32 master copies (`safe_set_full_fp32_param`) and its optimizer
state (`moedist.train.deepspeed_setup.set_full_optimizer_state`), or the torch
optimizer's state for the PyTorch runner and fp32 ZeRO-0.

Every engine, ZeRO stage and precision uses this one format; nothing here (or
anywhere in moedist) unpickles. DeepSpeed ZeRO-0 with bf16 keeps fp32 masters
and Adam state in its BF16_Optimizer, linked per parameter like ZeRO-1/2.
"""
from __future__ import annotations

import os
import types
from pathlib import Path

import torch

from moedist.config import config_to_dict


def _torch_optimizer(trainer):
    """The torch optimizer whose state is keyed by the module's own parameters, or None."""
    r = trainer.runner
    if r.kind == "pytorch":
        return r.optimizer
    ds = trainer.cfg.deepspeed
    if ds.zero_stage == 0 and not (ds.bf16 or ds.fp16):
        return r.engine.optimizer  # fp32 ZeRO-0: the client AdamW itself
    return None


def optimizer_state(trainer) -> dict:
    """{param name: {exp_avg, exp_avg_sq, step}} full tensors for this rank's parameters (collective)."""
    from moedist.checkpoint import get_torch_optimizer_state

    from moedist.train.deepspeed_setup import get_full_optimizer_state

    opt = _torch_optimizer(trainer)
    if opt is not None:
        return get_torch_optimizer_state(trainer.runner.module, opt)
    return get_full_optimizer_state(trainer.runner.module, trainer.runner.engine)


def shadow_model(trainer):
    """A plain fp32 copy of the model's structure holding this rank's expert shard."""
    from moedist.models import build_model, parallelize

    shadow = build_model(trainer.cfg)
    parallelize(shadow, types.SimpleNamespace(size=trainer.cfg.parallel.ep_size, rank=trainer.dims.ep_rank))
    return shadow


def _extra(trainer) -> dict:
    c = trainer.cfg
    return {"step": trainer.step, "position": trainer.position, "world_size": trainer.world,
            "ep_size": c.parallel.ep_size, "engine": trainer.runner.kind, "zero_stage": c.deepspeed.zero_stage}


def save(trainer, path: str, with_optimizer: bool = True) -> str:
    """Write trainer's weights (+ optimizer state) to `path` (every rank calls it)."""
    from moedist.checkpoint import save_checkpoint
    from moedist.train.export import full_fp32_state

    state = full_fp32_state(trainer)
    optim = optimizer_state(trainer) if with_optimizer else None
    shadow = shadow_model(trainer)
    shadow.load_state_dict(state, strict=True)
    return os.fspath(save_checkpoint(path, shadow, step=trainer.step, optim_state=optim, extra_state=_extra(trainer),
                                     config=config_to_dict(trainer.cfg), dims=trainer.dims))


def is_moedist_checkpoint(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def check_resumable(path: str, key: str = "train.resume") -> None:
    """ConfigError unless `path` is a moedist checkpoint free of pickles (nothing is opened before)."""
    from moedist.checkpoint.safety import refuse_pickles
    from moedist.config import ConfigError

    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r}: no such checkpoint directory")
    refuse_pickles(path, key)
    if not is_moedist_checkpoint(path):
        raise ConfigError(f"{key}={path!r}: not a moedist checkpoint (no manifest.json)")


@torch.no_grad()
def load(trainer, path: str) -> dict:
    """Load a moedist checkpoint into the trainer's runner at its current layout; returns extra state."""
    from moedist.checkpoint import load_checkpoint, set_torch_optimizer_state

    shadow = shadow_model(trainer)
    loaded = load_checkpoint(path, shadow, dims=trainer.dims)
    values = dict(shadow.named_parameters())
    module = trainer.runner.module
    params = dict(module.named_parameters())
    ds = trainer.runner.kind == "deepspeed"
    zero3 = ds and trainer.cfg.deepspeed.zero_stage == 3
    if zero3:
        import deepspeed

        # every rank writes the same full value; each partition group's first rank re-scatters it
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            for name, p in params.items():
                p.data.copy_(values[name].to(p.dtype))
    else:
        for name, p in params.items():
            p.data.copy_(values[name].to(device=p.device, dtype=p.dtype))
    for name, b in module.named_buffers():
        src = dict(shadow.named_buffers()).get(name)
        if b is not None and src is not None:
            b.copy_(src.to(device=b.device, dtype=b.dtype))
    opt = _torch_optimizer(trainer)
    if ds and opt is None:
        from moedist.train.deepspeed_setup import (materialize_optimizer_state, set_full_fp32_param,
                                                    set_full_optimizer_state)

        engine = trainer.runner.engine
        materialize_optimizer_state(engine)
        for name, p in params.items():
            if p.requires_grad:
                set_full_fp32_param(engine, p, values[name].to(trainer.device))
        set_full_optimizer_state(module, engine, loaded.optim_state)
    elif opt is not None:
        set_torch_optimizer_state(module, opt, loaded.optim_state)
    return loaded.extra_state
