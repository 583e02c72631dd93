"""Per-domain expert groups (PanGu-Sigma): which experts a token may route to, and random routing in a group.

    table = GroupTable.from_config(cfg.moe.expert_groups, source_names, E, cfg.moe.group_routing)
    allowed_TE = table.allowed(domain_T)            # [T, E] bool, row = the token's group
    idx_TK, w_TK = random_group_routing(token_T, domain_T, table, k, layer_seed)

Legend: T tokens, E experts, K top-k, D domains (data sources, by index in data.sources).

* A token's domain is the index of its sequence's data source; -1 = none (generation,
  byte-level data). A domain without a group, and domain -1, may use every expert.
* ``learned``: the router's logits outside the group are masked to -inf before
  softmax/top-k (`Router.forward(x, allowed_TE)`), so the group's probabilities sum to 1.
* ``random`` (PanGu-Sigma's random-routed experts): the router chooses nothing. Token
  id t in layer l picks position j0 = hash(t, l) mod g inside its group of g experts
  (in the order the config lists them) and takes the K consecutive positions
  j0, j0+1, ..., j0+K-1 (mod g); combine weights are 1/K each. The mapping is fixed
  (no parameter, no randomness at run time), so EP layouts and an extracted sub-model
  (same group order, renumbered) route every token the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from moedist.choices import GROUP_ROUTING
_HASH_A = 2654435761     # Knuth's multiplicative hash constant (odd, ~2^32)
_HASH_B = 40503


@dataclass
class RouteInfo:
    """What a MoE layer may know about its tokens beyond their hidden states.

    domain_T: [T] int64 data-source index of each token (-1 = none); token_T: [T] int64 input ids.
    """

    domain_T: torch.Tensor
    token_T: torch.Tensor


def route_info(input_ids_BS: torch.Tensor, domain_ids: Optional[torch.Tensor]) -> RouteInfo:
    """RouteInfo of a batch; domain_ids is [B] (one source per row) or [B, S] (per token), None = all -1."""
    B, S = input_ids_BS.shape
    if domain_ids is None:
        dom_BS = torch.full((B, S), -1, dtype=torch.long, device=input_ids_BS.device)
    elif domain_ids.dim() == 1:
        dom_BS = domain_ids.to(input_ids_BS.device).long()[:, None].expand(B, S)   # [B, S]
    else:
        dom_BS = domain_ids.to(input_ids_BS.device).long()
    return RouteInfo(dom_BS.reshape(-1), input_ids_BS.reshape(-1).long())


@dataclass
class GroupTable:
    """The groups of one model: members_D[d] = expert ids of domain d's group (empty = all experts).

    allowed_DE: [D+1, E] bool, row D (the last) is the "no domain" row of all True.
    """

    num_experts: int
    members_D: List[List[int]]
    mode: str = "learned"

    def __post_init__(self):
        if self.mode not in GROUP_ROUTING:
            raise ValueError(f"group_routing={self.mode!r}: allowed {', '.join(GROUP_ROUTING)}")
        E = self.num_experts
        # explicit CPU: the model may be built under torch.device("meta"); forward moves them to the tokens
        allowed = torch.ones(len(self.members_D) + 1, E, dtype=torch.bool, device="cpu")   # [D+1, E]
        for d, ids in enumerate(self.members_D):
            if ids:
                if min(ids) < 0 or max(ids) >= E or len(set(ids)) != len(ids):
                    raise ValueError(f"group {d}: expert ids {ids} must be distinct and in 0..{E - 1}")
                allowed[d] = False
                allowed[d, ids] = True
        self.allowed_DE = allowed
        # random routing: every domain's member list padded to E with its first entries ([D+1, E], sizes [D+1])
        full = [ids or list(range(E)) for ids in self.members_D] + [list(range(E))]
        self.size_D = torch.tensor([len(m) for m in full], dtype=torch.long, device="cpu")     # [D+1]
        self.member_DE = torch.tensor([m + m[:1] * (E - len(m)) for m in full], dtype=torch.long,
                                      device="cpu")                                           # [D+1, E]
        self._trivial = self.mode == "learned" and not any(self.members_D)

    @classmethod
    def from_config(cls, expert_groups: Mapping[str, Sequence[int]], source_names: Sequence[str],
                    num_experts: int, mode: str = "learned") -> "GroupTable":
        """Domain d = source_names[d]; a source without a group gets an empty member list (all experts)."""
        return cls(num_experts, [list(expert_groups.get(n, [])) for n in source_names], mode)

    @property
    def num_domains(self) -> int:
        return len(self.members_D)

    def _row(self, domain_T: torch.Tensor) -> torch.Tensor:
        """[T] row index into the tables: the domain, or the all-experts row D for -1 and unknown ids."""
        D = self.num_domains
        return torch.where((domain_T >= 0) & (domain_T < D), domain_T, torch.full_like(domain_T, D))

    def allowed(self, domain_T: torch.Tensor) -> torch.Tensor:
        """[T, E] bool: experts each token may route to."""
        return self.allowed_DE.to(domain_T.device)[self._row(domain_T)]

    def is_trivial(self) -> bool:
        """Learned routing with no group: nothing to mask."""
        return self._trivial


def mask_logits(logits_TE: torch.Tensor, allowed_TE: torch.Tensor) -> torch.Tensor:
    """-inf outside the allowed experts (softmax gives them probability 0; top-k never picks them)."""
    return logits_TE.masked_fill(~allowed_TE, float("-inf"))


def mask_bias(bias_E: Optional[torch.Tensor], allowed_TE: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, E] selection bias for sigmoid scoring: the expert bias (or 0) inside the group, -inf outside."""
    base = torch.zeros(allowed_TE.shape, dtype=dtype, device=allowed_TE.device)
    if bias_E is not None:
        base = base + bias_E.to(device=allowed_TE.device, dtype=dtype)
    return base.masked_fill(~allowed_TE, float("-inf"))


def token_hash(token_T: torch.Tensor, layer_seed: int) -> torch.Tensor:
    """[T] int64 in [0, 2^16): a fixed multiplicative hash of (token id, layer seed)."""
    h = ((token_T.long() + 1) * _HASH_A + (layer_seed % 65521) * _HASH_B) % (1 << 32)
    return h >> 16


def random_group_routing(token_T: torch.Tensor, domain_T: torch.Tensor, table: GroupTable, k: int,
                         layer_seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """PanGu-Sigma random-routed experts: (idx [T, K] global expert ids, weight [T, K] = 1/K).

    Position j0 = hash(token, layer) mod g in the token's group (g members, config order), then the K
    consecutive positions mod g. Needs g >= K for every group (validated in the config).
    """
    row_T = table._row(domain_T)
    size_T = table.size_D.to(token_T.device)[row_T]                               # [T]
    j0_T = token_hash(token_T, layer_seed) % size_T                               # [T]
    pos_TK = (j0_T[:, None] + torch.arange(k, device=token_T.device)[None, :]) % size_T[:, None]   # [T, K]
    members_TE = table.member_DE.to(token_T.device)[row_T]                        # [T, E]
    idx_TK = members_TE.gather(1, pos_TK)                                         # [T, K]
    w_TK = torch.full(idx_TK.shape, 1.0 / k, dtype=torch.float32, device=token_T.device)
    return idx_TK, w_TK

