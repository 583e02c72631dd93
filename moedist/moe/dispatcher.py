"""Token dispatch: permute routed pairs by expert, all-to-all over the EP group,
compute, all-to-all back, unpermute and combine.

No [E, C, H] padded buffer and no one-hot [T, E, C] masks: every buffer holds
exactly the N kept (token, slot) pairs. With EP size 1 the same code runs and
the collectives are identities; there, experts that take device counts get all
T*K pairs instead (refused ones last, as padding) and nothing is read to the host.

Flow for P ranks, L local experts each (E = P * L):
    kept pairs --sort by global expert--> x_perm [N, H], counts [P, L]
    exchange counts (all-to-all of [P, L] int64)   -> recv [P, L]
    ONE host read of counts + recv                 -> split sizes, N, M, counts_L
    all-to-all rows (uneven splits: row sums)      -> x_recv [M, H], ordered (source, local expert)
    stable sort by local expert                    -> x_local [M, H], counts_L = recv.sum(0)
    ... experts ...
    inverse of the above, then y[t] += w[t, k] * y_pair
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Mapping, Optional

import torch

from moedist.distributed.comm import ExpertParallelComm
from moedist.moe.counts import count_ids
# the weighted combine is a kernel (`kernels.combine`); re-exported here, where the layers look for it
from moedist.moe.kernels.combine import accumulate_dtype, weighted_scatter_add  # noqa: F401
from moedist.moe.parts import Dispatcher


@dataclass
class LocalPermutation:
    """Kept pairs sorted by global expert (stable: flat pair order t*K + k inside an expert).

    pair_N: flat pair ids t*K + k; token_N: their token ids; counts_E: [E] pairs per expert (device).
    counts_host: counts_E as Python ints (read once, for the row count and per-expert loops), or
    None when the counts stay on the device: then N = T*K and the rows past sum(counts_E) are
    padding (dropped or inactive pairs) that the experts must not compute (`padding_N`).
    """

    pair_N: torch.Tensor
    token_N: torch.Tensor
    counts_E: torch.Tensor
    counts_host: Optional[List[int]] = None

    def padding_N(self) -> torch.Tensor:
        """[N] bool: True for the padding rows (past sum(counts_E)); all False with host counts."""
        return torch.arange(self.pair_N.shape[0], device=self.pair_N.device) >= self.counts_E.sum()


def permute_pairs(idx_TK: torch.Tensor, keep_TK: torch.Tensor, num_experts: int,
                  host_counts: bool = True) -> LocalPermutation:
    """Sort the kept (token, slot) pairs of this rank by expert (pure function).

    host_counts=True reads counts_E to the host: the ONE device->host sync of a layer's forward
    (the row count N and per-expert loops need it). host_counts=False reads nothing: every pair
    is sorted, refused ones last (as a virtual expert E), so the shapes are static and only the
    device counts say where the kept rows end (for grouped GEMM kernels that take device offsets).
    """
    K, E = idx_TK.shape[1], num_experts
    e_P = torch.where(keep_TK.reshape(-1), idx_TK.reshape(-1), E)  # [T*K] refused pairs -> virtual expert E
    order_P = torch.argsort(e_P, stable=True)  # [T*K] by expert, then flat pair order
    counts_E = count_ids(e_P, E + 1)[:E]  # [E]
    if not host_counts:
        return LocalPermutation(order_P, torch.div(order_P, K, rounding_mode="floor"), counts_E)
    counts = counts_E.tolist()  # the host sync
    pair_N = order_P[:sum(counts)]  # [N] the kept pairs
    return LocalPermutation(pair_N, torch.div(pair_N, K, rounding_mode="floor"), counts_E, counts)


@dataclass
class DispatchState:
    """What combine() needs to undo dispatch()."""

    perm: LocalPermutation
    num_tokens: int
    in_splits: List[int] = field(default_factory=list)
    out_splits: List[int] = field(default_factory=list)
    to_local: Optional[torch.Tensor] = None  # [M] received row -> expert-sorted row
    from_local: Optional[torch.Tensor] = None  # inverse permutation


class TokenDispatcher(Dispatcher):
    """Moves routed tokens to the ranks holding their experts and back.

    Args:
        num_experts: E (global); must divide by the EP size.
        comm: the EP communicator (`ExpertParallelComm.single()` for EP size 1).

    After each dispatch (and `permute_local`), `last_stats` holds `a2a_rows` (rows sent each
    way), `a2a_bytes` (bytes of activations sent by this rank in the forward dispatch,
    = rows * H * element size; the combine sends the same count back) and `a2a_bytes_remote`
    (the part that leaves this rank). Only the dispatcher writes them.
    """

    def __init__(self, num_experts: int, comm: Optional[ExpertParallelComm] = None):
        self.comm = comm or ExpertParallelComm.single()
        if num_experts % self.comm.size != 0:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {self.comm.size}")
        self.num_experts = num_experts
        self.ep_size, self.ep_rank = self.comm.size, self.comm.rank
        self.num_local_experts = num_experts // self.comm.size
        self.first_expert = self.ep_rank * self.num_local_experts
        self._stats: dict = {}

    @property
    def last_stats(self) -> Mapping[str, int]:
        """The last dispatch's all-to-all rows and bytes ({} before the first one)."""
        return self._stats

    def permute_local(self, idx_TK: torch.Tensor, keep_TK: torch.Tensor) -> LocalPermutation:
        """EP size 1: the kept pairs sorted by expert with host counts (the forward's one sync), rows
        not moved, for experts with a fused local path (`moedist.moe.parts.FusedLocalExperts`).
        Nothing crosses the network: `last_stats` records zeros."""
        if self.ep_size != 1:
            raise ValueError(f"permute_local: needs EP size 1 (this dispatcher spans {self.ep_size} ranks)")
        self._stats = dict(a2a_rows=0, a2a_bytes=0, a2a_bytes_remote=0)
        return permute_pairs(idx_TK, keep_TK, self.num_experts)

    def dispatch(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, keep_TK: torch.Tensor, host_counts: bool = True):
        """Send each kept pair's token row to its expert's rank.

        Returns (x_NH rows for my local experts sorted by local expert, counts_L rows per local
        expert, state for combine()). counts_L is a list of ints read with ONE device->host sync
        (EP > 1: after the count exchange, so splits, row counts and expert counts come in one
        read); with host_counts=False (EP size 1 only) it is the [L] device tensor and x_NH holds
        T*K rows, the padding last (`LocalPermutation.padding_N`): no sync at all.
        """
        P, L = self.ep_size, self.num_local_experts
        if P == 1:
            perm = permute_pairs(idx_TK, keep_TK, self.num_experts, host_counts)
            self._stats = dict(a2a_rows=0, a2a_bytes=0, a2a_bytes_remote=0)
            counts_L = perm.counts_host if host_counts else perm.counts_E
            return x_TH.index_select(0, perm.token_N), counts_L, DispatchState(perm, x_TH.shape[0])
        if not host_counts:
            raise ValueError("dispatch: host_counts=False needs EP size 1 (the all-to-all splits are host ints)")
        perm = permute_pairs(idx_TK, keep_TK, self.num_experts, host_counts=False)
        counts_PL = perm.counts_E.view(P, L)  # rows I send to rank p, per its local expert
        recv_PL = self.comm.exchange_counts(counts_PL)  # rows rank p sends me, per my local expert
        host = torch.cat([counts_PL.reshape(-1), recv_PL.reshape(-1)]).tolist()  # the one host sync
        send_PL = torch.tensor(host[:P * L]).view(P, L)
        got_PL = torch.tensor(host[P * L:]).view(P, L)
        counts = send_PL.reshape(-1).tolist()
        N = sum(counts)
        pair_N = perm.pair_N[:N]
        perm = LocalPermutation(pair_N, perm.token_N[:N], perm.counts_E, counts)
        state = DispatchState(perm, x_TH.shape[0])
        state.in_splits = send_PL.sum(1).tolist()
        state.out_splits = got_PL.sum(1).tolist()
        x_perm = x_TH.index_select(0, perm.token_N)  # [N, H]
        x_recv = self.comm.all_to_all(x_perm, state.out_splits, state.in_splits)  # [M, H] (source, expert) order
        M = sum(state.out_splits)
        local_M = torch.arange(L, device=recv_PL.device).repeat(P).repeat_interleave(
            recv_PL.reshape(-1), output_size=M)  # [M]
        state.to_local = torch.argsort(local_M, stable=True)
        state.from_local = torch.argsort(state.to_local)
        row_bytes = x_TH.shape[1] * x_TH.element_size()
        sent = sum(state.in_splits)
        self._stats = dict(a2a_rows=sent, a2a_bytes=sent * row_bytes,
                               a2a_bytes_remote=(sent - state.in_splits[self.ep_rank]) * row_bytes)
        x_local = x_recv.index_select(0, state.to_local)  # [M, H] sorted by local expert
        return x_local, got_PL.sum(0).tolist(), state

    def combine(self, y_NH: torch.Tensor, state: DispatchState, weight_TK: torch.Tensor) -> torch.Tensor:
        """Bring expert outputs home and sum them per token, weighted. Returns [T, H]."""
        if self.ep_size > 1:
            y_recv = y_NH.index_select(0, state.from_local)  # [M, H] back to (source, expert) order
            y_NH = self.comm.all_to_all(y_recv, state.in_splits, state.out_splits)  # [N, H] my pairs
        return combine_pairs(y_NH, state.perm, weight_TK, state.num_tokens)


def combine_pairs(y_NH: torch.Tensor, perm: LocalPermutation, weight_TK: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """y[t] = sum over t's kept pairs of w[t, k] * y_pair (pure function). Returns [T, H] in
    `accumulate_dtype(y_NH.dtype)` (float32 for bf16/fp16 experts; the layer casts once at the end)."""
    w_N = weight_TK.reshape(-1).index_select(0, perm.pair_N)  # [N] (fp32 from the router)
    return weighted_scatter_add(y_NH, w_N, perm.token_N, num_tokens)
