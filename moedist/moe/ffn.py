"""The feed-forward math shared by experts, shared experts and dense MLPs (pure functions).

Weights are in math orientation (`x @ W`): up/gate [H, F], down [F, H].
Gated activations (`swiglu`, `geglu`) use gate and up; plain ones (`gelu`,
`relu`) use up only.

The grouped functions (`grouped_mm`, `grouped_ffn`, `gather_lora_proj`,
`moe_lora_hidden`) each run one of three paths, picked by `choose_path`:
`torch._grouped_mm`, a hand-written kernel from `moedist.moe.kernels`, or plain
autograd ops.
"""
from __future__ import annotations

import enum
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F_

from moedist.choices import ACTIVATIONS
from moedist.moe.kernels.combine import gather_combine
from moedist.moe.kernels.gated_ffn import GroupedGatedFFN, GroupedGatedFFNTokens
from moedist.moe.kernels.grouped_mm import GroupedMM
from moedist.moe.kernels.lora_proj import GatherLoRAProj
from moedist.moe.kernels.moe_lora_hidden import MoELoRATensors, moe_lora_hidden_apply
from moedist.moe.kernels.slices import KeptGrads

# rows per group: host ints (per-expert loops), or an [L] int64 device tensor (grouped kernel only)
Counts = Union[Sequence[int], torch.Tensor]

GATED = {"swiglu": F_.silu, "geglu": lambda t: F_.gelu(t)}
PLAIN = {"gelu": lambda t: F_.gelu(t), "relu": F_.relu, "silu": F_.silu}

# phi'(z) applied to an incoming gradient g, written over g (each kernel passes a temporary of its
# own, so no further [n, F] block is allocated): the kernels autograd itself uses for these activations.
GATED_GRAD = {
    "swiglu": lambda g, z: torch.ops.aten.silu_backward.grad_input(g, z, grad_input=g),
    "geglu": lambda g, z: torch.ops.aten.gelu_backward.grad_input(g, z, grad_input=g),
}


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


# --------------------------------------------------------------------------- dispatch


class Path(enum.Enum):
    """How a grouped function runs."""

    GROUPED_MM = "grouped_mm"  # torch._grouped_mm: all groups in one kernel (LoRA ops: their grouped_mm form)
    FUSED = "fused"  # the op's hand-written kernel in moedist.moe.kernels
    AUTOGRAD = "autograd"  # plain torch ops (or, for ffn, three grouped_mm calls, each dispatched again)


OPS = ("mm", "ffn", "lora_proj", "lora_hidden")


