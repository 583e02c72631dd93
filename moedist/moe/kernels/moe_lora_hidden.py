"""MoELoRAHidden: the per-pair hidden of MoE-LoRA (MixLoRA) experts on one frozen gated FFN.

Math, for the rows n of expert l (sorted by expert; token t = token[n], combine
weight w_n, LoRA scaling s, gate activation phi):
    g_n = gate[t] + s * x_n Ag[l] Bg[l]        u_n = up[t] + s * x_n Au[l] Bu[l]
    h_n = phi(g_n) * u_n
    h_TF[t] = sum_n w_n h_n                    [T, F]  (the frozen down runs once per token after)
    z_n = w_n * s * h_n Ad[l]                  [N, r]  (the down adapter's input; None without one)
Backward (per expert, dh_n = w_n dh_TF[t] + dz_n' Ad[l]^T with dz_n' = w_n s dz_n):
    dw_n = <dh_TF[t], h_n> + s <dz_n, h_n Ad[l]>
    dAd[l] = h^T dz'
    du = dh * phi(g);  dg = phi'(g) * dh * u
    dgate[t] += dg;  dup[t] += du  (index_add)
    dBg[l] = s (x Ag)^T dg;  dAg[l] = x^T (s dg Bg^T);  dx += s dg Bg^T Ag^T   (same for u)
Inputs: gate_TF, up_TF [T, F] (the frozen projections, once per token), x_NH [N, H],
token_N, weight_N [N], and the adapters (`MoELoRATensors`: A [L, H, r], B [L, r, F],
down A [L, F, r]; a missing projection is None).
Saves x, token, weight, the adapters, x Ag, x Au, h Ad ([N, r] each) and g, u
(2 [N, F]); recomputes phi(g) and h in backward.

Why not plain autograd: the unfused graph gathers the frozen rows, adds an [N, F]
LoRA delta (and its scaled copy) to each, and keeps g, u, phi(g), h and w * h
([N, F] each) for backward. Here g and u are built in place (gather, then one
addmm per expert) and are the only [N, F] tensors kept.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch

from moedist.moe.kernels.slices import GradSlots, bounds, row_dot

Act = Callable[[torch.Tensor], torch.Tensor]
ActGrad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MoELoRATensors(NamedTuple):
    """The experts' LoRA factors; None where that projection has no adapter (down's B is
    applied by the caller to z, outside this kernel)."""

    gate_A: Optional[torch.Tensor] = None  # [L, H, r]
    gate_B: Optional[torch.Tensor] = None  # [L, r, F]
    up_A: Optional[torch.Tensor] = None  # [L, H, r]
    up_B: Optional[torch.Tensor] = None  # [L, r, F]
    down_A: Optional[torch.Tensor] = None  # [L, F, r]


_INPUTS = ("gate", "up", "x", "token", "weight") + MoELoRATensors._fields + ("counts", "scaling", "phi", "dphi")


def moe_lora_hidden_apply(gate_TF: torch.Tensor, up_TF: torch.Tensor, x_NH: torch.Tensor, token_N: torch.Tensor,
                          weight_N: torch.Tensor, lora: MoELoRATensors, counts: Tuple[int, ...], scaling: float,
                          phi: Act, dphi: ActGrad) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the kernel: returns (h_TF [T, F], z_Nr [N, r] or None). Arguments in the order of `_INPUTS`."""
    return MoELoRAHidden.apply(gate_TF, up_TF, x_NH, token_N, weight_N, *lora, counts, scaling, phi, dphi)


