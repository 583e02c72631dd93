"""Gradient reduction and clipping under expert parallelism, without DeepSpeed.

Why the two kinds of parameters are reduced differently (W = world size,
L_r = mean loss of rank r's micro-batch, global loss = (1/W) sum_r L_r):

* A non-expert parameter is replicated; rank r's copy only touches rank r's
  tokens, so its local gradient is dL_r/dtheta. Sum over the world, divide by W.
* An expert lives on one rank per EP group. The all-to-all backward has already
  brought it dL_s/dphi from every rank s of its EP group. Summing over the EDP
  group (one replica per EP group) adds the remaining EP groups; dividing by
  the full W (not the EDP size) gives d(global loss)/dphi. This is DeepSpeed's
  rule: expert gradients are reduced over the EDP group and divided by the
  full data-parallel size.

Both are therefore "pre-scale by 1/W, then all-reduce SUM" over their group.
Gradients are flattened into buckets per (group, dtype, device) so that a few
large collectives replace one per parameter, and all buckets are in flight at
once before any is unpacked.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

EXPERT_ATTR = "moedist_expert"


def mark_expert_param(p: nn.Parameter) -> nn.Parameter:
    """Tag `p` as an expert parameter (sharded over EP, reduced over EDP); returns `p`."""
    setattr(p, EXPERT_ATTR, True)
    return p


def is_expert_param(p: torch.Tensor) -> bool:
    """True for parameters tagged by `mark_expert_param`."""
    return getattr(p, EXPERT_ATTR, False) is True


ParamsLike = Union[nn.Module, Iterable[torch.Tensor]]


def _params(model_or_params: ParamsLike) -> List[torch.Tensor]:
    if isinstance(model_or_params, nn.Module):
        return list(model_or_params.parameters())
    return list(model_or_params)


def _buckets(tensors: List[torch.Tensor], bucket_numel: int) -> List[List[torch.Tensor]]:
    """Consecutive runs of same dtype/device tensors of at most `bucket_numel` elements
    (a single larger tensor gets a bucket of its own). The split depends only on
    shapes, dtypes and order, so every rank of a group forms the same buckets."""
    by_kind: Dict[Tuple[torch.dtype, torch.device], List[List[torch.Tensor]]] = {}
    sizes: Dict[Tuple[torch.dtype, torch.device], int] = {}
    for t in tensors:
        key = (t.dtype, t.device)
        runs = by_kind.setdefault(key, [[]])
        if runs[-1] and sizes[key] + t.numel() > bucket_numel:
            runs.append([])
            sizes[key] = 0
        runs[-1].append(t)
        sizes[key] = sizes.get(key, 0) + t.numel()
    return [run for runs in by_kind.values() for run in runs]


def _all_reduce_scaled(grads: List[torch.Tensor], scale: float, group, bucket_numel: int) -> None:
    """grads[i] <- sum over `group` of (scale * grads[i]), in place.

    Every rank of `group` sends and receives each bucket `[sum of numels]`; all
    buckets are launched asynchronously, then waited for and copied back.
    """
    pending = []
    for bucket in _buckets(grads, bucket_numel):
        flat = torch.cat([g.reshape(-1) for g in bucket])  # [sum numel], a fresh buffer
        flat.mul_(scale)
        pending.append((bucket, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _grads_to_reduce(params: List[torch.Tensor], group) -> List[torch.Tensor]:
    """Gradients of `params` that some rank of `group` has, zero-filled where this rank has none.

    A parameter that saw no tokens on this rank (an expert that got none) still
    joins the flat buffers when another rank has its gradient, or the ranks would
    disagree on the buffer layout. A parameter without gradient on every rank keeps
    `grad=None`, exactly as in one process (optimizers skip it). One small
    all-reduce of flags `[len(params)]` (MAX) over `group` decides.
    """
    if not params:
        return []
    # on the parameters' device: nccl reduces only CUDA tensors
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                            device=params[0].device)  # [P]
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=group)
    grads = []
    for p, flag in zip(params, has_grad.tolist()):
        if not flag:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse:
            raise ValueError("sync_gradients: sparse gradients are not supported (parameter of shape "
                             f"{tuple(p.shape)}); use dense embeddings")
        grads.append(p.grad)
    return grads


def sync_gradients(model_or_params: ParamsLike, dims, is_expert_param: Callable[[torch.Tensor], bool] = is_expert_param,
                   bucket_size_mb: float = 25.0) -> None:
    """Make every gradient the gradient of the mean loss over the global batch.

    Call after `loss.backward()` on every rank (collective), with each rank's loss
    the mean over its own micro-batch and micro-batches of equal size. Non-expert
    gradients are summed over the world, expert gradients over the EDP group, both
    divided by the world size (see the module docstring for why).

    A trainable parameter without a gradient on this rank gets a zero gradient when
    another rank of its group has one, and stays `None` when no rank has one;
    frozen parameters are skipped.

    Args:
        model_or_params: a module or its parameters (same order on every rank).
        dims: a built `ParallelDims`.
        is_expert_param: predicate for expert parameters.
        bucket_size_mb: largest flat buffer per collective, in MiB.
    """
    if bucket_size_mb <= 0:
        raise ValueError(f"bucket_size_mb={bucket_size_mb} must be > 0")
    if dims.world_size == 1:
        return
    trainable = [p for p in _params(model_or_params) if p.requires_grad]
    dense = [p for p in trainable if not is_expert_param(p)]
    expert = [p for p in trainable if is_expert_param(p)]
    scale = 1.0 / dims.world_size
    bucket_bytes = int(bucket_size_mb * 2**20)
    for params, group, group_size in ((dense, dims.world_group, dims.world_size),
                                      (expert, dims.edp_group, dims.edp_size)):
        if group_size == 1:  # ep_size == world: nothing to add, only the 1/W
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            continue
        grads = _grads_to_reduce(params, group)
        if grads:
            numel = max(1, bucket_bytes // grads[0].element_size())
            _all_reduce_scaled(grads, scale, group, numel)


@torch.no_grad()
def clip_grad_norm_(params: ParamsLike, max_norm: float, dims, norm_type: float = 2.0,
                    is_expert_param: Callable[[torch.Tensor], bool] = is_expert_param) -> torch.Tensor:
    """Clip gradients by the true global norm under expert parallelism; return that norm.

    Call after `sync_gradients` (collective over the EP group). Non-expert
    gradients are then identical on every rank and are counted once; expert
    gradients differ across the EP group and are summed over it, so each expert
    counts once, as in a single-process model holding all experts.

    Args:
        params: a module or parameters (same order on every rank).
        max_norm: largest allowed total norm (> 0).
        dims: a built `ParallelDims`.
        norm_type: p of the p-norm (> 0), or `math.inf`.
        is_expert_param: predicate for expert parameters.

    Returns:
        The total norm before clipping, a 0-dim float32 tensor (the same on all ranks).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm} must be > 0")
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type={norm_type} must be > 0 or math.inf")
    plist = [p for p in _params(params) if p.grad is not None]
    dense = [p.grad for p in plist if not is_expert_param(p)]
    expert = [p.grad for p in plist if is_expert_param(p)]
    device = plist[0].grad.device if plist else torch.device("cpu")

    def local(grads: List[torch.Tensor]) -> torch.Tensor:
        # inf-norm: max |g|; p-norm: sum |g|^p (the root is taken once, at the end)
        out = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            g = g.detach().float().abs()
            out = torch.maximum(out, g.max()) if norm_type == math.inf else out + g.pow(norm_type).sum()
        return out

    dense_part, expert_part = local(dense), local(expert)
    if dims.ep_size > 1:
        op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
        dist.all_reduce(expert_part, op=op, group=dims.ep_group)
    if norm_type == math.inf:
        total = torch.maximum(dense_part, expert_part)
    else:
        total = (dense_part + expert_part).pow(1.0 / norm_type)
    clip_coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in dense + expert:
        g.mul_(clip_coef.to(device=g.device, dtype=g.dtype))
    return total
