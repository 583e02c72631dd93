"""Layout-independent tensor keys: expert tensors are keyed by GLOBAL expert id.

A stacked expert parameter `layers.3.mlp.experts.w_up` of shape [L, H, F] on the
rank holding experts [16, 16 + L) becomes the keys
`layers.3.mlp.experts.16.w_up`, ..., `layers.3.mlp.experts.{16+L-1}.w_up`, each
[H, F]. Nested expert tensors keep their path after the index
(`layers.3.mlp.experts.17.lora.up.lora_A`). Everything else keeps its name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from moedist.distributed.grad_sync import is_expert_param
from moedist.moe.parts import Experts


@dataclass(frozen=True)
class ExpertSlot:
    """Where one parameter's experts live: module path, its first global id, L local experts."""

    module_path: str
    first_expert: int
    num_local: int


def expert_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules that own stacked experts (`moedist.moe.parts.Experts`: num_experts, num_local, first_expert)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Experts)}


def param_slots(model: nn.Module) -> Dict[str, ExpertSlot]:
    """Map each expert parameter name to its ExpertSlot (non-expert params are absent)."""
    owners = expert_modules(model)
    slots = {}
    for name, p in model.named_parameters():
        if not is_expert_param(p):
            continue
        owner = max((o for o in owners if name.startswith(o + ".")), key=len, default=None)
        if owner is None:
            raise ValueError(f"expert parameter {name} is not inside an expert module")
        m = owners[owner]
        slots[name] = ExpertSlot(owner, m.first_expert, m.num_local)
    return slots


def global_key(name: str, slot: ExpertSlot, local: int) -> str:
    rest = name[len(slot.module_path) + 1:]
    return f"{slot.module_path}.{slot.first_expert + local}.{rest}"


def split_to_global(name: str, tensor: torch.Tensor, slot: ExpertSlot) -> Iterator[Tuple[str, torch.Tensor]]:
    """[L, ...] stacked tensor -> (global key, [...]) per local expert."""
    if tensor.shape[0] != slot.num_local:
        raise ValueError(f"{name}: leading dim {tensor.shape[0]} != {slot.num_local} local experts")
    for l in range(slot.num_local):
        yield global_key(name, slot, l), tensor[l]


def global_keys_for(name: str, slot: ExpertSlot) -> List[str]:
    return [global_key(name, slot, l) for l in range(slot.num_local)]
