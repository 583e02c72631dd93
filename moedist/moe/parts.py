"""The declared parts of an `MoELayer`: what an experts module and a dispatcher promise.

A part says what it is by deriving from these protocols (`class GroupedExperts(nn.Module,
Experts, DeviceCountExperts)`, as torchtune's LoRA modules derive from `AdapterModule`); the
layer, `parallelize()` and the checkpoint keys ask `isinstance(part, Protocol)`, never
`hasattr`. Methods are abstract, so a class that declares a protocol and forgets a method
cannot be built. Data members (the expert layout) are checked once, by `check_part`, in
`moedist.models.parallelize.parallelize`.

Required:
    `Experts`      num_experts, num_local, first_expert, forward(x_NH, counts_L) -> y_NH
    `Dispatcher`   the layout, dispatch, combine, permute_local and its own last_stats
Optional capabilities of experts (the layer takes a faster or extra path when declared):
    `FusedLocalExperts`   forward_tokens: a fused path over all tokens at EP size 1
    `FrozenBaseExperts`   base_forward: one frozen FFN under all experts (MoE-LoRA)
    `DeviceCountExperts`  takes_device_counts: per-expert counts may stay on the device

Shapes: T tokens, N routed (token, slot) pairs, L local experts, E experts, K top-k, H hidden.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from moedist.moe.ffn import Counts  # [L] rows per local expert: host ints, or a device tensor

if TYPE_CHECKING:
    from moedist.moe.dispatcher import LocalPermutation


@runtime_checkable
class Experts(Protocol):
    """L local experts of E, computing on rows sorted by local expert.

    Contract:
        num_experts: E, the global number of experts.
        num_local: L, experts held here; first_expert: the global id of local expert 0, so this
            module holds [first_expert, first_expert + L). `parallelize` sets both when it shards.
        forward(x_NH, counts_L) -> y_NH: rows x_NH [N, H] sorted by local expert, counts_L[l]
            rows for local expert l (zero allowed); returns [N, H] in the same row order.
        Per-expert parameters have a leading dim L and are tagged `mark_expert_param`.
    """

    num_experts: int
    num_local: int
    first_expert: int

    def forward(self, x_NH: torch.Tensor, counts_L: Counts) -> torch.Tensor:
        """[N, H] rows sorted by local expert -> [N, H]."""
        ...


@runtime_checkable
class FusedLocalExperts(Protocol):
    """Capability: a fused path at EP size 1 that sees every token once (MoE-LoRA runs its frozen
    FFN once per token there). The layer takes it instead of dispatch / forward / combine."""

    @abstractmethod
    def forward_tokens(self, x_TH: torch.Tensor, pair_token_N: torch.Tensor, weight_N: torch.Tensor,
                       counts_L: Sequence[int], base_weight_T: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Kept pairs sorted by expert (token ids `pair_token_N` [N], combine weights `weight_N` [N],
        `counts_L` host ints) -> [T, H]: each token's weighted sum over its kept experts, plus
        base_weight_T [T] (when given) times the frozen FFN (`FrozenBaseExperts`)."""
        ...


@runtime_checkable
class FrozenBaseExperts(Protocol):
    """Capability: experts that are adapters on ONE frozen FFN (MoE-LoRA). The layer applies that
    FFN to every token, also to the pairs capacity dropped (`MoELayer`), so it must run alone."""

    @abstractmethod
    def base_forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """The frozen FFN on every token, [T, H] -> [T, H]."""
        ...


@runtime_checkable
class DeviceCountExperts(Protocol):
    """Capability: experts that can take their per-expert counts as an [L] device tensor (no host
    sync): `forward(x_NH, counts_L)` then gets T*K rows, the padding rows last (`MoELayer` masks them)."""

    @abstractmethod
    def takes_device_counts(self, x_NH: torch.Tensor) -> bool:
        """True when forward(x_NH, counts) accepts counts as a device tensor for these rows."""
        ...


@runtime_checkable
class Dispatcher(Protocol):
    """Moves routed rows to the ranks holding their experts and back; owns its statistics.

    Contract:
        num_experts: E; ep_size: P ranks; num_local_experts: L = E / P; first_expert: this rank's
            first global expert id.
        dispatch(x_TH, idx_TK, keep_TK, host_counts) -> (x_NH, counts_L, state): the kept pairs'
            rows for this rank's experts, sorted by local expert.
        combine(y_NH, state, weight_TK) -> y_TH: rows home, summed per token with the weights.
        permute_local(idx_TK, keep_TK) -> LocalPermutation: EP size 1 only, the kept pairs sorted
            by expert without moving rows (for `FusedLocalExperts`).
        last_stats: read-only, the last dispatch's all-to-all rows and bytes (`a2a_rows`,
            `a2a_bytes`, `a2a_bytes_remote`); only the dispatcher writes it.
    """

    num_experts: int
    num_local_experts: int
    first_expert: int
    ep_size: int

    @property
    @abstractmethod
    def last_stats(self) -> Mapping[str, int]:
        """All-to-all rows and bytes of the last dispatch (zeros at EP size 1)."""
        ...

    @abstractmethod
    def dispatch(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, keep_TK: torch.Tensor,
                 host_counts: bool = True) -> Tuple[torch.Tensor, Counts, Any]:
        """Send each kept pair's row to its expert's rank: (x_NH, counts_L, state for combine)."""
        ...

    @abstractmethod
    def combine(self, y_NH: torch.Tensor, state: Any, weight_TK: torch.Tensor) -> torch.Tensor:
        """Bring expert outputs home and sum them per token, weighted. Returns [T, H]."""
        ...

    @abstractmethod
    def permute_local(self, idx_TK: torch.Tensor, keep_TK: torch.Tensor) -> "LocalPermutation":
        """EP size 1: the kept pairs sorted by expert (host counts), rows not moved."""
        ...


def has_capability(part: object, capability: type) -> bool:
    """Whether `part`'s class has `capability` (a method-only protocol above): declared, or the
    methods present. Asked of the class, so the answer is cached after the first call (ABC cache)
    and costs what a dict look-up costs in every forward."""
    return issubclass(type(part), capability)


# The members `check_part` requires, per protocol (data members included: isinstance alone
# cannot say which one is missing).
REQUIRED_MEMBERS = {
    Experts: ("num_experts", "num_local", "first_expert", "forward"),
    Dispatcher: ("num_experts", "num_local_experts", "first_expert", "ep_size", "last_stats", "dispatch",
                 "combine", "permute_local"),
}
_INT_MEMBERS = ("num_experts", "num_local", "first_expert", "num_local_experts", "ep_size")


def missing_members(part: object, protocol: type) -> List[str]:
    """The members of `protocol` that `part` lacks (read from dir(): nothing is called)."""
    have = set(dir(part))
    return [m for m in REQUIRED_MEMBERS[protocol] if m not in have]


def check_part(part: object, protocol: type, where: str) -> None:
    """Raise one TypeError naming `where`, the part's class and what it lacks, unless `part`
    has every member of `protocol` (integers for the layout members).

    Args:
        part: the experts module or dispatcher. protocol: `Experts` or `Dispatcher`.
        where: the part's place, e.g. "layers.1.mlp.experts".
    """
    name = type(part).__name__
    missing = missing_members(part, protocol)
    if missing:
        raise TypeError(f"{where}: {name} is not a moedist.moe.parts.{protocol.__name__}: missing "
                        f"{', '.join(missing)}")
    for m in REQUIRED_MEMBERS[protocol]:
        v = getattr(part, m)
        if m in _INT_MEMBERS and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{where}: {name}.{m}={v!r}: must be an int")
