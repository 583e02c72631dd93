"""GatherLoRAProj: a frozen projection gathered per pair plus that pair's expert's LoRA term.

Math (rows n of group l are the slice s_l; token t = token[n]; s the LoRA scaling):
    forward   xa_n = x_n A[l]                 xa [N, r]
              y_n  = base[t] + s * xa_n B[l]  y [N, O]  (gather, then one addmm per group)
    backward  dbase[t] += dy_n  (index_add)   dbase [T, O]
              dB[l] = s * xa[s_l]^T dy[s_l]   dB [L, r, O]
              dxa   = s * dy B[l]^T           dxa [N, r]
              dA[l] = x[s_l]^T dxa[s_l]       dA [L, I, r]
              dx    = dxa A[l]^T              dx [N, I]
Inputs: base_TO [T, O] (once per token), x_NI [N, I], token_N [N], A [L, I, r],
B [L, r, O]. Saves x, token, A, B and xa [N, r]; recomputes nothing.

Why not plain autograd: `base[token] + s * (x A) B` materialises the [N, O] delta,
its scaled copy and the sum (3 [N, O]); here the LoRA term is accumulated into the
gathered rows in place, and backward scales the [N, r] gradient, not an [N, O] one.
"""
from __future__ import annotations

from typing import Tuple

import torch

from moedist.moe.kernels.slices import GradSlots, bounds, mm_into, wgrad


class GatherLoRAProj(torch.autograd.Function):
    """`GatherLoRAProj.apply(base_TO, x_NI, token_N, lora_A, lora_B, counts, scaling)` -> y_NO.

    counts: tuple of host ints summing to N; all tensors but token_N share one dtype.
    """

    @staticmethod
    def forward(ctx, base_TO: torch.Tensor, x_NI: torch.Tensor, token_N: torch.Tensor, lora_A: torch.Tensor,
                lora_B: torch.Tensor, counts: Tuple[int, ...], scaling: float) -> torch.Tensor:
        bnds = bounds(counts)
        out_NO = base_TO.index_select(0, token_N)  # [N, O]
        xa_Nr = mm_into(x_NI.new_empty((x_NI.shape[0], lora_A.shape[2])), x_NI, lora_A, bnds)  # [N, r]
        for l, a, b in bnds:
            out_NO[a:b].addmm_(xa_Nr[a:b], lora_B[l], alpha=scaling)
        ctx.bounds, ctx.scaling, ctx.num_tokens, ctx.num_groups = bnds, scaling, base_TO.shape[0], lora_A.shape[0]
        ctx.save_for_backward(x_NI, token_N, lora_A, lora_B, xa_Nr)
        return out_NO

    @staticmethod
    def backward(ctx, d_NO: torch.Tensor):
        x_NI, token_N, lora_A, lora_B, xa_Nr = ctx.saved_tensors
        g = GradSlots(("base", "x", "token", "lora_A", "lora_B", "counts", "scaling"), ctx.needs_input_grad)
        bnds, s, L = ctx.bounds, ctx.scaling, ctx.num_groups
        d_NO = d_NO.contiguous()
        if g.wants("base"):
            g["base"] = d_NO.new_zeros((ctx.num_tokens, d_NO.shape[1])).index_add_(0, token_N, d_NO)  # [T, O]
        if g.wants("lora_B"):
            g["lora_B"] = wgrad(xa_Nr, d_NO, L, bnds).mul_(s)  # [L, r, O]
        if g.wants("x") or g.wants("lora_A"):
            dxa_Nr = mm_into(d_NO.new_empty(xa_Nr.shape), d_NO, lora_B, bnds, transpose_w=True).mul_(s)  # [N, r]
            if g.wants("lora_A"):
                g["lora_A"] = wgrad(x_NI, dxa_Nr, L, bnds)  # [L, I, r]
            if g.wants("x"):
                g["x"] = mm_into(x_NI.new_empty(x_NI.shape), dxa_Nr, lora_A, bnds, transpose_w=True)  # [N, I]
        return g.as_tuple()
