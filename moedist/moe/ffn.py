"""The feed-forward math shared by experts, shared experts and dense MLPs (pure functions).

Weights are in math orientation (`x @ W`): up/gate [H, F], down [F, H].
Gated activations (`swiglu`, `geglu`) use gate and up; plain ones (`gelu`,
`relu`) use up only.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F_

from moedist.choices import ACTIVATIONS

# rows per group: host ints (per-expert loops), or an [L] int64 device tensor (grouped kernel only)
Counts = Union[Sequence[int], torch.Tensor]

GATED = {"swiglu": F_.silu, "geglu": lambda t: F_.gelu(t)}
PLAIN = {"gelu": lambda t: F_.gelu(t), "relu": F_.relu, "silu": F_.silu}


def check_activation(activation: str) -> None:
    """Raise one clear ValueError for an unknown expert activation name."""
    if activation not in GATED and activation not in PLAIN:
        raise ValueError(f"activation={activation!r}: allowed {', '.join(ACTIVATIONS)}")


def hidden_act(gate_NF: Optional[torch.Tensor], up_NF: torch.Tensor, activation: str) -> torch.Tensor:
    """phi(gate) * up for gated activations, phi(up) otherwise. Returns [N, F]."""
    if activation in GATED:
        return GATED[activation](gate_NF) * up_NF
    return PLAIN[activation](up_NF)


def ffn(x_NH: torch.Tensor, w_gate_HF: Optional[torch.Tensor], w_up_HF: torch.Tensor, w_down_FH: torch.Tensor, activation: str) -> torch.Tensor:
    """Dense FFN: (phi(x @ gate) * (x @ up)) @ down, or phi(x @ up) @ down. Returns [N, H]."""
    gate = x_NH @ w_gate_HF if activation in GATED else None  # [N, F]
    return hidden_act(gate, x_NH @ w_up_HF, activation) @ w_down_FH  # [N, H]


def grouped_mm(x_NI: torch.Tensor, w_LIO: torch.Tensor, counts_L: Counts) -> torch.Tensor:
    """Per-group matmul on contiguous row slices: rows of group l use w[l].

    x_NI: [N, I] rows sorted by group; w_LIO: [L, I, O]; counts_L: rows per group, as ints, or as
    an [L] device tensor where `grouped_kernel_applies` (then rows past sum(counts) are padding whose
    output and input gradient are undefined: the caller masks them, see `MoELayer`).
    Returns [N, O]. The stacked weight is unbound ONCE (never indexed per group
    in a loop, whose backward would materialise L full-size gradients). On CUDA,
    and on CPU in bfloat16, `torch._grouped_mm` does it in one kernel.
    """
    L = w_LIO.shape[0]
    if isinstance(counts_L, torch.Tensor):  # [L] device counts: offsets stay on the device (no host sync)
        return _grouped_mm_device(x_NI, w_LIO, counts_L)
    counts = [int(c) for c in counts_L]
    if len(counts) != L or sum(counts) != x_NI.shape[0]:
        raise ValueError(f"grouped_mm: counts {counts} do not match {L} groups and {x_NI.shape[0]} rows")
    if _use_grouped_kernel(x_NI, w_LIO):
        offs = torch.tensor(counts, device=x_NI.device).cumsum(0).to(torch.int32)  # [L]
        return torch._grouped_mm(x_NI, w_LIO, offs=offs)
    if L == 1:
        return x_NI @ w_LIO[0]
    if x_NI.shape[0] == 0:
        # no rows: keep x and w in the graph (zero grads, not None: a rank with no tokens must still reduce)
        return x_NI.new_zeros((0, w_LIO.shape[-1])) + 0.0 * (x_NI.sum() + w_LIO.sum())
    return _GroupedMM.apply(x_NI, w_LIO, tuple(counts))


def _grouped_mm_device(x_NI: torch.Tensor, w_LIO: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` with offsets computed on the device from [L] counts (CUDA-graph safe)."""
    if counts_L.shape != (w_LIO.shape[0],) or not _use_grouped_kernel(x_NI, w_LIO):
        raise ValueError(f"grouped_mm: device counts {tuple(counts_L.shape)} need {w_LIO.shape[0]} groups and the "
                         "grouped kernel (bf16 on CPU or Hopper); pass host ints otherwise")
    return torch._grouped_mm(x_NI, w_LIO, offs=counts_L.cumsum(0).to(torch.int32))


