"""GroupedMM: one matmul per group on contiguous row slices, into one output.

Math (rows of group l are the slice s_l; x_NI [N, I], w_LIO [L, I, O]):
    forward   y[s_l]  = x[s_l] @ w[l]                      y_NO [N, O]
    backward  dx[s_l] = dy[s_l] @ w[l]^T                   dx_NI [N, I]
              dw[l]   = x[s_l]^T @ dy[s_l]  (0 if empty)   dw_LIO [L, I, O]
Saves x and w (no copies); recomputes nothing.

Why not plain autograd: `torch.cat([x_l @ w[l] for l])` materialises the L
per-group outputs and then their concatenation (2 x [N, O] at the peak), and its
backward splits dy and stacks L separate [I, O] gradients into [L, I, O] (2 x the
weight gradient at the peak). Here every product is written in place into one
[N, O] output, one [N, I] input gradient and one [L, I, O] weight gradient, with
the same mm kernels.
"""
from __future__ import annotations

from typing import Tuple

import torch

from moedist.moe.kernels.slices import GradSlots, bounds, mm_into, wgrad


class GroupedMM(torch.autograd.Function):
    """`GroupedMM.apply(x_NI, w_LIO, counts)` -> y_NO; counts a tuple of host ints summing to N."""

    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, w_LIO: torch.Tensor, counts: Tuple[int, ...]) -> torch.Tensor:
        bnds = bounds(counts)
        ctx.bounds, ctx.num_groups = bnds, w_LIO.shape[0]
        ctx.save_for_backward(x_NI, w_LIO)
        return mm_into(x_NI.new_empty((x_NI.shape[0], w_LIO.shape[2])), x_NI, w_LIO, bnds)  # [N, O]

    @staticmethod
    def backward(ctx, dy_NO: torch.Tensor):
        x_NI, w_LIO = ctx.saved_tensors
        g = GradSlots(("x", "w", "counts"), ctx.needs_input_grad)
        dy_NO = dy_NO.contiguous()
        if g.wants("x"):
            g["x"] = mm_into(dy_NO.new_empty(x_NI.shape), dy_NO, w_LIO, ctx.bounds, transpose_w=True)  # [N, I]
        if g.wants("w"):
            g["w"] = wgrad(x_NI, dy_NO, ctx.num_groups, ctx.bounds)  # [L, I, O]
        return g.as_tuple()