def choose_path(op: str, x_NI: torch.Tensor, ws: Sequence[torch.Tensor], counts_L: Optional[Counts] = None,
                activation: Optional[str] = None) -> Path:
    """The one place that decides how a grouped op runs.

    Args:
        op: "mm" (`grouped_mm`), "ffn" (`grouped_ffn`), "lora_proj" (`gather_lora_proj`)
            or "lora_hidden" (`moe_lora_hidden`).
        x_NI: the op's input rows (only dtype, device, row count and width are read).
        ws: ws[0] the op's first [L, I, O] weight (w, w_up, lora_A, the first lora_A), then
            every other tensor that must share x's dtype for the hand-written kernel.
        counts_L: rows per group: host ints, an [L] device tensor, or None (not known yet).
        activation: the FFN activation (ffn, lora_hidden); their kernels need a gated one.

    Decision table (the first row that matches wins):

    | # | condition                                            | mm         | ffn        | lora_proj  | lora_hidden |
    |---|------------------------------------------------------|------------|------------|------------|-------------|
    | 1 | counts_L is a device tensor                          | GROUPED_MM | GROUPED_MM | (host ints only)         |
    | 2 | torch._grouped_mm runs x @ ws[0] (see below)         | GROUPED_MM | GROUPED_MM | GROUPED_MM | GROUPED_MM  |
    | 3 | no rows (N == 0)                                     | AUTOGRAD   | AUTOGRAD   | AUTOGRAD   | AUTOGRAD    |
    | 4 | x and ws do not all share one dtype                  | AUTOGRAD   | AUTOGRAD   | AUTOGRAD   | AUTOGRAD    |
    | 5 | one group (L == 1)                                   | AUTOGRAD   | AUTOGRAD   | FUSED      | FUSED       |
    | 6 | activation not gated                                 | FUSED      | AUTOGRAD   | FUSED      | AUTOGRAD    |
    | 7 | otherwise                                            | FUSED      | FUSED      | FUSED      | FUSED       |

    Row 2: torch has `_grouped_mm`, x and ws[0] share the dtype, N > 0, x's width and
    ws[0]'s output width are multiples of 16 bytes (the kernel's stride alignment), and
    the dtype is bfloat16 on CPU, or bfloat16 on a CUDA GPU of compute capability >= 9.
    For the LoRA ops GROUPED_MM is their composition of `grouped_mm` calls (which then take
    the grouped kernel). Every FUSED kernel keeps less for backward than the AUTOGRAD
    graph (see each kernel's docstring); the AUTOGRAD rows are where it cannot run (no
    rows, mixed dtypes, non-gated activations) or gains nothing (one group: one matmul).
    """
    if op not in OPS:
        raise ValueError(f"choose_path: op={op!r}: allowed {', '.join(OPS)}")
    if isinstance(counts_L, torch.Tensor):
        if op in ("lora_proj", "lora_hidden"):
            raise ValueError(f"choose_path: {op} takes host counts, not a device tensor")
        return Path.GROUPED_MM
    w = ws[0]
    if _grouped_kernel_runs(x_NI, w):
        return Path.GROUPED_MM
    if x_NI.shape[0] == 0 or any(t.dtype != x_NI.dtype for t in ws):
        return Path.AUTOGRAD
    if w.shape[0] == 1 and op in ("mm", "ffn"):
        return Path.AUTOGRAD
    if activation not in GATED_GRAD and op in ("ffn", "lora_hidden"):
        return Path.AUTOGRAD
    return Path.FUSED


def _grouped_kernel_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Row 2 of `choose_path`'s table."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.shape[0] == 0:
        return False
    # the kernel needs 16-byte aligned strides: inner and output dims multiples of 16 bytes
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.dtype == torch.bfloat16


def _host_counts(fn: str, counts_L: Sequence[int], num_groups: int, num_rows: int) -> Tuple[int, ...]:
    counts = tuple(int(c) for c in counts_L)
    if len(counts) != num_groups or sum(counts) != num_rows:
        raise ValueError(f"{fn}: counts {list(counts)} do not match {num_groups} groups and {num_rows} rows")
    return counts


# --------------------------------------------------------------------------- grouped ops


def grouped_mm(x_NI: torch.Tensor, w_LIO: torch.Tensor, counts_L: Counts) -> torch.Tensor:
    """Per-group matmul on contiguous row slices: rows of group l use w[l].

    x_NI: [N, I] rows sorted by group; w_LIO: [L, I, O]; counts_L: rows per group, as ints, or as
    an [L] device tensor where the grouped kernel runs (`choose_path` row 2; then rows past
    sum(counts) are padding whose output and input gradient are undefined: the caller masks them,
    see `MoELayer`). Returns [N, O]. Paths: `torch._grouped_mm`, `kernels.grouped_mm.GroupedMM`
    (the stacked weight is never indexed per group in autograd, whose backward would
    materialise L full-size gradients), or for one group / no rows a plain matmul.
    """
    path = choose_path("mm", x_NI, (w_LIO,), counts_L)
    if path is Path.GROUPED_MM and isinstance(counts_L, torch.Tensor):  # offsets stay on the device (no host sync)
        if counts_L.shape != (w_LIO.shape[0],) or not _grouped_kernel_runs(x_NI, w_LIO):
            raise ValueError(f"grouped_mm: device counts {tuple(counts_L.shape)} need {w_LIO.shape[0]} groups and the "
                             "grouped kernel (bf16 on CPU or Hopper); pass host ints otherwise")
        return torch._grouped_mm(x_NI, w_LIO, offs=counts_L.cumsum(0).to(torch.int32))
    counts = _host_counts("grouped_mm", counts_L, w_LIO.shape[0], x_NI.shape[0])
    if x_NI.dtype != w_LIO.dtype and x_NI.shape[0] > 0:
        raise ValueError(f"grouped_mm: x is {x_NI.dtype} but w is {w_LIO.dtype}; cast one to the other")
    if path is Path.GROUPED_MM:
        offs = torch.tensor(counts, device=x_NI.device).cumsum(0).to(torch.int32)  # [L]
        return torch._grouped_mm(x_NI, w_LIO, offs=offs)
    if path is Path.FUSED:
        return GroupedMM.apply(x_NI, w_LIO, counts)
    if x_NI.shape[0] == 0:
        # no rows: keep x and w in the graph (zero grads, not None: a rank with no tokens must still reduce)
        return x_NI.new_zeros((0, w_LIO.shape[-1])) + 0.0 * (x_NI.sum() + w_LIO.sum())
    return x_NI @ w_LIO[0]  # one group


