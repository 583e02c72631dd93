"""The small communicator that `moedist.moe` and `moedist.layers` receive.

Layers never import `torch.distributed` themselves (DESIGN.md); they call the
methods of an `ExpertParallelComm`. With `group=None` (EP size 1) every method
is a local no-op, so the same code path runs in one process with no
collectives at all.

Every collective here is a tiny function whose comment says who sends what to
whom and with which shapes; the ones that carry activations are autograd
functions whose backward is the reverse collective.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


class _AllToAllSingle(torch.autograd.Function):
    """Uneven all-to-all over the rows of a 2-D tensor, differentiable.

    Forward: rank r sends rows `x[sum(in_splits[:j]) : sum(in_splits[:j+1])]`
    to rank j and receives `out_splits[j]` rows from rank j, in rank order.
    Backward: the gradient rows travel the other way (splits swapped).
    """

    @staticmethod
    def forward(ctx, x_NH: torch.Tensor, out_splits: list, in_splits: list, group) -> torch.Tensor:
        ctx.group = group
        ctx.out_splits = out_splits
        ctx.in_splits = in_splits
        x_NH = x_NH.contiguous()
        out_MH = x_NH.new_empty((sum(out_splits),) + tuple(x_NH.shape[1:]))  # [M, H]
        dist.all_to_all_single(out_MH, x_NH, out_splits, in_splits, group=group)
        return out_MH

    @staticmethod
    def backward(ctx, grad_MH: torch.Tensor):
        grad_MH = grad_MH.contiguous()
        grad_NH = grad_MH.new_empty((sum(ctx.in_splits),) + tuple(grad_MH.shape[1:]))
        dist.all_to_all_single(grad_NH, grad_MH, ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_NH, None, None, None


class ExpertParallelComm:
    """Collectives over one expert-parallel (EP) group.

    Args:
        group: the EP process group, or None for EP size 1 (no collectives).
    """

    def __init__(self, group: Optional["dist.ProcessGroup"] = None):
        self.group = group
        if group is None:
            self.size, self.rank = 1, 0
        else:
            self.size = dist.get_world_size(group)
            self.rank = dist.get_rank(group)

    @classmethod
    def single(cls) -> "ExpertParallelComm":
        """The EP-size-1 communicator: every collective is the identity."""
        return cls(None)

    def __repr__(self) -> str:
        return f"ExpertParallelComm(size={self.size}, rank={self.rank})"

    def all_to_all(self, x_NH: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int]) -> torch.Tensor:
        """Uneven, differentiable all-to-all of rows (see `_AllToAllSingle`).

        x_NH: [sum(in_splits), ...] rows for ranks 0..size-1 in order.
        Returns [sum(out_splits), ...] rows received from ranks 0..size-1 in order.
        """
        if self.size == 1:
            return x_NH
        return _AllToAllSingle.apply(x_NH, [int(s) for s in out_splits], [int(s) for s in in_splits], self.group)

    def exchange_counts(self, counts_PL: torch.Tensor) -> torch.Tensor:
        """Tell each rank how many rows it will get from me, per local expert.

        counts_PL: [size, L] int64, row p = rows I send to rank p for each of its
        L local experts. Returns [size, L]: row p = rows rank p sends me for each
        of my local experts. Not differentiable (counts only).
        """
        if self.size == 1:
            return counts_PL
        send = counts_PL.contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the EP group (for logging counters; no autograd)."""
        if self.size == 1:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out
