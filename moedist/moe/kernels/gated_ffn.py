"""GroupedGatedFFN: a gated FFN per expert on contiguous row slices, fused.

Math (rows of expert l are the slice s_l; x [N, H]; Wg, Wu [L, H, F]; Wd [L, F, H];
phi the gate activation, phi' its derivative):
    forward   g = x Wg[l],  u = x Wu[l],  h = phi(g) * u,  y[s_l] = h Wd[l]      y [N, H]
    backward  dh = dy Wd[l]^T                       dWd[l] = h^T dy
              du = dh * phi(g)                      dWu[l] = x^T du
              dg = phi'(g) * dh * u                 dWg[l] = x^T dg
              dx = dg Wg[l]^T + du Wu[l]^T  (one mm + one addmm)
Saves x, the weights and, per expert, g and u: 2 [N, F] tensors in all.
Recomputes phi(g) and h = phi(g) * u in backward.

Why not plain autograd: the unfused graph keeps g, u, phi(g) and h (4 [N, F]) for
backward plus the cat/stack copies of `GroupedMM`'s plain form. Working one expert
at a time also keeps the [n_l, F] temporaries small (reused by the allocator and
still in cache for the elementwise passes); each expert's output is written
straight into the one [N, H] result. The same mm and activation-backward kernels
as autograd, so the numbers match it to rounding.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from moedist.moe.kernels.slices import GradSlots, bounds, zero_empty_groups

Act = Callable[[torch.Tensor], torch.Tensor]  # phi(z)
ActGrad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (incoming grad, z) -> grad * phi'(z)


class GroupedGatedFFN(torch.autograd.Function):
    """`GroupedGatedFFN.apply(x_NH, w_gate, w_up, w_down, counts, phi, dphi)` -> y_NH.

    counts: tuple of host ints summing to N; phi / dphi: the activation and its
    backward (`moedist.moe.ffn.GATED`, `GATED_GRAD`). All tensors share one dtype.
    """

    @staticmethod
    def forward(ctx, x_NH: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                counts: Tuple[int, ...], phi: Act, dphi: ActGrad) -> torch.Tensor:
        bnds = bounds(counts)
        y_NH = x_NH.new_empty((x_NH.shape[0], w_down.shape[2]))  # [N, H]
        gates, ups = [], []
        for l, a, b in bnds:
            x_l = x_NH[a:b]
            gate_l = torch.mm(x_l, w_gate[l])  # [n_l, F]
            up_l = torch.mm(x_l, w_up[l])  # [n_l, F]
            h_l = phi(gate_l).mul_(up_l)  # [n_l, F]
            torch.mm(h_l, w_down[l], out=y_NH[a:b])
            gates.append(gate_l)
            ups.append(up_l)
        ctx.bounds, ctx.num_groups, ctx.phi, ctx.dphi = bnds, w_up.shape[0], phi, dphi
        ctx.save_for_backward(x_NH, w_gate, w_up, w_down, *gates, *ups)
        return y_NH

    @staticmethod
    def backward(ctx, dy_NH: torch.Tensor):
        x_NH, w_gate, w_up, w_down, *saved = ctx.saved_tensors
        n = len(ctx.bounds)
        gates, ups = saved[:n], saved[n:]
        g = GradSlots(("x", "w_gate", "w_up", "w_down", "counts", "phi", "dphi"), ctx.needs_input_grad)
        phi, dphi = ctx.phi, ctx.dphi
        dy_NH = dy_NH.contiguous()
        dx = x_NH.new_empty(x_NH.shape) if g.wants("x") else None  # [N, H]
        d_gate = w_gate.new_empty(w_gate.shape) if g.wants("w_gate") else None  # [L, H, F]
        d_up = w_up.new_empty(w_up.shape) if g.wants("w_up") else None  # [L, H, F]
        d_down = w_down.new_empty(w_down.shape) if g.wants("w_down") else None  # [L, F, H]
        for (l, a, b), gate_l, up_l in zip(ctx.bounds, gates, ups):
            x_l, dy_l = x_NH[a:b], dy_NH[a:b]
            dh_l = torch.mm(dy_l, w_down[l].t())  # [n_l, F]
            act_l = phi(gate_l)  # phi(g), recomputed
            if d_down is not None:
                torch.mm((act_l * up_l).t(), dy_l, out=d_down[l])  # h recomputed
            dup_l = act_l.mul_(dh_l)  # du = dh * phi(g)
            dgate_l = dphi(dh_l.mul_(up_l), gate_l)  # dg = phi'(g) * dh * u
            if d_gate is not None:
                torch.mm(x_l.t(), dgate_l, out=d_gate[l])
            if d_up is not None:
                torch.mm(x_l.t(), dup_l, out=d_up[l])
            if dx is not None:
                torch.mm(dgate_l, w_gate[l].t(), out=dx[a:b])
                dx[a:b].addmm_(dup_l, w_up[l].t())
        zero_empty_groups(ctx.bounds, ctx.num_groups, d_gate, d_up, d_down)
        g["x"], g["w_gate"], g["w_up"], g["w_down"] = dx, d_gate, d_up, d_down
        return g.as_tuple()
