"""Mixture-of-Experts building blocks.

Shape legend used in names and comments throughout this package:
    T  tokens (batch * sequence, flattened)     E  experts (global)
    L  local experts on this EP rank            K  top-k slots per token
    H  hidden size                              F  expert FFN size
    C  capacity (tokens per expert)             N  routed (token, slot) pairs
    r  LoRA rank

Math (routing, losses, capacity) lives in pure functions; modules exist only
where there are parameters. A `MoELayer` is built from parts:
`MoELayer(router, experts, shared_experts, dispatcher)`.
"""
from moedist.moe.capacity import CapacityResult, compute_capacity, select_tokens
from moedist.moe.dispatcher import TokenDispatcher
from moedist.moe.experts import GroupedExperts, LoRAOnExperts, MoELoRAExperts
from moedist.moe.layer import MoEAux, MoELayer
from moedist.moe.losses import importance_loss, load_loss, router_z_loss, switch_load_balancing_loss
from moedist.moe.router import Router, RouterOutput
from moedist.moe.shared import SharedExperts

__all__ = [
    "CapacityResult", "compute_capacity", "select_tokens", "TokenDispatcher", "GroupedExperts",
    "LoRAOnExperts", "MoELoRAExperts", "MoEAux", "MoELayer", "importance_loss", "load_loss",
    "router_z_loss", "switch_load_balancing_loss", "Router", "RouterOutput", "SharedExperts",
]
