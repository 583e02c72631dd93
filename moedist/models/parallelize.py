"""Apply expert parallelism to a built model (torchtitan style).

Each `MoELayer` keeps the experts [ep_rank * L, (ep_rank + 1) * L) and gets a
dispatcher over the EP communicator. Expert parameters (tagged
`moedist_expert`) are sliced along their leading expert dimension; every other
parameter stays replicated. Because experts are seeded by global id, slicing a
fully built model equals building the shard directly (`moedist.models.materialize`
builds on the meta device and materializes only the shard).

This is where the parts are checked, once: every layer's experts must be a
`moedist.moe.parts.Experts` and its dispatcher a `Dispatcher` (a TypeError names
the layer, the part and the member it lacks).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moedist.distributed.comm import ExpertParallelComm
from moedist.distributed.grad_sync import is_expert_param
from moedist.moe.dispatcher import TokenDispatcher
from moedist.moe.experts import tag_expert_param
from moedist.moe.layer import MoELayer
from moedist.moe.parts import Dispatcher, Experts, check_part


def shard_experts_(experts: nn.Module, ep_rank: int, ep_size: int) -> nn.Module:
    """Keep only this rank's experts in an expert module, in place."""
    E = experts.num_experts
    if E % ep_size:
        raise ValueError(f"num_experts={E} is not divisible by ep_size={ep_size}")
    if experts.num_local != E:
        raise ValueError("shard_experts_: experts are already sharded")
    L = E // ep_size
    first = ep_rank * L
    for mod in experts.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if is_expert_param(p):
                new = nn.Parameter(p.data[first:first + L].clone(), requires_grad=p.requires_grad)
                setattr(mod, name, tag_expert_param(new))
    experts.num_local, experts.first_expert = L, first
    return experts


def parallelize(model: nn.Module, comm: ExpertParallelComm) -> nn.Module:
    """Shard every MoE layer's experts over `comm` (the EP group) and wire its dispatcher.

    A model whose experts are already this rank's shard (`moedist.models.materialize.build_local_model`)
    only gets its dispatchers.
    """
    for path, layer in model.named_modules():
        if isinstance(layer, MoELayer):
            check_part(layer.experts, Experts, f"{path or 'model'}.experts")
            check_part(layer.dispatcher, Dispatcher, f"{path or 'model'}.dispatcher")
            ex = layer.experts
            if comm.size > 1 and ex.num_local == ex.num_experts:
                shard_experts_(ex, comm.rank, comm.size)
            elif ex.num_local != ex.num_experts // comm.size or ex.first_expert != comm.rank * ex.num_local:
                raise ValueError(f"parallelize: experts [{ex.first_expert}, {ex.first_expert + ex.num_local}) "
                                 f"are not EP rank {comm.rank}'s shard at ep_size={comm.size}")
            layer.dispatcher = TokenDispatcher(layer.num_experts, comm)
    return model
