"""GroupedGatedFFN: a gated FFN per expert on contiguous row slices, fused.

Math (rows of expert l are the slice s_l; x [N, H]; Wg, Wu [L, H, F]; Wd [L, F, H];
phi the gate activation, phi' its derivative):
    forward   g = x Wg[l],  u = x Wu[l],  h = phi(g) * u,  y[s_l] = h Wd[l]      y [N, H]
    backward  dh = dy Wd[l]^T                       dWd[l] = h^T dy
              du = dh * phi(g)                      dWu[l] = x^T du
              dg = phi'(g) * dh * u                 dWg[l] = x^T dg
              dx = dg Wg[l]^T + du Wu[l]^T  (one mm + one addmm)
Saves x, the weights and, per expert, g and u: 2 [N, F] tensors in all.
Recomputes phi(g) and h = phi(g) * u in backward, in two [n_l, F] temporaries per expert
(h, dh and dg share one, phi(g) and du the other), freed before the next expert's.

Weight gradients in place (`grad_params`, a `slices.KeptGrads`): where the caller passes the
weights' kept Parameters and each already holds a `.grad` (a runner that keeps gradients
between steps instead of freeing them, `moedist.moe.experts.keep_expert_grads`), backward
writes dWg/dWu/dWd into those `.grad` tensors one expert at a time and returns None for
them, so no [L, H, F] gradient is allocated per step: after `KeptGrads.mark_stale()` (the
runner's zero_grad) the first backward overwrites them (torch.mm(out=), experts without
rows zeroed), later ones add (through an [H, F] scratch: the same sum, in the same order,
as autograd's `grad += new`). On a CPU with glibc's default malloc a fresh [64, 512, 1024] fp32
block is an mmap that page-faults on every write (it is above the 32 MiB mmap limit); a
GPU's caching allocator would reuse it either way. Hooks on those Parameters do not see
these gradients, so only runners that read `.grad` after backward (PlainRunner) ask for it.

Token mode (`GroupedGatedFFNTokens`, EP size 1): the same FFN fused with the layer's gather and
combine. x is the [T, H] token input and the pairs come as token ids token[n] and combine
weights w[n] (sorted by expert); the result is y_T[t] = sum over t's pairs of w[n] * y[n]
([T, H], in at least float32, as `kernels.combine.weighted_scatter_add`). Each expert gathers its
rows of x and of dy, scatters its weighted rows of y and of dx, in [n_l, H] temporaries, so
no [N, H] tensor exists in either direction: no gathered x saved for backward, no gathered
dy, no [N, H] dx, no [N, H] output kept for the weight gradient. That gradient is
    dw[n] = <dy[t], y[n]> = <dy[t] Wd[l]^T, h[n]>
(the unweighted dh of the row against its recomputed h; a third [n_l, F] temporary while it is
taken, and a [256, F] chunk of the row dot's product). Saves 2 [N, F] tensors and references x.
The forward is bitwise the unfused path's; gradients match it to rounding (with dw wanted, dh is
(dy Wd^T) * w rather than (dy * w) Wd^T).

Why not plain autograd: the unfused graph keeps g, u, phi(g) and h (4 [N, F]) for
backward plus the cat/stack copies of `GroupedMM`'s plain form. Working one expert
at a time also keeps the [n_l, F] temporaries small (reused by the allocator and
still in cache for the elementwise passes); each expert's output is written
straight into the one [N, H] result. The same mm and activation-backward kernels
as autograd, so the numbers match it to rounding.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from moedist.moe.kernels.combine import accumulate_dtype
from moedist.moe.kernels.slices import GradSlots, KeptGrads, bounds, row_dot, zero_empty_groups

Act = Callable[[torch.Tensor], torch.Tensor]  # phi(z)
ActGrad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (incoming grad, z) -> grad * phi'(z), over grad


class GroupedGatedFFN(torch.autograd.Function):
    """`GroupedGatedFFN.apply(x_NH, w_gate, w_up, w_down, counts, phi, dphi[, grad_params])` -> y_NH.

    counts: tuple of host ints summing to N; phi / dphi: the activation and its
    backward (`moedist.moe.ffn.GATED`, `GATED_GRAD`). All tensors share one dtype.
    grad_params: None, or the `KeptGrads` of (w_gate, w_up, w_down) whose existing `.grad`
    takes their weight gradient in place (see the module docstring).
    """

    @staticmethod
    def forward(ctx, x_NH: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                counts: Tuple[int, ...], phi: Act, dphi: ActGrad, grad_params: Optional[KeptGrads] = None) -> torch.Tensor:
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
            del h_l  # before the next expert's: else two experts' temporaries are alive at once
        ctx.bounds, ctx.num_groups, ctx.phi, ctx.dphi = bnds, w_up.shape[0], phi, dphi
        ctx.kept = grad_params
        ctx.save_for_backward(x_NH, w_gate, w_up, w_down, *gates, *ups)
        return y_NH

    @staticmethod
    def backward(ctx, dy_NH: torch.Tensor):
        x_NH, w_gate, w_up, w_down, *saved = ctx.saved_tensors
        n = len(ctx.bounds)
        gates, ups = saved[:n], saved[n:]
        names = ("x", "w_gate", "w_up", "w_down", "counts", "phi", "dphi", "grad_params")
        g = GradSlots(names[:len(ctx.needs_input_grad)], ctx.needs_input_grad)  # grad_params may be left out
        phi, dphi = ctx.phi, ctx.dphi
        dy_NH = dy_NH.contiguous()
        dx = x_NH.new_empty(x_NH.shape) if g.wants("x") else None  # [N, H]
        wg = _WeightGrads(g, (w_gate, w_up, w_down), ctx.kept)
        for (l, a, b), gate_l, up_l in zip(ctx.bounds, gates, ups):
            # two [n_l, F] temporaries per expert, nothing else of that size: t1 = phi(g), then du;
            # t2 = h (for dWd), then dh, then dg (each written over the last)
            x_l, dy_l = x_NH[a:b], dy_NH[a:b]
            t1 = phi(gate_l)  # phi(g), recomputed
            if wg.wants("w_down"):
                t2 = torch.mul(t1, up_l)  # h recomputed
                wg.put("w_down", l, t2.t(), dy_l)
            else:
                t2 = torch.empty_like(t1)
            dh_l = torch.mm(dy_l, w_down[l].t(), out=t2)  # [n_l, F] over h
            dup_l = t1.mul_(dh_l)  # du = dh * phi(g)
            dgate_l = dphi(dh_l.mul_(up_l), gate_l)  # dg = phi'(g) * dh * u, over dh
            wg.put("w_gate", l, x_l.t(), dgate_l)
            wg.put("w_up", l, x_l.t(), dup_l)
            if dx is not None:
                torch.mm(dgate_l, w_gate[l].t(), out=dx[a:b])
                dx[a:b].addmm_(dup_l, w_up[l].t())
            # free them before the next expert allocates its own: the loop variables would
            # otherwise keep them alive into the next iteration
            del t1, t2, dh_l, dup_l, dgate_l
        wg.finish(ctx.bounds, ctx.num_groups)
        g["x"] = dx
        return g.as_tuple()


def _wgrad_target(wanted: bool, w: torch.Tensor, param: Optional[torch.Tensor], overwrite: bool):
    """Where a weight's gradient goes, as (target, add?, in place?): its Parameter's existing .grad
    when given one (added to, or overwritten when `overwrite`), else a new [L, I, O] tensor
    (written), or (None, False, False) when autograd does not want it."""
    if not wanted:
        return None, False, False
    if param is not None and param.grad is not None and param.grad.shape == w.shape and param.grad.dtype == w.dtype:
        return param.grad, not overwrite, True
    return w.new_empty(w.shape), False, False


class _WeightGrads:
    """The three weights' gradient targets for one backward (`_wgrad_target` each): `put` writes or
    adds expert l's a^T b, `finish` zeroes the written slots of experts without rows and hands
    autograd the new tensors (a kept `.grad` already holds its gradient)."""

    NAMES = ("w_gate", "w_up", "w_down")

    def __init__(self, slots: GradSlots, weights: Sequence[Optional[torch.Tensor]], kept: Optional[KeptGrads]):
        params = kept.params if kept is not None else (None, None, None)
        overwrite = kept is not None and kept.take_stale()
        self.slots = slots
        self.outs = {name: _wgrad_target(slots.wants(name), w, p, overwrite)
                     for name, w, p in zip(self.NAMES, weights, params)}
        self.scratch = {}  # one [I, O] buffer per shape for the in-place adds

    def wants(self, name: str) -> bool:
        return self.outs[name][0] is not None

    def put(self, name: str, l: int, a_: torch.Tensor, b_: torch.Tensor) -> None:
        target, add, _ = self.outs[name]
        if target is None:
            return
        if not add:
            torch.mm(a_, b_, out=target[l])
            return
        shape = target.shape[1:]
        if shape not in self.scratch:
            self.scratch[shape] = target.new_empty(shape)
        target[l].add_(torch.mm(a_, b_, out=self.scratch[shape]))  # grad += new, as AccumulateGrad does

    def finish(self, bnds, num_groups: int) -> None:
        zero_empty_groups(bnds, num_groups, *(t for t, add, _ in self.outs.values() if not add))  # written here
        for name, (t, _, in_place) in self.outs.items():
            if not in_place:  # a new tensor: autograd's; the kept .grad already holds its gradient
                self.slots[name] = t


_DOT_ROWS = 256  # rows per chunk of dw's row dot: its [rows, F] product is the fourth temporary


class GroupedGatedFFNTokens(torch.autograd.Function):
    """`GroupedGatedFFNTokens.apply(x_TH, token_N, w_N, w_gate, w_up, w_down, counts, phi, dphi[, grad_params])`
    -> y_TH [T, H] = sum over each token's pairs of w[n] * FFN_l(x[token[n]]) (token mode, see the
    module docstring), in `accumulate_dtype(x.dtype)`.

    token_N [N] int64 token ids of the pairs sorted by expert (counts[l] rows for expert l); w_N [N]
    their combine weights (differentiable). Other arguments as `GroupedGatedFFN`.
    """

    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, token_N: torch.Tensor, w_N: torch.Tensor, w_gate: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor, counts: Tuple[int, ...], phi: Act, dphi: ActGrad,
                grad_params: Optional[KeptGrads] = None) -> torch.Tensor:
        bnds = bounds(counts)
        acc = accumulate_dtype(x_TH.dtype)
        y_TH = x_TH.new_zeros((x_TH.shape[0], w_down.shape[2]), dtype=acc)  # [T, H]
        gates, ups = [], []
        for l, a, b in bnds:
            t = token_N[a:b]
            x_l = x_TH.index_select(0, t)  # [n_l, H]
            gate_l = torch.mm(x_l, w_gate[l])  # [n_l, F]
            up_l = torch.mm(x_l, w_up[l])  # [n_l, F]
            h_l = phi(gate_l).mul_(up_l)  # [n_l, F]
            y_l = torch.mm(h_l, w_down[l]).to(acc)  # [n_l, H]
            y_TH.index_add_(0, t, y_l.mul_(w_N[a:b].to(acc).unsqueeze(1)))  # the combine, this expert's rows
            gates.append(gate_l)
            ups.append(up_l)
            del x_l, h_l, y_l  # before the next expert's
        ctx.bounds, ctx.num_groups, ctx.phi, ctx.dphi = bnds, w_up.shape[0], phi, dphi
        ctx.kept = grad_params
        ctx.save_for_backward(x_TH, token_N, w_N, w_gate, w_up, w_down, *gates, *ups)
        return y_TH

    @staticmethod
    def backward(ctx, dy_TH: torch.Tensor):
        x_TH, token_N, w_N, w_gate, w_up, w_down, *saved = ctx.saved_tensors
        n = len(ctx.bounds)
        gates, ups = saved[:n], saved[n:]
        names = ("x", "token", "weight", "w_gate", "w_up", "w_down", "counts", "phi", "dphi", "grad_params")
        g = GradSlots(names[:len(ctx.needs_input_grad)], ctx.needs_input_grad)
        phi, dphi = ctx.phi, ctx.dphi
        dy_TH = dy_TH.contiguous()
        dx = x_TH.new_zeros(x_TH.shape) if g.wants("x") else None  # [T, H]
        dw = w_N.new_empty(w_N.shape) if g.wants("weight") else None  # [N]
        wg = _WeightGrads(g, (w_gate, w_up, w_down), ctx.kept)
        for (l, a, b), gate_l, up_l in zip(ctx.bounds, gates, ups):
            t = token_N[a:b]
            x_l = x_TH.index_select(0, t)  # [n_l, H]
            dy_l = dy_TH.index_select(0, t).to(x_TH.dtype)  # [n_l, H] unweighted
            w_l = w_N[a:b].to(x_TH.dtype).unsqueeze(1)  # [n_l, 1]
            t1 = phi(gate_l)  # phi(g), recomputed
            if dw is not None:  # dw = <dy Wd^T, h>: dh unweighted first, then weighted in place
                t2 = torch.mul(t1, up_l)  # h
                dh_l = torch.mm(dy_l, w_down[l].t())  # [n_l, F] unweighted
                dw[a:b] = row_dot(dh_l, t2, rows=_DOT_ROWS)  # [n_l] (in w's dtype)
                dy_l.mul_(w_l)
                wg.put("w_down", l, t2.t(), dy_l)
                del t2
                dh_l.mul_(w_l)
            else:  # as `GroupedGatedFFN`: dh = (w dy) Wd^T over h
                dy_l.mul_(w_l)
                if wg.wants("w_down"):
                    t2 = torch.mul(t1, up_l)
                    wg.put("w_down", l, t2.t(), dy_l)
                else:
                    t2 = torch.empty_like(t1)
                dh_l = torch.mm(dy_l, w_down[l].t(), out=t2)
                del t2
            dup_l = t1.mul_(dh_l)  # du = dh * phi(g)
            dgate_l = dphi(dh_l.mul_(up_l), gate_l)  # dg = phi'(g) * dh * u, over dh
            wg.put("w_gate", l, x_l.t(), dgate_l)
            wg.put("w_up", l, x_l.t(), dup_l)
            if dx is not None:
                dx_l = torch.mm(dgate_l, w_gate[l].t())  # [n_l, H]
                dx.index_add_(0, t, dx_l.addmm_(dup_l, w_up[l].t()))
                del dx_l
            del x_l, dy_l, t1, dh_l, dup_l, dgate_l
        wg.finish(ctx.bounds, ctx.num_groups)
        g["x"], g["weight"] = dx, dw
        return g.as_tuple()