class MoELoRAHidden(torch.autograd.Function):
    """Call through `moe_lora_hidden_apply` (the flat argument list autograd needs is `_INPUTS`)."""

    @staticmethod
    def forward(ctx, gate_TF, up_TF, x_NH, token_N, w_N, ag, bg, au, bu, ad, counts, s, phi, dphi):
        bnds = bounds(counts)
        T, F = gate_TF.shape
        N = x_NH.shape[0]
        h_TF = gate_TF.new_zeros((T, F))
        xa_g = x_NH.new_empty((N, ag.shape[2])) if ag is not None else None  # [N, r]
        xa_u = x_NH.new_empty((N, au.shape[2])) if au is not None else None  # [N, r]
        ha_d = x_NH.new_empty((N, ad.shape[2])) if ad is not None else None  # [N, r]
        g_NF = gate_TF.new_empty((N, F))
        u_NF = up_TF.new_empty((N, F))
        for l, a, b in bnds:
            t, x_l = token_N[a:b], x_NH[a:b]
            torch.index_select(gate_TF, 0, t, out=g_NF[a:b])  # [n_l, F]
            if ag is not None:
                torch.mm(x_l, ag[l], out=xa_g[a:b])
                g_NF[a:b].addmm_(xa_g[a:b], bg[l], alpha=s)
            torch.index_select(up_TF, 0, t, out=u_NF[a:b])
            if au is not None:
                torch.mm(x_l, au[l], out=xa_u[a:b])
                u_NF[a:b].addmm_(xa_u[a:b], bu[l], alpha=s)
        # phi over the whole buffer, not per expert: the same elementwise kernel calls (and so
        # bit-identical values) as the unfused path, whose SIMD tail handling depends on length
        h_NF = phi(g_NF).mul_(u_NF)  # [N, F]
        for l, a, b in bnds:
            t, h_l = token_N[a:b], h_NF[a:b]
            if ad is not None:
                torch.mm(h_l, ad[l], out=ha_d[a:b])
            h_TF.index_add_(0, t, h_l.mul_(w_N[a:b].unsqueeze(1)))  # w * h in place: h_NF is not kept
        del h_NF
        gates = [g_NF[a:b] for _, a, b in bnds]
        ups = [u_NF[a:b] for _, a, b in bnds]
        z_Nr = ha_d * (w_N * s).unsqueeze(1) if ad is not None else None  # [N, r]
        ctx.bounds, ctx.s, ctx.phi, ctx.dphi = bnds, s, phi, dphi
        ctx.save_for_backward(x_NH, token_N, w_N, ag, bg, au, bu, ad, xa_g, xa_u, ha_d, *gates, *ups)
        return h_TF, z_Nr

    @staticmethod
    def backward(ctx, d_hTF, d_z):
        x_NH, token_N, w_N, ag, bg, au, bu, ad, xa_g, xa_u, ha_d, *saved = ctx.saved_tensors
        n = len(ctx.bounds)
        gates, ups = saved[:n], saved[n:]
        s, phi, dphi = ctx.s, ctx.phi, ctx.dphi
        g = GradSlots(_INPUTS, ctx.needs_input_grad)
        d_hTF = d_hTF.contiguous()
        d_gate = d_hTF.new_zeros(d_hTF.shape) if g.wants("gate") else None  # [T, F]
        d_up = d_hTF.new_zeros(d_hTF.shape) if g.wants("up") else None  # [T, F]
        # [N, H]: written (mm out=) by the first adapter of each expert's rows, added to by the second
        d_x = (x_NH.new_empty if ag is not None or au is not None else x_NH.new_zeros)(x_NH.shape) \
            if g.wants("x") else None
        d_w = w_N.new_empty(w_N.shape) if g.wants("weight") else None  # [N]
        lora = MoELoRATensors(ag, bg, au, bu, ad)
        d_lora = MoELoRATensors(*(p.new_zeros(p.shape) if p is not None and g.wants(name) else None
                                  for name, p in zip(MoELoRATensors._fields, lora)))
        dz_s = d_z * (w_N * s).unsqueeze(1) if d_z is not None and ad is not None else None  # d(h A_d) [N, r]
        for (l, a, b), g_l, u_l in zip(ctx.bounds, gates, ups):
            t, x_l, w_l = token_N[a:b], x_NH[a:b], w_N[a:b].unsqueeze(1)
            dx_written = False  # d_x[a:b] not written yet (new_empty)
            dh_l = d_hTF.index_select(0, t)  # [n_l, F] gradient of w * h
            act_l = phi(g_l)
            h_l = act_l * u_l  # recomputed
            if d_w is not None:
                row_dot(dh_l, h_l, out_N=d_w[a:b])  # row dot products, a chunk of rows at a time
                if dz_s is not None:
                    d_w[a:b] += torch.linalg.vecdot(d_z[a:b], ha_d[a:b]) * s
            dh_l.mul_(w_l)
            if dz_s is not None:
                if d_lora.down_A is not None:
                    torch.mm(h_l.t(), dz_s[a:b], out=d_lora.down_A[l])
                dh_l.addmm_(dz_s[a:b], ad[l].t())
            del h_l
            du_l = act_l.mul_(dh_l)  # du = dh * phi(g)
            dg_l = dphi(dh_l.mul_(u_l), g_l)  # dg = phi'(g) * dh * u
            for d_l, d_base, xa, A, B, dA, dB in ((dg_l, d_gate, xa_g, ag, bg, d_lora.gate_A, d_lora.gate_B),
                                                  (du_l, d_up, xa_u, au, bu, d_lora.up_A, d_lora.up_B)):
                if d_base is not None:
                    d_base.index_add_(0, t, d_l)
                if A is None:
                    continue
                if dB is not None:
                    torch.mm(xa[a:b].t(), d_l, out=dB[l])
                    dB[l].mul_(s)
                if dA is not None or d_x is not None:
                    dxa = torch.mm(d_l, B[l].t()).mul_(s)  # [n_l, r]
                    if dA is not None:
                        torch.mm(x_l.t(), dxa, out=dA[l])
                    if d_x is not None and dx_written:
                        d_x[a:b].addmm_(dxa, A[l].t())
                    elif d_x is not None:
                        torch.mm(dxa, A[l].t(), out=d_x[a:b])
                        dx_written = True
            del dh_l, act_l, du_l, dg_l, d_l  # this expert's [n_l, F] temporaries, before the next one's
        g["gate"], g["up"], g["x"], g["weight"] = d_gate, d_up, d_x, d_w
        for name, d in zip(MoELoRATensors._fields, d_lora):
            g[name] = d
        return g.as_tuple()
