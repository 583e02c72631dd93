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

Under ZeRO-3 `materialize_in_chunks_` allocates one chunk (a decoder layer, then the
rest: embedding, head, final norm) at a time, draws it, and hands it to a `partition`
callback (`moedist.train.deepspeed_setup.zero3_partitioner`: DeepSpeed's `zero.Init`
conversion) that keeps only this rank's partition: no rank holds more than one decoder
layer of non-expert weights whole. A module whose `init_weights()` spans chunks (the
root draws the embedding, head and every attention projection from one generator) runs
once per chunk with the other chunks' parameters on meta: the draws are repeated (CPU
time) but land only in this chunk, so the values are the same bits.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from moedist.config import MoedistConfig
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


def build_meta_model(cfg: MoedistConfig, seed: Optional[int] = None) -> nn.Module:
    """`build_model(cfg)` on the meta device: structure, names, shapes, dtypes, requires_grad; no storage."""
    with torch.device("meta"):
        return build_model(cfg, seed=seed)


def build_local_model(cfg: MoedistConfig, ep_rank: int = 0, ep_size: int = 1, device="cpu", seed: Optional[int] = None,
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


def _nan_check(named: Sequence[Tuple[str, torch.Tensor]]) -> None:
    for name, t in named:
        if t is not None and t.is_floating_point() and bool(torch.isnan(t).any()):
            raise ValueError(f"materialize_: {name} was not initialised by any module's init_weights()")


@torch.no_grad()
def materialize_in_chunks_(model: nn.Module, chunks: Sequence[nn.Module], device="cpu",
                           partition: Optional[Callable[[List[nn.Parameter]], None]] = None,
                           load: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """`materialize_` one chunk of parameters at a time, handing each chunk to `partition` once drawn.

    Args:
        model: a meta model (e.g. sharded by `shard_meta_`).
        chunks: submodules of `model`; their parameters form one chunk each, in order, and every
            parameter in none of them forms a last chunk.
        device: where tensors are allocated. Buffers (small, never partitioned) are allocated first.
        partition: called with each drawn chunk's parameters (e.g. to keep only this rank's
            ZeRO-3 partition); None keeps them whole.
        load: called with `model` after each chunk is drawn, before `partition`, while only that
            chunk is real (e.g. `load_hf_weights_into`: copies into the meta parameters of the other
            chunks are dropped). It runs once per chunk.

    Same values as `materialize_`: every `init_weights()` whose module holds a parameter of the
    chunk runs while the parameters of the other chunks are meta (writes to them are dropped, the
    generators advance as in one pass). Raises ValueError naming a tensor no module set.
    """
    slots: List[Tuple[nn.Module, str, nn.Parameter]] = [
        (mod, name, p) for mod in model.modules() for name, p in mod._parameters.items() if p is not None and p.is_meta]
    names: Dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), name)
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = _empty_like(b, device, True)
    seen: set = set()
    groups: List[List[int]] = []
    for chunk in list(chunks) + [model]:
        ids = [id(p) for p in chunk.parameters() if p.is_meta and id(p) not in seen]
        seen.update(ids)
        if ids:
            groups.append(ids)
    owners = [(m, {id(p) for p in m.parameters()}) for m in model.modules() if isinstance(m, OwnsInit)]
    done: Dict[int, nn.Parameter] = {}
    for ids in groups:
        new: Dict[int, nn.Parameter] = {}
        for mod, name, p in slots:
            if id(p) in ids and id(p) not in new:
                q = nn.Parameter(_empty_like(p, device, True), requires_grad=p.requires_grad)
                q.__dict__.update(p.__dict__)
                new[id(p)] = q
        for mod, name, p in slots:  # this chunk real, every other parameter meta while its owners draw
            mod._parameters[name] = new.get(id(p), p)
        wanted = set(ids)
        for mod, owned in owners:
            if owned & wanted:
                mod.init_weights()
        if load is not None:
            load(model)
        _nan_check([(names.get(i, "?"), q) for i, q in new.items()])
        for mod, name, p in slots:
            mod._parameters[name] = p
        if partition is not None:
            partition(list(new.values()))
        done.update(new)
    for mod, name, p in slots:
        mod._parameters[name] = done[id(p)]
    _nan_check(list(model.named_buffers()))
    return model


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The chunks `build_partitioned_model` materializes one at a time: the model's decoder layers."""
    return list(model.layers)


def build_partitioned_model(cfg: MoedistConfig, partition: Callable[[List[nn.Parameter]], None], ep_rank: int = 0,
                            ep_size: int = 1, device="cpu", meta_model: Optional[nn.Module] = None,
                            load: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """`build_local_model`, but each decoder layer (then the rest) is drawn, given its loaded weights
    (`load`, see `materialize_in_chunks_`) and handed to `partition` (ZeRO-3: kept as this rank's
    partition only) before the next is allocated."""
    model = meta_model if meta_model is not None else build_meta_model(cfg)
    shard_meta_(model, ep_rank, ep_size)
    return materialize_in_chunks_(model, decoder_layers(model), device, partition, load)
