"""MoELayer: router + capacity + dispatcher + experts (+ shared experts).

    x [B, S, H] -> [T, H] -> router (fp32) -> capacity keep mask [T, K]
      -> dispatcher.dispatch -> experts -> dispatcher.combine -> [T, H]
      + shared_experts(x) -> [B, S, H]

Returns (y, MoEAux): the weighted auxiliary loss to add to the task loss, its
parts, and per-step diagnostics (tokens per expert, drops, router entropy,
all-to-all bytes).

Host syncs (device->host reads, counted by `moedist.moe.host_sync.HostSyncCounter`): the
statistics stay on the device as tensors (the trainer reads them once per logging step).
A forward reads the device at most ONCE: the per-expert counts, as host ints, when the
experts loop over experts (fp32, LoRA) or the all-to-all needs split sizes (EP > 1, one
read after the count exchange). At EP size 1 with experts that take device counts
(`DeviceCountExperts`: the grouped kernel, bf16 on CPU or a Hopper GPU) it reads nothing:
every (token, slot) pair is sorted, refused ones last as padding rows that are masked to
zero, so shapes are static and the forward can be captured in a CUDA graph.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from moedist.choices import AUX_LOSS_TYPES, DROP_POLICIES, ROUTER_TYPES
from moedist.moe.capacity import compute_capacity, select_tokens
from moedist.moe.dispatcher import TokenDispatcher
from moedist.moe.expert_choice import expert_choice
from moedist.moe.counts import count_ids
from moedist.moe.losses import importance_loss, load_loss, router_entropy, router_z_loss, switch_load_balancing_loss
from moedist.moe.groups import GroupTable, RouteInfo, random_group_routing
from moedist.moe.parts import (DeviceCountExperts, Dispatcher, Experts, FrozenBaseExperts, FusedLocalExperts,
                               has_capability)
from moedist.moe.router import Router, RouterOutput



@dataclass
class MoEAux:
    """Auxiliary outputs of one MoE layer for one forward.

    loss: aux_loss_coef * aux_loss + z_loss_coef * z_loss (scalar tensor, add it to the task loss).
    aux_loss, z_loss: the unweighted parts (fp32 scalars).
    tokens_per_expert: [E] int64 kept pairs per global expert from this rank's tokens.
    dropped_per_expert: [E] int64 pairs refused by capacity, this rank's tokens.
    dropped_frac: 0-d fp32 tensor, dropped pairs / routed pairs on this rank.
    router_entropy: 0-d fp32 tensor, mean routing entropy (nats).
    All tensors stay on the device (reading them is a host sync: once per logging step).
    dropped_frac and router_entropy are None when the layer runs without statistics (`stats=False`).
    a2a_bytes: bytes this rank sent in dispatch, a host int (from the split sizes the all-to-all
    already read; 0 at EP size 1).
    """

    loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_per_expert: torch.Tensor
    dropped_frac: Optional[torch.Tensor]
    router_entropy: Optional[torch.Tensor]
    capacity: Optional[int] = None
    a2a_bytes: int = 0
    extra: dict = field(default_factory=dict)


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN built from parts.

    Args:
        router: a `Router`. experts: a module with forward(x_NH, counts_L) holding the
            dispatcher's local experts; `moedist.moe.parts.Experts` declares the whole contract
            (its layout is then checked against the dispatcher), and the capabilities
            `FusedLocalExperts`, `FrozenBaseExperts`, `DeviceCountExperts` pick the paths below.
        shared_experts: optional dense module applied to every token.
        dispatcher: a `moedist.moe.parts.Dispatcher` (`TokenDispatcher` of EP size 1 when omitted).
        capacity_factor: None or 0 for dropless. min_capacity: lower bound.
        drop_policy: "position" or "probs".
        aux_loss_type: "switch", "importance" (Shazeer importance + load) or "none".
        aux_loss_coef, z_loss_coef: weights of the returned aux loss.

    The keyword defaults are the textbook layer (first-come dropping, no capacity floor, no aux
    loss); a training run's defaults differ on purpose and live in the config (`moe.drop_policy`
    "probs", `moe.min_capacity` 4, `moe.aux_loss_coef` 0.01), which `models/build.py` passes in.
        eval_capacity_factor: the capacity factor in eval mode; None = capacity_factor, 0 = dropless.
        router_type: "token_choice", or "expert_choice" (`moedist.moe.expert_choice`; needs a
            capacity factor, softmax scoring and aux_loss_type "none").
        stats: compute the diagnostics (router entropy, dropped fraction); False (`--no-stats`)
            leaves them None. Either way nothing is read to the host for them.

    Experts with one frozen FFN under all experts (`FrozenBaseExperts`, MoE-LoRA) apply that
    FFN to every token at full weight; only the adapters are routed:
    y[t] = FFN(x_t) + sum over t's kept pairs of w * (FFN_e(x_t) - FFN(x_t)). Without drops and
    with weights summing to 1 this is sum_k w_k FFN_e(x_t), computed without the extra term.
    """

    def __init__(self, router: Router, experts: nn.Module, shared_experts: Optional[nn.Module] = None,
                 dispatcher: Optional[Dispatcher] = None, capacity_factor: Optional[float] = None,
                 min_capacity: int = 0, drop_policy: str = "position", aux_loss_type: str = "switch",
                 aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0, eval_capacity_factor: Optional[float] = None,
                 router_type: str = "token_choice", stats: bool = True):
        super().__init__()
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        self.dispatcher = dispatcher or TokenDispatcher(router.num_experts)
        E = router.num_experts
        if self.dispatcher.num_experts != E:
            raise ValueError(f"dispatcher num_experts={self.dispatcher.num_experts} != router num_experts={E}")
        self._check_layout()
        if capacity_factor is not None and not (capacity_factor >= 0 and math.isfinite(capacity_factor)):
            raise ValueError(f"capacity_factor={capacity_factor}: must be a finite number > 0, or 0/None for dropless")
        if eval_capacity_factor is not None and not (eval_capacity_factor >= 0 and math.isfinite(eval_capacity_factor)):
            raise ValueError(f"eval_capacity_factor={eval_capacity_factor}: must be a finite number >= 0, or None")
        if router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type={router_type!r}: allowed {', '.join(ROUTER_TYPES)}")
        if router_type == "expert_choice":
            if not capacity_factor or eval_capacity_factor == 0:
                raise ValueError("router_type='expert_choice' needs a capacity factor > 0 (also in eval)")
            if aux_loss_type != "none" or router.score_func != "softmax" or router.second_expert_policy != "all":
                raise ValueError("router_type='expert_choice' needs aux_loss_type='none', score_func='softmax' and "
                                 "second_expert_policy='all'")
        if min_capacity < 0:
            raise ValueError(f"min_capacity={min_capacity}: must be >= 0")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy={drop_policy!r}: allowed {', '.join(DROP_POLICIES)}")
        if aux_loss_type not in AUX_LOSS_TYPES:
            raise ValueError(f"aux_loss_type={aux_loss_type!r}: allowed {', '.join(AUX_LOSS_TYPES)}")
        self.capacity_factor = capacity_factor or None
        self.eval_capacity_factor, self.router_type = eval_capacity_factor, router_type
        self.min_capacity, self.drop_policy = min_capacity, drop_policy
        self.aux_loss_type, self.aux_loss_coef, self.z_loss_coef = aux_loss_type, aux_loss_coef, z_loss_coef
        self.stats = stats

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    # Expert groups (`moedist.moe.groups`), set by `moedist.models.build.build_model`; None = route over all.
    groups: Optional[GroupTable] = None
    route_seed: int = 0  # the layer index: random group routing hashes (token id, route_seed)

    def forward(self, x_BSH: torch.Tensor, route: Optional[RouteInfo] = None):
        """(y [B, S, H], MoEAux); `route` (domain and id of each token) selects the expert group."""
        shape = x_BSH.shape
        x_TH = x_BSH.reshape(-1, shape[-1])  # [T, H]
        T, E, K = x_TH.shape[0], self.num_experts, self.router.top_k
        r = self._route(x_TH, route)
        cap = compute_capacity(T, E, K, self.current_capacity_factor(), self.min_capacity)
        if self.router_type == "expert_choice":  # pairs become [T, E]: slot e = expert e, kept if e chose t
            idx_TE, w_TE, sel = expert_choice(r.probs_TE, cap)
            r = dataclasses.replace(r, idx_TK=idx_TE, weight_TK=w_TE)
        else:
            sel = select_tokens(r.idx_TK, r.weight_TK, E, cap, self.drop_policy, r.active_TK)
        base_w_T = self._base_weight(r, sel)  # [T] weight of the frozen FFN, or None
        d = self.dispatcher
        if (id(self.experts), id(d)) != self._layout_checked:  # parallelize() swaps dispatchers
            self._check_layout()
        # device counts first (no host sync at all), then a fused path over the tokens (one sync)
        on_device = (d.ep_size == 1 and has_capability(self.experts, DeviceCountExperts)
                     and self.experts.takes_device_counts(x_TH))
        if d.ep_size == 1 and not on_device and has_capability(self.experts, FusedLocalExperts):
            perm = d.permute_local(r.idx_TK, sel.keep_TK)  # host counts: the forward's one sync
            w_N = r.weight_TK.reshape(-1).index_select(0, perm.pair_N)  # [N]
            y_TH = self.experts.forward_tokens(x_TH, perm.token_N, w_N, perm.counts_host, base_weight_T=base_w_T)
        else:
            x_NH, counts_L, state = d.dispatch(x_TH, r.idx_TK, sel.keep_TK, host_counts=not on_device)
            pad_N1 = None  # [N, 1] padding rows (refused pairs), device counts only
            if on_device and not (sel.capacity is None and r.active_TK is None):
                pad_N1 = state.perm.padding_N().unsqueeze(1)
                x_NH = x_NH.masked_fill(pad_N1, 0)  # also zeroes the kernel's undefined input gradient there
            y_NH = self.experts(x_NH, counts_L)  # [N, H]
            if pad_N1 is not None:
                y_NH = y_NH.masked_fill(pad_N1, 0)  # the kernel leaves rows past the last offset undefined
            y_TH = d.combine(y_NH, state, r.weight_TK)  # [T, H], accumulated in >= fp32
            if base_w_T is not None:  # the frozen FFN is replicated: computed here for every token
                y_TH = y_TH + base_w_T.unsqueeze(1) * self.experts.base_forward(x_TH)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        aux = self._aux(r, sel, T)
        return y_TH.to(x_BSH.dtype).reshape(shape), aux

    def _check_layout(self) -> None:
        """Experts that declare their layout (`Experts`) hold exactly the dispatcher's local experts.

        Checked at construction and again in the first forward after either part is replaced
        (`_layout_checked` remembers the pair; the structural check costs microseconds per call)."""
        ex, d = self.experts, self.dispatcher
        if isinstance(ex, Experts):
            if ex.num_local != d.num_local_experts:
                raise ValueError(f"experts hold {ex.num_local} local experts, the dispatcher expects {d.num_local_experts}")
            if ex.first_expert != d.first_expert:
                raise ValueError(f"experts start at global id {ex.first_expert}, the dispatcher's rank holds "
                                 f"experts from {d.first_expert}: shard the experts with the same EP layout")
        self._layout_checked = (id(ex), id(d))

    def current_capacity_factor(self) -> Optional[float]:
        """capacity_factor in training; eval_capacity_factor (when set; 0 = dropless) in eval mode. None = dropless."""
        if self.training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor or None

    def _base_weight(self, r: RouterOutput, sel) -> Optional[torch.Tensor]:
        """[T] weight of a `FrozenBaseExperts` FFN on top of the routed experts: 1 - sum of the kept weights.

        None when the experts have no frozen base, or when every pair is kept and the weights of a token
        sum to 1 (renormalized token choice without capacity): the term is then zero.
        """
        if not has_capability(self.experts, FrozenBaseExperts):
            return None
        if (sel.capacity is None and self.router_type == "token_choice" and r.active_TK is None
                and self.router.renormalize):
            return None
        kept_w_T = (r.weight_TK * sel.keep_TK.to(r.weight_TK.dtype)).sum(1)  # [T]
        return 1.0 - kept_w_T

    def _route(self, x_TH: torch.Tensor, route: Optional[RouteInfo]) -> RouterOutput:
        """The router's decision, restricted to each token's group; random group routing replaces the choice."""
        g = self.groups
        if g is None or g.is_trivial() or route is None:
            if g is not None and g.mode == "random" and route is None:
                raise ValueError("group_routing=random needs the token ids (CausalLM passes a RouteInfo)")
            return self.router(x_TH)
        domain_T = route.domain_T.to(x_TH.device)
        r = self.router(x_TH, g.allowed(domain_T))
        if g.mode == "random":
            idx_TK, w_TK = random_group_routing(route.token_T.to(x_TH.device), domain_T, g, self.router.top_k,
                                                self.route_seed)
            r = dataclasses.replace(r, idx_TK=idx_TK, weight_TK=w_TK.to(r.weight_TK.dtype), active_TK=None)
        return r

    def _aux(self, r, sel, T: int) -> MoEAux:
        E, K = self.num_experts, self.router.top_k
        zero = r.probs_TE.sum() * 0.0  # (masked logits hold -inf: -inf * 0 would be NaN)
        if self.aux_loss_type == "switch":
            aux = switch_load_balancing_loss(r.probs_TE, r.idx_TK, E)
        elif self.aux_loss_type == "importance":
            gates_TE = torch.zeros_like(r.probs_TE).scatter(1, r.idx_TK, r.weight_TK)  # [T, E]
            aux = importance_loss(gates_TE)
            if r.noise is not None:
                aux = aux + load_loss(*r.noise, k=K)
        else:
            aux = zero
        z = router_z_loss(r.logits_TE) if self.z_loss_coef else zero
        kept_E = count_ids(r.idx_TK, E, sel.keep_TK)  # [E] on the device
        dropped_frac = entropy = None
        if self.stats:
            dropped_frac = sel.dropped_E.sum().float() / max(1, T * K)
            entropy = router_entropy(r.probs_TE)
        return MoEAux(
            loss=self.aux_loss_coef * aux + self.z_loss_coef * z, aux_loss=aux.detach(), z_loss=z.detach(),
            tokens_per_expert=kept_E.detach(), dropped_per_expert=sel.dropped_E.detach(),
            dropped_frac=dropped_frac, router_entropy=entropy,
            capacity=sel.capacity, a2a_bytes=self.dispatcher.last_stats.get("a2a_bytes", 0),
        )
