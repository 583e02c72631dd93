"""SparseMLPWithLoRA: a top-k routed mixture of DenseMLPWithLoRA experts.

Contract (fixed, so results reproduce bit for bit across machines and EP layouts):

* The ffh dimension is split into `ne = num_experts` experts of width `e = ffh // ne` (an error
  if it does not divide). Global expert `i` is `DenseMLPWithLoRA(h, e, ...)` whose
  init_base_seed, lora_dropout_seed and lora_init_base_seed are each the given value + i, so an
  expert's weights do not depend on which rank holds it.
* This rank holds `nle = ne // world_size` experts, global ids `[rank * nle, (rank + 1) * nle)`,
  in `self.experts` (an `nn.ModuleList` in that order); an error if world_size does not divide
  ne or rank >= world_size.
* Router weight `gate` [h, ne] is always float32, drawn from Normal(init_mean, init_std) with a
  generator seeded by init_base_seed (no offset). Routing, in float32:

      probs_TE = softmax(X_TH @ gate_HE)
      w_TK, idx_TK = topk(probs_TE, K); w_TK /= w_TK.sum(-1)
      out_TH = sum_k w_TK[:, k] * expert[idx_TK[:, k]](X_TH)

Two modes:

* `process_group=None`: partial sums. Every rank sees the same input and adds only its local
  experts' contributions (zeros for tokens routed elsewhere); summing the outputs of ranks
  0..world_size-1 gives the full layer, and world_size=1 is the whole layer.
* `process_group` of world_size ranks: expert parallel. Each rank passes its OWN tokens (counts
  may differ between ranks); the `TokenDispatcher` sends each (token, slot) pair to the rank
  owning its expert and brings the results back, so every rank's output equals the world_size=1
  layer applied to its own input, and each local expert's gradient holds all ranks' tokens.

Built from `moedist.moe`: routing is `router.softmax_topk`, the pairs are sorted by expert with
`dispatcher.permute_pairs` (index based, no one-hot [T, E, C] mask) and combined with
`dispatcher.combine_pairs` in at least float32.
Legend: T tokens, E experts, L local experts, K top-k, H hidden, N pairs.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from moedist.distributed.comm import ExpertParallelComm
from moedist.layers.activation import MLPActivationType, parse_activation
from moedist.layers.dense_lora import DenseMLPWithLoRA, check_dtype, check_lora_args, check_positive_int
from moedist.moe.dispatcher import LocalPermutation, TokenDispatcher, accumulate_dtype, combine_pairs, permute_pairs
from moedist.moe.router import softmax_topk


def route_topk(x_TH: torch.Tensor, gate_HE: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing in float32 (`moedist.moe.router.softmax_topk`) with renormalised weights.

    Args:
        x_TH: [T, H] tokens (any float dtype; cast to float32 on gate's device).
        gate_HE: [H, E] float32 router weight.
        k: number of experts per token.

    Returns:
        (w_TK float32 [T, K] summing to 1 per token, idx_TK int64 [T, K]).
    """
    logits_TE = x_TH.to(device=gate_HE.device, dtype=torch.float32) @ gate_HE  # [T, E]
    idx_TK, top_TK, _ = softmax_topk(logits_TE, k, renormalize=False)  # [T, K], [T, K]
    # w = topk / sum(topk) as written, also for k = 1 (the router's shortcut there drops the gate's graph)
    return top_TK / top_TK.sum(dim=-1, keepdim=True), idx_TK


def local_pairs(idx_TK: torch.Tensor, first: int, num_local: int, num_experts: int) -> Tuple[LocalPermutation, List[int]]:
    """The (token, slot) pairs routed to experts `[first, first + num_local)`, sorted by expert
    (`permute_pairs` with only this rank's experts kept; token order inside each expert).

    Returns (the permutation: pair_N, token_N; counts_L: rows per local expert, host ints).
    """
    keep_TK = (idx_TK >= first) & (idx_TK < first + num_local)  # [T, K] pairs of my experts
    perm = permute_pairs(idx_TK, keep_TK, num_experts)
    return perm, perm.counts_host[first:first + num_local]


