"""Build a model on the `meta` device, shard it, then allocate and draw only what this rank holds.

    model = build_local_model(cfg, ep_rank, ep_size, device)   # this rank's experts only, real tensors
    parallelize(model, dims.ep_comm)                             # wires the dispatcher (already sharded)

`build_model(cfg)` under ``torch.device("meta")`` allocates nothing; `shard_experts_`
slices the meta expert stacks to this rank's [ep_rank * L, (ep_rank + 1) * L);
`materialize_` then allocates every parameter and buffer on `device` and calls
`init_weights()` on every module (`moedist.moe.init.OwnsInit`). Each part draws
from its own seeded CPU generators (experts by global id), so the values are the
same bits as an eager `build_model(cfg)` followed by `parallelize`: the EP-invariance
and checkpoint tests hold unchanged. No rank ever allocates another rank's experts.

Under ZeRO-3 the replicated parts are still materialized whole on each rank and
partitioned by `deepspeed.initialize` (one model's worth of non-expert weights per
rank, transiently); the experts are sharded before that.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from moedist.models.build import build_model, moe_layers
from moedist.models.parallelize import shard_experts_
from moedist.moe.init import OwnsInit


def _empty_like(t: torch.Tensor, device, poison: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    if poison and out.is_floating_point():
        out.fill_(float("nan"))  # anything no init_weights() draws stays NaN and is caught below
    return out


@torch.no_grad()
def materialize_(model: nn.Module, device="cpu", init: bool = True) -> nn.Module:
    """Allocate every meta parameter/buffer of `model` on `device` and draw its values (in place).

    init=False only allocates (uninitialised memory): for a copy whose every value is loaded next.

    Parameter objects are replaced (tags such as `moedist_expert` and `requires_grad` are kept;
    a parameter shared by two modules stays shared). Raises ValueError naming a tensor that no
    module's `init_weights()` set.
    """
    memo = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in memo:
                new = nn.Parameter(_empty_like(p, device, init), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)  # tags set on the meta parameter
                memo[id(p)] = new
            mod._parameters[name] = memo[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = _empty_like(b, device, init)
    if not init:
        return model
    for mod in model.modules():
        if isinstance(mod, OwnsInit):
            mod.init_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None and t.is_floating_point() and bool(torch.isnan(t).any()):
            raise ValueError(f"materialize_: {name} was not initialised by any module's init_weights()")
    return model


def shard_meta_(model: nn.Module, ep_rank: int, ep_size: int) -> nn.Module:
    """Keep only this rank's experts in every MoE layer (on meta tensors: nothing is allocated)."""
    if ep_size > 1:
        for layer in moe_layers(model):
            shard_experts_(layer.experts, ep_rank, ep_size)
    return model


def build_meta_model(cfg, seed: Optional[int] = None) -> nn.Module:
    """`build_model(cfg)` on the meta device: structure, names, shapes, dtypes, requires_grad; no storage."""
    with torch.device("meta"):
        return build_model(cfg, seed=seed)


def build_local_model(cfg, ep_rank: int = 0, ep_size: int = 1, device="cpu", seed: Optional[int] = None,
                      meta_model: Optional[nn.Module] = None, init: bool = True) -> nn.Module:
    """This rank's part of the model of `cfg`: built on meta, experts sharded, then materialized on `device`.

    Args:
        cfg: a MoedistConfig (model, moe, lora, train.seed).
        ep_rank, ep_size: this rank's expert-parallel coordinates.
        device: where the tensors are allocated.
        seed: init seed (default cfg.train.seed).
        meta_model: an unsharded model from `build_meta_model` to use instead of building one.
        init: False leaves the values uninitialised (every one is loaded next, e.g. a checkpoint shadow).
    """
    model = meta_model if meta_model is not None else build_meta_model(cfg, seed)
    shard_meta_(model, ep_rank, ep_size)
    return materialize_(model, device, init)