def grouped_ffn(x_NH: torch.Tensor, w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down: torch.Tensor,
                counts_L: Counts, activation: str, grad_params: Optional[KeptGrads] = None) -> torch.Tensor:
    """FFN per expert on contiguous slices: weights [L, H, F], [L, H, F], [L, F, H]. Returns [N, H].

    counts_L: host ints, or an [L] device tensor for the grouped kernel (`grouped_mm`).
    FUSED (`choose_path`) runs `kernels.gated_ffn.GroupedGatedFFN`, which keeps 2 [N, F]
    tensors for backward instead of 4; otherwise three `grouped_mm` calls.
    grad_params: the weights' kept gradients (`KeptGrads`), whose existing `.grad` the FUSED kernel
    writes their gradients into (no new [L, H, F] tensors; see `kernels.gated_ffn`); the other
    paths zero them here if stale and let autograd add into them.
    """
    ws = tuple(w for w in (w_up, w_gate, w_down) if w is not None)
    if not isinstance(counts_L, torch.Tensor):
        counts_L = _host_counts("grouped_ffn", counts_L, w_up.shape[0], x_NH.shape[0])
    if choose_path("ffn", x_NH, ws, counts_L, activation) is Path.FUSED:
        return GroupedGatedFFN.apply(x_NH, w_gate, w_up, w_down, counts_L, GATED[activation], GATED_GRAD[activation],
                                     grad_params)
    if grad_params is not None and torch.is_grad_enabled():
        grad_params.zero_if_stale()
    gate = grouped_mm(x_NH, w_gate, counts_L) if activation in GATED else None  # [N, F]
    up = grouped_mm(x_NH, w_up, counts_L)  # [N, F]
    return grouped_mm(hidden_act(gate, up, activation), w_down, counts_L)  # [N, H]


def grouped_ffn_tokens(x_TH: torch.Tensor, token_N: torch.Tensor, weight_N: torch.Tensor,
                       w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down: torch.Tensor,
                       counts_L: Sequence[int], activation: str,
                       grad_params: Optional[KeptGrads] = None) -> torch.Tensor:
    """`grouped_ffn` fused with the gather of each pair's token row and the weighted combine (EP size 1).

    x_TH: [T, H] tokens; token_N [N]: the pairs' token ids sorted by expert, counts_L[l] (host ints)
    for expert l; weight_N [N]: their combine weights. Returns y [T, H] = sum over t's pairs of
    w[n] * FFN_l(x[t]), in `accumulate_dtype(x.dtype)` (as `kernels.combine.weighted_scatter_add`).
    Where `choose_path("ffn", ...)` is FUSED this is `kernels.gated_ffn.GroupedGatedFFNTokens`, which
    holds no [N, H] tensor in either direction; elsewhere it is exactly index_select, `grouped_ffn`
    and `weighted_scatter_add` (`kernels.combine.gather_combine`).
    """
    N = token_N.shape[0]
    counts = _host_counts("grouped_ffn_tokens", counts_L, w_up.shape[0], N)
    if weight_N.shape[0] != N:
        raise ValueError(f"grouped_ffn_tokens: {weight_N.shape[0]} weights for {N} pairs")
    ws = tuple(w for w in (w_up, w_gate, w_down) if w is not None)
    rows_NH = x_TH[:1].expand(N, -1)  # what choose_path reads of the rows (dtype, device, N, width), not copied
    if choose_path("ffn", rows_NH, ws, counts, activation) is Path.FUSED:  # AUTOGRAD without rows
        return GroupedGatedFFNTokens.apply(x_TH, token_N, weight_N, w_gate, w_up, w_down, counts, GATED[activation],
                                           GATED_GRAD[activation], grad_params)
    return gather_combine(lambda x_NH: grouped_ffn(x_NH, w_gate, w_up, w_down, counts, activation, grad_params),
                          x_TH, token_N, weight_N)


