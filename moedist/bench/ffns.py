"""The two expert-FFN implementations every `bench layer` impl can be given (`--ffn plain|recompute`).

    plain      (phi(x Wg) * (x Wu)) Wd in plain autograd ops: autograd keeps 4 [rows, F] tensors for
               backward (x Wg, phi(x Wg), x Wu, h = phi(x Wg) * (x Wu)).
    recompute  the same math; the hidden h and the down projection are one autograd node
               (`_HiddenDown`) that keeps only the 2 pre-activations [rows, F] and recomputes h in
               backward -- what moedist's own grouped FFN (`moe.kernels.gated_ffn.GroupedGatedFFN`) keeps.

Both are written here in plain torch (no moedist code), so the peers (DeepSpeed, fairscale, the
floor, the dense FFN, the dense LoRA reference) get exactly the same FFN and optimising moedist
never changes them. An optional LoRA adapter on the down projection (x A) B, scale s, rides in
the same node (the LoRA-MoE reference).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from moedist.moe.ffn import GATED, PLAIN

FFN_IMPLS = ("plain", "recompute")


def act_fn(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return GATED[activation] if activation in GATED else PLAIN[activation]


def hidden(gate: Optional[torch.Tensor], up: torch.Tensor, activation: str) -> torch.Tensor:
    """phi(gate) * up (gated) or phi(up). [rows, F]."""
    return act_fn(activation)(gate) * up if activation in GATED else act_fn(activation)(up)


class _HiddenDown(torch.autograd.Function):
    """y = h Wd (+ s (h Ad) Bd), h = hidden(gate, up): saves gate/up, recomputes h in backward."""

    @staticmethod
    def forward(ctx, gate, up, w_down, lora_a, lora_b, scaling, activation):
        h = hidden(gate, up, activation)  # [rows, F], not kept
        y = h @ w_down
        z = None
        if lora_a is not None:
            z = h @ lora_a  # [rows, r]
            y = y + scaling * (z @ lora_b)
        ctx.save_for_backward(gate, up, w_down, lora_a, lora_b, z)
        ctx.scaling, ctx.activation = scaling, activation
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up, w_down, lora_a, lora_b, z = ctx.saved_tensors
        s = ctx.scaling
        with torch.enable_grad():  # recompute h as a tiny elementwise graph, differentiate it once
            g = gate.detach().requires_grad_(gate is not None and ctx.needs_input_grad[0]) if gate is not None else None
            u = up.detach().requires_grad_(ctx.needs_input_grad[1])
            h = hidden(g, u, ctx.activation)
        d_wd = h.detach().t() @ dy if ctx.needs_input_grad[2] else None
        dh = dy @ w_down.t()
        d_a = d_b = None
        if lora_a is not None:
            dz = s * (dy @ lora_b.t())  # [rows, r]
            d_b = s * (z.t() @ dy) if ctx.needs_input_grad[4] else None
            d_a = h.detach().t() @ dz if ctx.needs_input_grad[3] else None
            dh = dh + dz @ lora_a.t()
        ins = [t for t in (g, u) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(h, ins, dh) if ins else ()
        it = iter(grads)
        d_gate = next(it) if g is not None and g.requires_grad else None
        d_up = next(it) if u.requires_grad else None
        return d_gate, d_up, d_wd, d_a, d_b, None, None


def ffn_forward(x, w_gate, w_up, w_down, activation: str, impl: str = "plain",
                lora_down: Optional[tuple] = None, scaling: float = 1.0) -> torch.Tensor:
    """The expert FFN on x [rows, H] with weights [H, F], [H, F], [F, H]; `impl` plain | recompute.

    `lora_down` = (A [F, r], B [r, H]) adds s * (h A) B to the output.
    """
    if impl == "recompute" and x.dim() != 2:  # DeepSpeed hands its experts [.., C, H] chunks
        lead = x.shape[:-1]
        return ffn_forward(x.reshape(-1, x.shape[-1]), w_gate, w_up, w_down, activation, impl, lora_down,
                           scaling).reshape(*lead, w_down.shape[-1])
    gate = x @ w_gate if activation in GATED else None  # [rows, F]
    up = x @ w_up  # [rows, F]
    if impl == "recompute":
        a, b = lora_down if lora_down is not None else (None, None)
        return _HiddenDown.apply(gate, up, w_down, a, b, float(scaling), activation)
    if impl != "plain":
        raise ValueError(f"ffn impl {impl!r}: allowed {', '.join(FFN_IMPLS)}")
    h = hidden(gate, up, activation)
    y = h @ w_down
    if lora_down is not None:
        y = y + scaling * ((h @ lora_down[0]) @ lora_down[1])
    return y
