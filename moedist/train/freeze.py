"""`moe.freeze_experts`: chosen experts and their router rows stay bitwise unchanged while the others train.

    frozen = FrozenExperts.from_model(model, cfg.moe.freeze_experts)   # after parallelize, before training
    snap = frozen.snapshot(); runner.step(...); frozen.restore(snap)

Experts are stacked in one tensor per layer ([L, ...] local experts), so freezing is
per slice, not per parameter, in two parts:

* a gradient hook zeroes the frozen slices of every trainable expert tensor (the
  experts' weights, or their LoRA adapters in the LoRA modes) and the frozen rows of
  every router weight ([E, H], also the noise weight), so the reduced gradients, the
  global norm and clipping see exact zeros there and Adam's moments stay zero;
* AdamW's decoupled weight decay still shrinks a slice whose gradient is zero, so the
  trainer snapshots the frozen slices before each optimizer step and writes them back
  after it (bitwise). Under DeepSpeed the fp32 master copy would overwrite that write,
  so there the config requires train.weight_decay=0 and ZeRO <= 2 (`config_lifelong`):
  with a zero gradient and zero moments an Adam update is exactly zero.

The aux-loss-free balancing bias (moe.expert_bias) is a buffer set from expert load,
not trained: it keeps moving for frozen experts too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn as nn


@dataclass
class FrozenSlice:
    """Rows `index` (dim 0) of parameter `name` are frozen."""

    name: str
    param: nn.Parameter
    index: torch.Tensor     # [n] int64 local rows


def frozen_slices(model: nn.Module, expert_ids: Sequence[int]) -> List[FrozenSlice]:
    """The trainable slices of `model` (this rank's shard) that belong to the experts `expert_ids`.

    Expert tensors: local rows l with first_expert + l in ids. Routers (replicated): rows ids of
    `*.router.weight` and `*.router.noise_weight`.
    """
    from moedist.checkpoint.keys import param_slots
    from moedist.moe.layer import MoELayer

    ids = set(int(i) for i in expert_ids)
    slots = param_slots(model)
    routers = {f"{n}.router.{leaf}" for n, m in model.named_modules() if isinstance(m, MoELayer)
               for leaf in ("weight", "noise_weight")}
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in slots:
            s = slots[name]
            rows = [l for l in range(s.num_local) if s.first_expert + l in ids]
        elif name in routers:
            rows = sorted(i for i in ids if i < p.shape[0])
        else:
            continue
        if rows:
            out.append(FrozenSlice(name, p, torch.tensor(rows, dtype=torch.long, device=p.device)))
    return out


def _zero_rows(index: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.index_fill(0, index.to(grad.device), 0)
    return hook


class FrozenExperts:
    """Gradient hooks plus snapshot/restore around the optimizer step (see the module docstring)."""

    def __init__(self, slices: List[FrozenSlice]):
        self.slices = slices
        self._handles = [s.param.register_hook(_zero_rows(s.index)) for s in slices]

    @classmethod
    def from_model(cls, model: nn.Module, expert_ids: Sequence[int]) -> "FrozenExperts":
        from moedist.moe.experts import hook_expert_grads

        slices = frozen_slices(model, expert_ids)
        hook_expert_grads(model, [s.param for s in slices])  # the hooks must see these weights' gradients
        return cls(slices)

    @torch.no_grad()
    def snapshot(self) -> Dict[str, torch.Tensor]:
        """Copies of the frozen slices (small: only the frozen experts' rows)."""
        return {s.name: s.param.detach().index_select(0, s.index.to(s.param.device)).clone() for s in self.slices}

    @torch.no_grad()
    def restore(self, snap: Dict[str, torch.Tensor]) -> None:
        """Write the snapshot back (undoes weight decay on the frozen slices)."""
        for s in self.slices:
            s.param.data.index_copy_(0, s.index.to(s.param.device), snap[s.name])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
