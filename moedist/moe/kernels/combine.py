"""The weighted combine: out[t] = sum over the pairs n of token t of w[n] * y[n], in at least float32.

Shapes: N pairs, T tokens, H width. `moedist.moe.dispatcher` runs it after the all-to-all back;
`kernels.gated_ffn.GroupedGatedFFNTokens` does the same sum per expert, fused with the FFN.
"""
from __future__ import annotations

import torch

from typing import Callable

from moedist.moe.kernels.slices import row_dot


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: half types sum in float32 (as DeepSpeed's combine einsum does), float64 stays."""
    return torch.promote_types(dtype, torch.float32)


def weighted_scatter_add(y_NH: torch.Tensor, w_N: torch.Tensor, token_N: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out[t] = sum over rows n with token[n] = t of w[n] * y[n]. Returns [T, H] in
    `accumulate_dtype(y_NH.dtype)`: the products and the sum are in at least float32, so a bf16
    result is rounded once, not once per pair (differentiable in y and w; y's gradient in y's dtype)."""
    return _WeightedScatterAdd.apply(y_NH, w_N, token_N, num_tokens)


def gather_combine(rows_fn: Callable[[torch.Tensor], torch.Tensor], x_TH: torch.Tensor, token_N: torch.Tensor,
                   weight_N: torch.Tensor) -> torch.Tensor:
    """The unfused EP-1 path of a `forward_tokens`: gather the pairs' token rows [N, H], run
    `rows_fn` on them ([N, H] -> [N, H]), and combine per token with `weighted_scatter_add`. [T, H]."""
    return weighted_scatter_add(rows_fn(x_TH.index_select(0, token_N)), weight_N, token_N, x_TH.shape[0])


class _WeightedScatterAdd(torch.autograd.Function):
    """out[T, H] = zeros (>= fp32); out[token[n]] += w[n] * y[n]. The same kernels as
    `zeros.index_add(0, token, y * w)` under autograd, with one [N, H] buffer
    fewer in each direction (the sum is accumulated in place, and the gradient
    of y is scaled in the gathered buffer). For fp32/fp64 inputs nothing is cast."""

    @staticmethod
    def forward(ctx, y_NH, w_N, token_N, num_tokens):
        acc = accumulate_dtype(y_NH.dtype)
        out_TH = y_NH.new_zeros(num_tokens, y_NH.shape[1], dtype=acc)
        out_TH.index_add_(0, token_N, y_NH.to(acc) * w_N.to(acc).unsqueeze(1))
        ctx.save_for_backward(y_NH, w_N, token_N)
        return out_TH

    @staticmethod
    def backward(ctx, g_TH):
        y_NH, w_N, token_N = ctx.saved_tensors
        acc = g_TH.dtype
        g_NH = g_TH.index_select(0, token_N)  # [N, H] (accumulation dtype)
        d_w = row_dot(g_NH, y_NH.to(acc)).to(w_N.dtype) if ctx.needs_input_grad[1] else None  # [N]
        d_y = g_NH.mul_(w_N.to(acc).unsqueeze(1)).to(y_NH.dtype) if ctx.needs_input_grad[0] else None
        return d_y, d_w, None, None
