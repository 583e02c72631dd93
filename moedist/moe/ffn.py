"""The feed-forward math shared by experts, shared experts and dense MLPs (pure functions).

Weights are in math orientation (`x @ W`): up/gate [H, F], down [F, H].
Gated activations (`swiglu`, `geglu`) use gate and up; plain ones (`gelu`,
`relu`) use up only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F_

GATED = {"swiglu": F_.silu, "geglu": lambda t: F_.gelu(t)}
PLAIN = {"gelu": lambda t: F_.gelu(t), "relu": F_.relu, "silu": F_.silu}
ACTIVATIONS = tuple(GATED) + tuple(PLAIN)


def check_activation(activation: str) -> None:
    """Raise one clear ValueError for an unknown expert activation name."""
    if activation not in GATED and activation not in PLAIN:
        raise ValueError(f"activation={activation!r}: allowed {', '.join(ACTIVATIONS)}")


def is_gated(activation: str) -> bool:
    return activation in GATED


def hidden_act(gate_NF: Optional[torch.Tensor], up_NF: torch.Tensor, activation: str) -> torch.Tensor:
    """phi(gate) * up for gated activations, phi(up) otherwise. Returns [N, F]."""
    if activation in GATED:
        return GATED[activation](gate_NF) * up_NF
    return PLAIN[activation](up_NF)


def ffn(x_NH: torch.Tensor, w_gate_HF: Optional[torch.Tensor], w_up_HF: torch.Tensor, w_down_FH: torch.Tensor, activation: str) -> torch.Tensor:
    """Dense FFN: (phi(x @ gate) * (x @ up)) @ down, or phi(x @ up) @ down. Returns [N, H]."""
    gate = x_NH @ w_gate_HF if activation in GATED else None  # [N, F]
    return hidden_act(gate, x_NH @ w_up_HF, activation) @ w_down_FH  # [N, H]


def grouped_mm(x_NI: torch.Tensor, w_LIO: torch.Tensor, counts_L: Sequence[int]) -> torch.Tensor:
    """Per-group matmul on contiguous row slices: rows of group l use w[l].

    x_NI: [N, I] rows sorted by group; w_LIO: [L, I, O]; counts_L: rows per group.
    Returns [N, O]. The stacked weight is unbound ONCE (never indexed per group
    in a loop, whose backward would materialise L full-size gradients). On CUDA,
    and on CPU in bfloat16, `torch._grouped_mm` does it in one kernel.
    """
    L = w_LIO.shape[0]
    counts = [int(c) for c in counts_L]
    if len(counts) != L or sum(counts) != x_NI.shape[0]:
        raise ValueError(f"grouped_mm: counts {counts} do not match {L} groups and {x_NI.shape[0]} rows")
    if _use_grouped_kernel(x_NI, w_LIO):
        offs = torch.tensor(counts, device=x_NI.device).cumsum(0).to(torch.int32)  # [L]
        return torch._grouped_mm(x_NI, w_LIO, offs=offs)
    if L == 1:
        return x_NI @ w_LIO[0]
    outs = [xs @ w for xs, w, c in zip(x_NI.split(counts), w_LIO.unbind(0), counts) if c > 0]
    if not outs:
        # no rows: keep x and w in the graph (zero grads, not None: a rank with no tokens must still reduce)
        return x_NI.new_zeros((0, w_LIO.shape[-1])) + 0.0 * (x_NI.sum() + w_LIO.sum())
    return torch.cat(outs, dim=0)


def _use_grouped_kernel(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.shape[0] == 0:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.dtype == torch.bfloat16


def grouped_ffn(x_NH: torch.Tensor, w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down: torch.Tensor,
                counts_L: Sequence[int], activation: str) -> torch.Tensor:
    """FFN per expert on contiguous slices: weights [L, H, F], [L, H, F], [L, F, H]. Returns [N, H]."""
    gate = grouped_mm(x_NH, w_gate, counts_L) if activation in GATED else None  # [N, F]
    up = grouped_mm(x_NH, w_up, counts_L)  # [N, F]
    return grouped_mm(hidden_act(gate, up, activation), w_down, counts_L)  # [N, H]
