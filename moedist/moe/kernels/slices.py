"""Per-group row slices and the in-place matmuls every kernel of this package is built from.

Rows are sorted by group: group l owns the contiguous slice s_l = [start_l, end_l)
of length counts[l]. Writing each group's product into one preallocated tensor
(`mm_into`, `wgrad_into`) is what spares the kernels the concatenation in forward
and the split + stack of L per-group gradients in backward.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

Bounds = List[Tuple[int, int, int]]  # (group l, start, end) of every non-empty group


def bounds(counts: Sequence[int]) -> Bounds:
    """(group, start, end) of every non-empty group's row slice."""
    out, start = [], 0
    for l, c in enumerate(counts):
        if c > 0:
            out.append((l, start, start + c))
        start += c
    return out


def mm_into(out_NO: torch.Tensor, x_NI: torch.Tensor, w_LIO: torch.Tensor, bnds: Bounds, transpose_w: bool = False,
            accumulate: bool = False) -> torch.Tensor:
    """out[s_l] (+)= x[s_l] @ w[l] (or w[l]^T) for every group slice s_l, written in place."""
    for l, a, b in bnds:
        w = w_LIO[l].t() if transpose_w else w_LIO[l]
        if accumulate:
            out_NO[a:b].addmm_(x_NI[a:b], w)
        else:
            torch.mm(x_NI[a:b], w, out=out_NO[a:b])
    return out_NO


def row_dot(a_NK: torch.Tensor, b_NK: torch.Tensor, out_N: Optional[torch.Tensor] = None,
            rows: int = 1024) -> torch.Tensor:
    """out[n] = <a[n], b[n]> for every row, `rows` rows at a time. [N].

    `torch.linalg.vecdot` is a product then a sum: on all N rows at once its [N, K] product
    is a whole extra activation-sized tensor (the layer's backward peak, in the combine's
    weight gradient); a chunk at a time it stays [rows, K] and is reused."""
    out_N = a_NK.new_empty(a_NK.shape[0]) if out_N is None else out_N
    for s in range(0, a_NK.shape[0], rows):
        torch.linalg.vecdot(a_NK[s:s + rows], b_NK[s:s + rows], out=out_N[s:s + rows])
    return out_N


def zero_empty_groups(bnds: Bounds, num_groups: int, *grads_L: Optional[torch.Tensor]) -> None:
    """Zero slot l of every given [L, ...] gradient for the groups without rows (their
    slots were allocated with `new_empty` and never written)."""
    filled = {l for l, _, _ in bnds}
    for l in range(num_groups):
        if l not in filled:
            for d in grads_L:
                if d is not None:
                    d[l].zero_()


def wgrad_into(dw_LIO: torch.Tensor, a_NI: torch.Tensor, b_NO: torch.Tensor, bnds: Bounds) -> torch.Tensor:
    """dW[l] = a[s_l]^T @ b[s_l] into dw_LIO [L, I, O] (zeros for empty groups)."""
    for l, s, e in bnds:
        torch.mm(a_NI[s:e].t(), b_NO[s:e], out=dw_LIO[l])
    zero_empty_groups(bnds, dw_LIO.shape[0], dw_LIO)
    return dw_LIO


def wgrad(a_NI: torch.Tensor, b_NO: torch.Tensor, num_groups: int, bnds: Bounds) -> torch.Tensor:
    """dW[l] = a[s_l]^T @ b[s_l] as one new [L, I, O] tensor (zeros for empty groups)."""
    return wgrad_into(a_NI.new_empty((num_groups, a_NI.shape[1], b_NO.shape[1])), a_NI, b_NO, bnds)