def grouped_kernel_applies(x_NH: torch.Tensor, w_LIO: torch.Tensor) -> bool:
    """`torch._grouped_mm` runs x (cast to w's dtype, as the experts do) against w: device counts work."""
    if x_NH.dtype != w_LIO.dtype:
        x_NH = x_NH[:1].to(w_LIO.dtype)  # one row: only dtype, device and strides matter
    return _use_grouped_kernel(x_NH, w_LIO)


def _bounds(counts: Sequence[int]):
    """(group, start, end) of every non-empty group's row slice."""
    out, start = [], 0
    for l, c in enumerate(counts):
        if c > 0:
            out.append((l, start, start + c))
        start += c
    return out


def _group_mm_into(out_NO: torch.Tensor, x_NI: torch.Tensor, w_LIO: torch.Tensor, bounds, transpose_w: bool = False,
                   accumulate: bool = False) -> torch.Tensor:
    """out[s_l] (+)= x[s_l] @ w[l] (or w[l]^T) for every group slice s_l, written in place:
    no per-group outputs to concatenate and no gradient to split afterwards."""
    for l, a, b in bounds:
        w = w_LIO[l].t() if transpose_w else w_LIO[l]
        if accumulate:
            out_NO[a:b].addmm_(x_NI[a:b], w)
        else:
            torch.mm(x_NI[a:b], w, out=out_NO[a:b])
    return out_NO


def _group_wgrad(a_NI: torch.Tensor, b_NO: torch.Tensor, num_groups: int, bounds) -> torch.Tensor:
    """dW[l] = a[s_l]^T @ b[s_l] as one [L, I, O] tensor (zeros for empty groups)."""
    dw = a_NI.new_empty((num_groups, a_NI.shape[1], b_NO.shape[1]))
    filled = set()
    for l, s, e in bounds:
        torch.mm(a_NI[s:e].t(), b_NO[s:e], out=dw[l])
        filled.add(l)
    for l in range(num_groups):
        if l not in filled:
            dw[l].zero_()
    return dw


class _GroupedMM(torch.autograd.Function):
    """y[s_l] = x[s_l] @ w[l] into one preallocated output (the same mm kernels as a loop,
    without the concatenation in forward and the split/stack in backward)."""

    @staticmethod
    def forward(ctx, x_NI, w_LIO, counts):
        bounds = _bounds(counts)
        ctx.bounds, ctx.num_groups = bounds, w_LIO.shape[0]
        ctx.save_for_backward(x_NI, w_LIO)
        return _group_mm_into(x_NI.new_empty((x_NI.shape[0], w_LIO.shape[2])), x_NI, w_LIO, bounds)

    @staticmethod
    def backward(ctx, dy_NO):
        x_NI, w_LIO = ctx.saved_tensors
        dy_NO = dy_NO.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _group_mm_into(dy_NO.new_empty(x_NI.shape), dy_NO, w_LIO, ctx.bounds, transpose_w=True)
        if ctx.needs_input_grad[1]:
            dw = _group_wgrad(x_NI, dy_NO, ctx.num_groups, ctx.bounds)
        return dx, dw, None


