"""Aux-loss-free load balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2) in the training loop.

    meter = ExpertBiasUpdater(model, rate=cfg.moe.expert_bias_update_rate)
    for micro-batch: out = forward(...); meter.add(out.moe_aux)
    optimizer step; meter.step(device)      # collective when a process group exists

Every MoE layer whose router holds an `expert_bias` buffer gets, after each
optimizer step, bias_e += rate * sign(mean load - load_e) (`router.update_bias`).
The load is GLOBAL: the (token, expert) pairs routed to expert e, before capacity
dropping, summed over every micro-batch of the step and over every rank (one
SUM all-reduce of an [L, E] tensor over the whole world). Each rank's MoEAux counts
its own tokens over all E global experts, so the sum is the same at any EP size,
and every rank applies the same update to its replicated router (the bias stays
identical everywhere without a broadcast). The optimizer never sees the bias: it
is a buffer, saved in checkpoints with the router.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from moedist.moe.layer import MoEAux, MoELayer
from moedist.moe.router import Router


def routed_load(auxes: Sequence[MoEAux]) -> torch.Tensor:
    """[L, E] float64 pairs routed to each expert (kept + dropped by capacity) of each MoE layer, one forward."""
    return torch.stack([(a.tokens_per_expert + a.dropped_per_expert).to(torch.float64) for a in auxes])


class ExpertBiasUpdater:
    """Accumulates the routed load of one optimizer step and updates every expert bias after it.

    Args:
        model: the (parallelized) model; its MoE layers are taken in module order, which is the
            order of `CausalLMOutput.moe_aux`.
        rate: the update rate (moe.expert_bias_update_rate); 0 turns the updater off.
    """

    def __init__(self, model: nn.Module, rate: float):
        self.layers: List[MoELayer] = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.routers: List[Router] = [layer.router for layer in self.layers]
        self.rate = float(rate)
        self.enabled = self.rate > 0 and any(r.expert_bias is not None for r in self.routers)
        for r in self.routers:
            # DeepSpeed bf16/fp16 casts every buffer with the module (module.bfloat16()); steps of 1e-3
            # would vanish in a bf16 bias of 0.25 (ulp 2^-9), and the routing math is fp32 anyway
            if r.expert_bias is not None and r.expert_bias.dtype != torch.float32:
                r.expert_bias = r.expert_bias.float()
        self._load: Optional[torch.Tensor] = None  # [L, E] this rank, this step

    def add(self, auxes: Sequence[MoEAux]) -> None:
        """Count one micro-batch's routing (stays on the device: no host sync)."""
        if not self.enabled:
            return
        if len(auxes) != len(self.routers):
            raise ValueError(f"ExpertBiasUpdater: {len(auxes)} MoE outputs for {len(self.routers)} MoE layers")
        load = routed_load(auxes)
        self._load = load if self._load is None else self._load + load

    def reset(self) -> None:
        """Forget this step's counts (a skipped step updates nothing)."""
        self._load = None

    def step(self, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
        """All-reduce the step's load over the world and update every bias; returns the global [L, E] load.

        Collective: every rank must call it after every optimizer step (also one with no tokens).
        """
        if not self.enabled:
            return None
        E = self.routers[0].num_experts if self.routers else 0
        load = self._load if self._load is not None else torch.zeros(len(self.routers), E, dtype=torch.float64)
        self._load = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            load = load.to(device) if device is not None else load
            dist.all_reduce(load)
        for router, load_E in zip(self.routers, load):
            if router.expert_bias is not None:
                router.update_expert_bias(load_E, self.rate)
        return load
