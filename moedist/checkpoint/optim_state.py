"""Optimizer state as {param name: {state name: full tensor}} for a plain `torch.optim` optimizer.

This is the form `save_checkpoint` / `load_checkpoint` take and runners give
(`moedist.train.state.Runner.optimizer_state`). A DeepSpeed engine's ZeRO-partitioned
state is converted to and from it in `moedist.train.deepspeed_runner`.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

StateDict = Dict[str, Dict[str, torch.Tensor]]


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