def _use_grouped_kernel(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.shape[0] == 0:
        return False
    # the kernel needs 16-byte aligned strides: inner and output dims multiples of 16 bytes
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.dtype == torch.bfloat16


def grouped_ffn(x_NH: torch.Tensor, w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down: torch.Tensor,
                counts_L: Counts, activation: str) -> torch.Tensor:
    """FFN per expert on contiguous slices: weights [L, H, F], [L, H, F], [L, F, H]. Returns [N, H].

    counts_L: host ints, or an [L] device tensor for the grouped kernel (`grouped_mm`).

    Gated activations without the grouped kernel (fp32 on CPU, or no Hopper GPU)
    go through `_GroupedGatedFFN`, which keeps 2 [N, F] tensors for backward
    instead of 4 and writes every per-expert product in place.
    """
    if isinstance(counts_L, torch.Tensor):  # device counts: the grouped kernel, no per-expert Python
        gate = grouped_mm(x_NH, w_gate, counts_L) if activation in GATED else None  # [N, F]
        return grouped_mm(hidden_act(gate, grouped_mm(x_NH, w_up, counts_L), activation), w_down, counts_L)
    counts = [int(c) for c in counts_L]
    if (activation in _GATED_GRAD and w_up.shape[0] > 1 and x_NH.shape[0] > 0 and len(counts) == w_up.shape[0]
            and sum(counts) == x_NH.shape[0] and not _use_grouped_kernel(x_NH, w_up)
            and x_NH.dtype == w_gate.dtype == w_up.dtype == w_down.dtype):
        return _GroupedGatedFFN.apply(x_NH, w_gate, w_up, w_down, tuple(counts), activation)
    gate = grouped_mm(x_NH, w_gate, counts_L) if activation in GATED else None  # [N, F]
    up = grouped_mm(x_NH, w_up, counts_L)  # [N, F]
    return grouped_mm(hidden_act(gate, up, activation), w_down, counts_L)  # [N, H]


# phi'(z) applied to an incoming gradient: the kernels autograd itself uses for these activations.
_GATED_GRAD = {
    "swiglu": lambda g, z: torch.ops.aten.silu_backward(g, z),
    "geglu": lambda g, z: torch.ops.aten.gelu_backward(g, z),
}


class _GroupedGatedFFN(torch.autograd.Function):
    """y = (phi(x @ Wg[l]) * (x @ Wu[l])) @ Wd[l] on each expert's row slice, fused.

    Works one expert at a time, so the [n_l, F] intermediates are small, reused
    by the allocator from step to step and still in cache for the elementwise
    passes; the forward writes each expert's output straight into one [N, H]
    tensor. Saves x and, per expert, gate = x @ Wg and up = x @ Wu (2 [N, F] in
    all instead of 4); h = phi(gate) * up is recomputed in backward. The same mm
    and activation-backward kernels as the unfused autograd graph; the input
    gradient's two terms are summed inside one addmm.
    """

    @staticmethod
    def forward(ctx, x_NH, w_gate, w_up, w_down, counts, activation):
        bounds = _bounds(counts)
        phi = GATED[activation]
        y_NH = x_NH.new_empty((x_NH.shape[0], w_down.shape[2]))
        gates, ups = [], []
        for l, a, b in bounds:
            x_l = x_NH[a:b]
            gate_l = torch.mm(x_l, w_gate[l])  # [n_l, F]
            up_l = torch.mm(x_l, w_up[l])  # [n_l, F]
            h_l = phi(gate_l).mul_(up_l)
            torch.mm(h_l, w_down[l], out=y_NH[a:b])
            gates.append(gate_l)
            ups.append(up_l)
        ctx.bounds, ctx.activation, ctx.num_groups = bounds, activation, w_up.shape[0]
        ctx.save_for_backward(x_NH, w_gate, w_up, w_down, *gates, *ups)
        return y_NH

    @staticmethod
    def backward(ctx, dy_NH):
        x_NH, w_gate, w_up, w_down, *saved = ctx.saved_tensors
        n = len(ctx.bounds)
        gates, ups = saved[:n], saved[n:]
        need_x, need_g, need_u, need_d = ctx.needs_input_grad[:4]
        phi, dphi, L = GATED[ctx.activation], _GATED_GRAD[ctx.activation], ctx.num_groups
        dy_NH = dy_NH.contiguous()
        dx = x_NH.new_empty(x_NH.shape) if need_x else None
        d_gate = w_gate.new_empty(w_gate.shape) if need_g else None
        d_up = w_up.new_empty(w_up.shape) if need_u else None
        d_down = w_down.new_empty(w_down.shape) if need_d else None
        for (l, a, b), gate_l, up_l in zip(ctx.bounds, gates, ups):
            x_l, dy_l = x_NH[a:b], dy_NH[a:b]
            dh_l = torch.mm(dy_l, w_down[l].t())  # [n_l, F]
            act_l = phi(gate_l)  # phi(gate), recomputed
            if need_d:
                torch.mm((act_l * up_l).t(), dy_l, out=d_down[l])  # h recomputed
            dup_l = act_l.mul_(dh_l)  # d up = dh * phi(gate)
            dgate_l = dphi(dh_l.mul_(up_l), gate_l)  # d gate = phi'(gate) * dh * up
            if need_g:
                torch.mm(x_l.t(), dgate_l, out=d_gate[l])
            if need_u:
                torch.mm(x_l.t(), dup_l, out=d_up[l])
            if need_x:
                torch.mm(dgate_l, w_gate[l].t(), out=dx[a:b])
                dx[a:b].addmm_(dup_l, w_up[l].t())
        filled = {l for l, _, _ in ctx.bounds}
        for l in range(L):
            if l not in filled:
                for d in (d_gate, d_up, d_down):
                    if d is not None:
                        d[l].zero_()
        return dx, d_gate, d_up, d_down, None, None


def gather_lora_proj(base_TO: torch.Tensor, x_NI: torch.Tensor, token_N: torch.Tensor, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, counts_L: Sequence[int], scaling: float) -> torch.Tensor:
    """base[token[n]] + scaling * x[n] @ A[l] @ B[l] for the rows n of group l. Returns [N, O].

    base_TO: [T, O] a frozen projection computed once per token; x_NI: [N, I]
    rows sorted by group; lora_A: [L, I, r]; lora_B: [L, r, O]. The LoRA term is
    accumulated into the gathered rows in place (addmm), so no [N, O] delta,
    scaled delta or sum is materialised; backward likewise scales the [N, r]
    gradient, not an [N, O] one.
    """
    counts = [int(c) for c in counts_L]
    L = lora_A.shape[0]
    if len(counts) != L or sum(counts) != x_NI.shape[0] or token_N.shape[0] != x_NI.shape[0]:
        raise ValueError(f"gather_lora_proj: counts {counts} do not match {L} groups and {x_NI.shape[0]} rows")
    dtypes_ok = base_TO.dtype == x_NI.dtype == lora_A.dtype == lora_B.dtype
    if x_NI.shape[0] == 0 or not dtypes_ok or _use_grouped_kernel(x_NI, lora_A):
        # a frozen base in bf16 with fp32 adapters: the adapter runs in its dtype, the sum in the base's
        delta = grouped_mm(grouped_mm(x_NI.to(lora_A.dtype), lora_A, counts), lora_B, counts)  # [N, O]
        return base_TO.index_select(0, token_N) + (scaling * delta).to(base_TO.dtype)
    return _GatherLoRAProj.apply(base_TO, x_NI, token_N, lora_A, lora_B, tuple(counts), float(scaling))


class _GatherLoRAProj(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_TO, x_NI, token_N, lora_A, lora_B, counts, scaling):
        bounds = _bounds(counts)
        out_NO = base_TO.index_select(0, token_N)  # [N, O]
        xa_Nr = _group_mm_into(x_NI.new_empty((x_NI.shape[0], lora_A.shape[2])), x_NI, lora_A, bounds)  # [N, r]
        for l, a, b in bounds:
            out_NO[a:b].addmm_(xa_Nr[a:b], lora_B[l], alpha=scaling)
        ctx.bounds, ctx.scaling, ctx.num_tokens, ctx.num_groups = bounds, scaling, base_TO.shape[0], lora_A.shape[0]
        ctx.save_for_backward(x_NI, token_N, lora_A, lora_B, xa_Nr)
        return out_NO

    @staticmethod
    def backward(ctx, d_NO):
        x_NI, token_N, lora_A, lora_B, xa_Nr = ctx.saved_tensors
        need_base, need_x, _, need_A, need_B = ctx.needs_input_grad[:5]
        bounds, s = ctx.bounds, ctx.scaling
        d_NO = d_NO.contiguous()
        d_base = None
        if need_base:
            d_base = d_NO.new_zeros((ctx.num_tokens, d_NO.shape[1])).index_add_(0, token_N, d_NO)  # [T, O]
        d_B = _group_wgrad(xa_Nr, d_NO, ctx.num_groups, bounds).mul_(s) if need_B else None  # [L, r, O]
        d_x = d_A = None
        if need_x or need_A:
            dxa_Nr = _group_mm_into(d_NO.new_empty(xa_Nr.shape), d_NO, lora_B, bounds, transpose_w=True).mul_(s)
            if need_A:
                d_A = _group_wgrad(x_NI, dxa_Nr, ctx.num_groups, bounds)
            if need_x:
                d_x = _group_mm_into(x_NI.new_empty(x_NI.shape), dxa_Nr, lora_A, bounds, transpose_w=True)
        return d_base, d_x, None, d_A, d_B, None, None


def moe_lora_hidden(gate_TF: torch.Tensor, up_TF: torch.Tensor, x_NH: torch.Tensor, token_N: torch.Tensor,
                    weight_N: torch.Tensor, lora: dict, counts_L: Sequence[int], scaling: float, activation: str):
    """The per-pair part of MoE-LoRA (MixLoRA) experts on a frozen gated FFN, fused per expert.

    For the rows n of expert l (sorted by expert; token t = token[n], weight w = weight[n]):
        g_n = gate[t] + s * x_n A_g[l] B_g[l]        u_n = up[t] + s * x_n A_u[l] B_u[l]
        h_n = phi(g_n) * u_n
    Returns (h_TF [T, F] = sum_n w_n h_n per token, z_Nr [N, r] = w_n * s * h_n A_d[l], or None
    without a down adapter). `lora` maps "gate"/"up"/"down" to (A [L, I, r], B [L, r, O]);
    a missing entry means no adapter on that projection.

    g and u are built per expert in place (gather, then the LoRA term by addmm) and saved;
    h is recomputed in backward, which works one expert at a time on small [n_l, F] tiles.
    """
    counts = tuple(int(c) for c in counts_L)
    if activation not in _GATED_GRAD:
        raise ValueError(f"moe_lora_hidden: activation={activation!r} must be gated ({', '.join(_GATED_GRAD)})")
    if sum(counts) != x_NH.shape[0] or token_N.shape[0] != x_NH.shape[0]:
        raise ValueError(f"moe_lora_hidden: counts {list(counts)} do not match {x_NH.shape[0]} rows")
    none = (None, None)
    (ag, bg), (au, bu), (ad, _bd) = (lora.get(k, none) for k in ("gate", "up", "down"))
    return _MoELoRAHidden.apply(gate_TF, up_TF, x_NH, token_N, weight_N, ag, bg, au, bu, ad, counts, float(scaling),
                                activation)


class _MoELoRAHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_TF, up_TF, x_NH, token_N, w_N, ag, bg, au, bu, ad, counts, s, activation):
        bounds = _bounds(counts)
        phi = GATED[activation]
        T, F = gate_TF.shape
        N = x_NH.shape[0]
        h_TF = gate_TF.new_zeros((T, F))
        xa_g = x_NH.new_empty((N, ag.shape[2])) if ag is not None else None  # [N, r]
        xa_u = x_NH.new_empty((N, au.shape[2])) if au is not None else None
        ha_d = x_NH.new_empty((N, ad.shape[2])) if ad is not None else None
        g_NF = gate_TF.new_empty((N, F))
        u_NF = up_TF.new_empty((N, F))
        for l, a, b in bounds:
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
        for l, a, b in bounds:
            t, h_l = token_N[a:b], h_NF[a:b]
            if ad is not None:
                torch.mm(h_l, ad[l], out=ha_d[a:b])
            h_TF.index_add_(0, t, h_l * w_N[a:b].unsqueeze(1))
        del h_NF
        gates = [g_NF[a:b] for _, a, b in bounds]
        ups = [u_NF[a:b] for _, a, b in bounds]
        z_Nr = ha_d * (w_N * s).unsqueeze(1) if ad is not None else None  # [N, r]
        ctx.bounds, ctx.s, ctx.activation, ctx.T = bounds, s, activation, T
        ctx.has = (ag is not None, au is not None, ad is not None)
        ctx.save_for_backward(x_NH, token_N, w_N, ag, bg, au, bu, ad, xa_g, xa_u, ha_d, *gates, *ups)
        if z_Nr is None:
            return h_TF, None
        return h_TF, z_Nr

    @staticmethod
    def backward(ctx, d_hTF, d_z):
        x_NH, token_N, w_N, ag, bg, au, bu, ad, xa_g, xa_u, ha_d, *saved = ctx.saved_tensors
        n = len(ctx.bounds)
        gates, ups = saved[:n], saved[n:]
        s, phi, dphi = ctx.s, GATED[ctx.activation], _GATED_GRAD[ctx.activation]
        need = ctx.needs_input_grad
        d_hTF = d_hTF.contiguous()
        L = (ag if ag is not None else au if au is not None else ad).shape[0] if any(ctx.has) else 0
        d_gate = d_hTF.new_zeros(d_hTF.shape) if need[0] else None
        d_up = d_hTF.new_zeros(d_hTF.shape) if need[1] else None
        d_x = x_NH.new_zeros(x_NH.shape) if need[2] else None
        d_w = w_N.new_empty(w_N.shape) if need[4] else None

        def zeros_like(p):
            return None if p is None else p.new_zeros(p.shape)

        d_ag, d_bg, d_au, d_bu, d_ad = (zeros_like(p) if need[i] else None
                                        for p, i in ((ag, 5), (bg, 6), (au, 7), (bu, 8), (ad, 9)))
        dz_s = None
        if d_z is not None and ad is not None:
            dz_s = d_z * (w_N * s).unsqueeze(1)  # d(h A_d) [N, r]
        for (l, a, b), g_l, u_l in zip(ctx.bounds, gates, ups):
            t, x_l, w_l = token_N[a:b], x_NH[a:b], w_N[a:b].unsqueeze(1)
            dh_l = d_hTF.index_select(0, t)  # [n_l, F] gradient of w * h
            act_l = phi(g_l)
            h_l = act_l * u_l  # recomputed
            if d_w is not None:
                d_w[a:b] = (dh_l * h_l).sum(1)
                if dz_s is not None:
                    d_w[a:b] += (d_z[a:b] * ha_d[a:b]).sum(1) * s
            dh_l.mul_(w_l)
            if dz_s is not None:
                if d_ad is not None:
                    torch.mm(h_l.t(), dz_s[a:b], out=d_ad[l])
                dh_l.addmm_(dz_s[a:b], ad[l].t())
            del h_l
            du_l = act_l.mul_(dh_l)  # d u = dh * phi(g)
            dg_l = dphi(dh_l.mul_(u_l), g_l)  # d g = phi'(g) * dh * u
            for d_l, d_base, xa, A, B, dA, dB in ((dg_l, d_gate, xa_g, ag, bg, d_ag, d_bg),
                                                  (du_l, d_up, xa_u, au, bu, d_au, d_bu)):
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
                    if d_x is not None:
                        d_x[a:b].addmm_(dxa, A[l].t())
        return (d_gate, d_up, d_x, None, d_w, d_ag, d_bg, d_au, d_bu, d_ad, None, None, None)