class GradSlots:
    """Input gradients of an autograd Function by name instead of by position.

    `GradSlots(("x", "w", "counts"), ctx.needs_input_grad)`: `wants("w")` says whether
    autograd needs that input's gradient, `g["w"] = dw` records it, and `as_tuple()`
    returns them in `forward`'s argument order (None for the rest), the tuple
    `backward` must return.
    """

    def __init__(self, names: Sequence[str], needs_input_grad: Sequence[bool]):
        if len(names) != len(needs_input_grad):
            raise ValueError(f"GradSlots: {len(names)} names for {len(needs_input_grad)} inputs")
        self.names = tuple(names)
        self._needs = dict(zip(self.names, needs_input_grad))
        self._grads: Dict[str, Optional[torch.Tensor]] = {}

    def wants(self, name: str) -> bool:
        return self._needs[name]

    def __setitem__(self, name: str, grad: Optional[torch.Tensor]) -> None:
        if name not in self._needs:
            raise KeyError(f"GradSlots: no input named {name!r} (inputs: {', '.join(self.names)})")
        self._grads[name] = grad

    def __getitem__(self, name: str) -> Optional[torch.Tensor]:
        return self._grads.get(name)

    def as_tuple(self) -> tuple:
        return tuple(self._grads.get(n) for n in self.names)


class KeptGrads:
    """Weights whose `.grad` is kept between steps and written in place by the kernels' backward.

    `params`: the Parameters (None for an absent weight), in the kernel's order. A runner that
    would zero them between steps calls `mark_stale()` instead: the first backward of the next
    step that takes them (`take_stale()`) then writes each expert's gradient straight into
    `.grad` (and zeroes the experts without rows) rather than adding to it, which spares a
    zeroing pass and an add pass over every [L, I, O] gradient per step. Later backwards of the
    step (gradient accumulation) add. Code that cannot write in place calls `zero_if_stale()`
    first, after which adding is right again.
    """

    def __init__(self, params: Sequence[Optional[torch.Tensor]]):
        self.params = tuple(params)
        self.stale = False

    def mark_stale(self) -> None:
        self.stale = True

    def take_stale(self) -> bool:
        """True once after `mark_stale()` (the caller overwrites the gradients), then False."""
        stale, self.stale = self.stale, False
        return stale

    def zero_if_stale(self) -> None:
        if self.take_stale():
            for p in self.params:
                if p is not None and p.grad is not None:
                    p.grad.zero_()


class ExpertSlice(torch.autograd.Function):
    """`ExpertSlice.apply(w_LIO, l, param[, fresh])` -> w[l] [I, O], whose gradient backward puts
    into slot l of `param.grad` (allocating it as zeros on the first backward) and returns None.

    For plain-autograd code that uses one expert of a stacked [L, I, O] weight at a time:
    indexing (or `unbind`) the stacked weight in autograd makes backward allocate a full
    [L, I, O] gradient per step (zeros + copy, or a stack of L slices), which with glibc's
    default malloc is a fresh mmap that page-faults on every write. Here each expert's
    [I, O] gradient goes into the kept `.grad` as soon as it exists, so nothing of [L, I, O]
    is allocated after the first step: copied over the slot when l is in `fresh` (a set
    shared by the step's slices: the slots whose stale values the first backward overwrites,
    see `KeptGrads`; l is then removed), else added (`grad += new`, as AccumulateGrad does).
    `param` is the Parameter `w_LIO` belongs to (usually `w_LIO` itself). Like
    `GroupedGatedFFN`'s grad_params: hooks on `param` do not see these gradients.
    """

    @staticmethod
    def forward(ctx, w_LIO: torch.Tensor, l: int, param: torch.Tensor, fresh: Optional[set] = None) -> torch.Tensor:
        ctx.l, ctx.param, ctx.fresh = l, param, fresh
        return w_LIO.detach()[l]  # [I, O], no copy

    @staticmethod
    def backward(ctx, g_IO: torch.Tensor):
        p, l, fresh = ctx.param, ctx.l, ctx.fresh
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if fresh is not None and l in fresh:
            fresh.discard(l)
            p.grad[l].copy_(g_IO)
        else:
            p.grad[l].add_(g_IO)
        return None, None, None, None
