"""Shared experts: a dense FFN applied to every token, replicated on every rank.

`num_shared` shared experts of size F are one FFN of size num_shared * F (the
sum of n FFNs equals one FFN with their hidden units concatenated). With
`gated=True` the output is scaled by sigmoid(x @ w_shared_gate) per token, as
in Qwen2-MoE.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moedist.moe.ffn import GATED, check_activation, ffn
from moedist.moe.init import is_meta, normal_


class SharedExperts(nn.Module):
    """Args: hidden_size H, ffn_size F (total), activation, gated, init_std, seed, dtype, device."""

    def __init__(self, hidden_size: int, ffn_size: int, activation: str = "swiglu", gated: bool = False,
                 init_std: float = 0.02, seed: int = 0, dtype=torch.float32, device=None):
        super().__init__()
        check_activation(activation)
        if ffn_size < 1:
            raise ValueError(f"shared expert ffn_size={ffn_size}: must be >= 1")
        self.activation, self.gated, self.seed, self.init_std = activation, gated, seed, init_std
        H, F = hidden_size, ffn_size

        def empty(*shape):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))

        self.w_gate = empty(H, F) if activation in GATED else None  # [H, F]
        self.w_up = empty(H, F)  # [H, F]
        self.w_down = empty(F, H)  # [F, H]
        self.w_shared_gate = empty(H, 1) if gated else None  # [H, 1]
        if not is_meta(self.w_up):  # meta: drawn at materialization
            self.init_weights()

    def init_weights(self) -> None:
        """gate, up, down, shared gate in that order from one generator seeded by `seed`."""
        g = torch.Generator().manual_seed(self.seed)
        for w in (self.w_gate, self.w_up, self.w_down, self.w_shared_gate):
            normal_(w, g, self.init_std)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        x = x_TH.to(self.w_up.dtype)
        y_TH = ffn(x, self.w_gate, self.w_up, self.w_down, self.activation)  # [T, H]
        if self.w_shared_gate is not None:  # the gate in >= fp32 whatever the weights' dtype, like the router
            acc = torch.promote_types(torch.promote_types(x.dtype, self.w_shared_gate.dtype), torch.float32)
            gate_T1 = torch.sigmoid(x.to(acc) @ self.w_shared_gate.to(acc))  # [T, 1]
            y_TH = (gate_T1 * y_TH).to(y_TH.dtype)
        return y_TH
