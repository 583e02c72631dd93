"""Optimizer state as {param name: {state name: full tensor}}, whatever holds it.

A plain `torch.optim` optimizer keeps state per parameter object. A DeepSpeed
engine keeps it flattened and partitioned by ZeRO; DeepSpeed's public helpers
`safe_get_full_optimizer_state` / `safe_set_full_optimizer_state` (and the
fp32 master weights) give and take it per parameter on every stage. They are
collective: every rank calls them for the same parameters in the same order.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

StateDict = Dict[str, Dict[str, torch.Tensor]]
ADAM_STATES = ("exp_avg", "exp_avg_sq")


def get_torch_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> StateDict:
    out: StateDict = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if st:
            out[name] = {k: (v if torch.is_tensor(v) else torch.tensor(float(v))) for k, v in st.items()}
    return out


def set_torch_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: StateDict) -> None:
    for name, p in model.named_parameters():
        if name in state:
            optimizer.state[p] = {k: (v.to(p.device).clone() if v.dim() else v.clone().to(torch.float32)) for k, v in state[name].items()}


def get_deepspeed_optimizer_state(model: nn.Module, engine) -> StateDict:
    """Full per-parameter Adam state and step from a DeepSpeed engine (ZeRO 0-3)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out: StateDict = {}
    step = _deepspeed_step(engine)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        st = {}
        for s in ADAM_STATES:
            v = safe_get_full_optimizer_state(p, s)
            if v is not None:
                st[s] = v.detach().float().cpu().clone()
        if st:
            st["step"] = torch.tensor(float(step))
            out[name] = st
    return out


def set_deepspeed_optimizer_state(model: nn.Module, engine, state: StateDict) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    for name, p in model.named_parameters():
        if not p.requires_grad or name not in state:
            continue
        for s in ADAM_STATES:
            if s in state[name]:
                safe_set_full_optimizer_state(p, state[name][s].to(p.device), s)
    steps = [v["step"] for v in state.values() if "step" in v]
    if steps:
        _set_deepspeed_step(engine, int(steps[0].item()))


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _deepspeed_step(engine) -> int:
    for st in _base_optimizer(engine).state.values():
        if "step" in st:
            v = st["step"]
            return int(v.item() if torch.is_tensor(v) else v)
    return 0


def _set_deepspeed_step(engine, step: int) -> None:
    for group in _base_optimizer(engine).param_groups:
        for p in group["params"]:
            st = _base_optimizer(engine).state.get(p)
            if st is not None and "step" in st:
                st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step