class SparseMLPWithLoRA(nn.Module):
    """Top-k mixture of `num_experts` GLU experts, optionally expert parallel.

    Args:
        hidden_size: H.
        ffh_size: total inner width, split evenly over the experts.
        activation_type: expert non-linearity (also picks the init family).
        num_experts: ne, global number of experts (divides ffh_size).
        moe_topk: K, experts per token, 1 <= K <= ne.
        rank: this rank's index in [0, world_size).
        world_size: number of ranks the experts are sharded over (divides ne).
        process_group: None for the partial-sum mode; an EP process group of
            `world_size` ranks (or a ready `ExpertParallelComm`) for expert
            parallelism.
        init_mean: mean of the router weight.
        init_std: std of the router weight.
        init_base_seed: router seed; expert i uses init_base_seed + i.
        lora_rank, lora_alpha, lora_dropout_rate: per-expert LoRA settings.
        lora_dropout_seed: expert i uses lora_dropout_seed + i.
        lora_init_base_seed: expert i uses lora_init_base_seed + i.
        dtype: dtype of the expert parameters (the router is always float32).
        device: device of all parameters.
    """

    def __init__(
        self,
        hidden_size: int,
        ffh_size: int,
        activation_type: MLPActivationType = MLPActivationType.SILU,
        num_experts: int = 1,
        moe_topk: int = 1,
        rank: int = 0,
        world_size: int = 1,
        process_group=None,
        init_mean: float = 0.0,
        init_std: float = 1.0,
        init_base_seed: int = 42,
        lora_rank: int = 0,
        lora_alpha: Optional[float] = None,
        lora_dropout_rate: float = 0.0,
        lora_dropout_seed: int = 42,
        lora_init_base_seed: int = 42,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
    ):
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.ffh_size = check_positive_int("ffh_size", ffh_size)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.world_size = check_positive_int("world_size", world_size)
        if ffh_size % num_experts != 0:
            raise ValueError(f"ffh_size ({ffh_size}) must be divisible by num_experts ({num_experts})")
        if isinstance(moe_topk, bool) or not isinstance(moe_topk, int) or not 1 <= moe_topk <= num_experts:
            raise ValueError(f"moe_topk must be an int in [1, num_experts={num_experts}], got {moe_topk!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if num_experts % world_size != 0:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by world_size ({world_size})")
        for name, v in (("init_mean", init_mean), ("init_std", init_std)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r}")
        check_lora_args(lora_rank, lora_alpha, lora_dropout_rate)
        check_dtype(dtype)

        self.activation_type = parse_activation(activation_type)
        self.moe_topk = moe_topk
        self.rank = rank
        self.expert_size = ffh_size // num_experts
        self.num_local_experts = num_experts // world_size
        self.first_local_expert = rank * self.num_local_experts
        self.init_mean = float(init_mean)
        self.init_std = float(init_std)
        self.init_base_seed = int(init_base_seed)
        self.lora_rank = lora_rank

        self.comm: Optional[ExpertParallelComm] = None
        self._dispatcher = None
        if process_group is not None:
            comm = process_group if isinstance(process_group, ExpertParallelComm) else ExpertParallelComm(process_group)
            if comm.size != world_size:
                raise ValueError(f"process_group has {comm.size} ranks but world_size={world_size}")
            if comm.rank != rank:
                raise ValueError(f"rank={rank} but this process is rank {comm.rank} of process_group")
            self.comm = comm
            self._dispatcher = TokenDispatcher(num_experts=self.num_experts, comm=comm)

        # Router: [H, E], always float32.
        self.gate = nn.Parameter(torch.empty(hidden_size, num_experts, dtype=torch.float32, device=device))
        self.experts = nn.ModuleList([
            DenseMLPWithLoRA(
                hidden_size, self.expert_size, self.activation_type,
                init_base_seed=init_base_seed + i,
                lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout_rate=lora_dropout_rate,
                lora_dropout_seed=lora_dropout_seed + i, lora_init_base_seed=lora_init_base_seed + i,
                dtype=dtype, device=device,
            )
            for i in range(self.first_local_expert, self.first_local_expert + self.num_local_experts)
        ])
        self.reset_parameters()

    @property
    def expert_parallel(self) -> bool:
        """True when tokens are exchanged over a process group."""
        return self.comm is not None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Redraw the router (generator seeded by init_base_seed) and every local expert."""
        g = torch.Generator(device="cpu")
        g.manual_seed(self.init_base_seed)
        gate_HE = torch.empty(self.hidden_size, self.num_experts, dtype=torch.float32)  # [H, E]
        gate_HE.normal_(self.init_mean, self.init_std, generator=g)
        self.gate.copy_(gate_HE)
        for expert in self.experts:
            expert.reset_parameters()

    def adapter_params(self) -> List[nn.Parameter]:
        """The LoRA parameters of the local experts, in expert order ([] when lora_rank == 0)."""
        return [p for expert in self.experts for p in expert.adapter_params()]

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ffh_size={self.ffh_size}, num_experts={self.num_experts}, "
                f"moe_topk={self.moe_topk}, rank={self.rank}, world_size={self.world_size}, "
                f"expert_parallel={self.expert_parallel}")

    # --------------------------------------------------------------- forward
    def _run_local_experts(self, x_NH: torch.Tensor, counts_L: List[int]) -> torch.Tensor:
        """Apply local expert i to its contiguous slice of rows.

        x_NH: [N, H] rows grouped by local expert, counts_L[i] rows for expert i.
        Returns [N, H] in x_NH's dtype.
        """
        outs, start = [], 0
        for expert, n in zip(self.experts, counts_L):
            outs.append(expert(x_NH[start:start + n]))  # [n, H]
            start += n
        if not outs:
            return x_NH[:0]
        return torch.cat(outs, dim=0)  # [N, H]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Route, run the local experts and combine.

        Args:
            input: [b, s, H] (any leading dims), any float dtype and device. In
                expert-parallel mode, this rank's own tokens (counts may differ
                between ranks, zero included).

        Returns:
            [b, s, H] in the input's dtype and on the input's device.
        """
        if input.shape[-1] != self.hidden_size:
            raise ValueError(f"input must have last dim hidden_size={self.hidden_size}, got shape {tuple(input.shape)}")
        x_TH = input.reshape(-1, self.hidden_size).to(device=self.gate.device)  # [T, H]
        w_TK, idx_TK = route_topk(x_TH, self.gate, self.moe_topk)  # [T, K] fp32, [T, K] int64
        if self.expert_parallel:
            y_TH = self._forward_expert_parallel(x_TH, w_TK, idx_TK)  # [T, H]
        else:
            y_TH = self._forward_partial_sum(x_TH, w_TK, idx_TK)  # [T, H]
        return y_TH.to(device=input.device, dtype=input.dtype).reshape(input.shape)

    def _forward_partial_sum(self, x_TH: torch.Tensor, w_TK: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output: only its local experts, zeros elsewhere."""
        perm, counts_L = local_pairs(idx_TK, self.first_local_expert, self.num_local_experts, self.num_experts)
        x_NH = x_TH.index_select(0, perm.token_N)  # [N, H]
        y_NH = self._run_local_experts(x_NH, counts_L)  # [N, H]
        return combine_pairs(y_NH, perm, w_TK, x_TH.shape[0])  # [T, H] in accumulate_dtype

    def _forward_expert_parallel(self, x_TH: torch.Tensor, w_TK: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        """Send pairs to the ranks owning their experts, compute, bring results back."""
        keep_TK = torch.ones_like(idx_TK, dtype=torch.bool)  # [T, K] no capacity dropping here
        x_NH, counts_L, state = self._dispatcher.dispatch(x_TH, idx_TK, keep_TK)  # [N, H], L ints
        counts_L = [int(c) for c in counts_L]
        y_NH = self._run_local_experts(x_NH, counts_L)  # [N, H]
        # Weighted sum in (at least) float32, as in the partial-sum path.
        return self._dispatcher.combine(y_NH.to(accumulate_dtype(y_NH.dtype)), state, w_TK)  # [T, H]
