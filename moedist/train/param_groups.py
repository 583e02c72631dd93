"""The optimizer's parameter groups, built in one place for every runner.

Trainable matrices decay, trainable vectors (norms, biases, router biases) do not; frozen
parameters are in no group, so no optimizer state exists for them. The DeepSpeed runner then
moves expert parameters into its MoE groups (`deepspeed_setup.optimizer_param_groups`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch.nn as nn


def decay_groups(model: nn.Module, weight_decay: float,
                 ndim: Callable[[nn.Parameter], int] = lambda p: p.ndim) -> List[Dict[str, Any]]:
    """[{"name": "decay", params, weight_decay}, {"name": "no_decay", params, weight_decay: 0}], empty
    groups dropped. `ndim(p)`: dimensions of p as built (a ZeRO-3 partition is a flat 1-d tensor)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    matrix = [ndim(p) >= 2 for p in trainable]
    groups = [{"name": "decay", "params": [p for p, m in zip(trainable, matrix) if m], "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for p, m in zip(trainable, matrix) if not m], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