def gather_lora_proj(base_TO: torch.Tensor, x_NI: torch.Tensor, token_N: torch.Tensor, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, counts_L: Sequence[int], scaling: float) -> torch.Tensor:
    """base[token[n]] + scaling * x[n] @ A[l] @ B[l] for the rows n of group l. Returns [N, O].

    base_TO: [T, O] a frozen projection computed once per token; x_NI: [N, I]
    rows sorted by group; lora_A: [L, I, r]; lora_B: [L, r, O]. FUSED (`choose_path`)
    runs `kernels.lora_proj.GatherLoRAProj` (the LoRA term accumulated into the
    gathered rows in place); otherwise a frozen base in bf16 with fp32 adapters, say,
    runs the adapter in its dtype and the sum in the base's.
    """
    counts = _host_counts("gather_lora_proj", counts_L, lora_A.shape[0], x_NI.shape[0])
    if token_N.shape[0] != x_NI.shape[0]:
        raise ValueError(f"gather_lora_proj: {token_N.shape[0]} token ids for {x_NI.shape[0]} rows")
    if choose_path("lora_proj", x_NI, (lora_A, lora_B, base_TO), counts) is Path.FUSED:
        return GatherLoRAProj.apply(base_TO, x_NI, token_N, lora_A, lora_B, counts, float(scaling))
    delta = grouped_mm(grouped_mm(x_NI.to(lora_A.dtype), lora_A, counts), lora_B, counts)  # [N, O]
    return base_TO.index_select(0, token_N) + (scaling * delta).to(base_TO.dtype)


def moe_lora_hidden(gate_TF: torch.Tensor, up_TF: torch.Tensor, x_NH: torch.Tensor, token_N: torch.Tensor,
                    weight_N: torch.Tensor, lora: Dict[str, Tuple[torch.Tensor, torch.Tensor]], counts_L: Sequence[int],
                    scaling: float, activation: str):
    """The per-pair part of MoE-LoRA (MixLoRA) experts on a frozen gated FFN, fused per expert.

    For the rows n of expert l (sorted by expert; token t = token[n], weight w = weight[n]):
        g_n = gate[t] + s * x_n A_g[l] B_g[l]        u_n = up[t] + s * x_n A_u[l] B_u[l]
        h_n = phi(g_n) * u_n
    Returns (h_TF [T, F] = sum_n w_n h_n per token, z_Nr [N, r] = w_n * s * h_n A_d[l], or None
    without a down adapter). `lora` maps "gate"/"up"/"down" to (A [L, I, r], B [L, r, O]);
    a missing entry means no adapter on that projection. Only where `choose_path("lora_hidden",
    ...)` is FUSED (the caller checks): `kernels.moe_lora_hidden.MoELoRAHidden`.
    """
    if activation not in GATED_GRAD:
        raise ValueError(f"moe_lora_hidden: activation={activation!r} must be gated ({', '.join(GATED_GRAD)})")
    counts = tuple(int(c) for c in counts_L)
    if sum(counts) != x_NH.shape[0] or token_N.shape[0] != x_NH.shape[0]:
        raise ValueError(f"moe_lora_hidden: counts {list(counts)} do not match {x_NH.shape[0]} rows")
    none = (None, None)
    (ag, bg), (au, bu), (ad, _bd) = (lora.get(k, none) for k in ("gate", "up", "down"))
    tensors = MoELoRATensors(gate_A=ag, gate_B=bg, up_A=au, up_B=bu, down_A=ad)
    return moe_lora_hidden_apply(gate_TF, up_TF, x_NH, token_N, weight_N, tensors, counts, float(scaling),
                                 GATED[activation], GATED_GRAD[activation])
