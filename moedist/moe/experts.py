"""Expert modules: grouped experts, LoRA on real experts, and MoE-LoRA adapters.

Every expert module computes `forward(x_NH, counts_L) -> y_NH` on rows sorted
by local expert (contiguous slices, no [E, C, H] padding). Each holds the
experts with global ids [first_expert, first_expert + L) and initialises
expert e from generators seeded by (seed, e), so an expert has the same
weights whatever the EP layout.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from moedist.choices import EXPERT_GRADS, LORA_TARGETS
from moedist.moe.ffn import (GATED, Counts, Path, check_activation, choose_path, gather_lora_proj, grouped_ffn,
                             grouped_ffn_tokens, grouped_mm, hidden_act, moe_lora_hidden)
from moedist.moe.init import is_meta, normal_
from moedist.moe.kernels.combine import gather_combine, weighted_scatter_add
from moedist.moe.kernels.slices import KeptGrads
from moedist.moe.lora import LoRA, kaiming_uniform_a5, lora_dropout, lora_scale
from moedist.moe.parts import DeviceCountExperts, Experts, FrozenBaseExperts, FusedLocalExperts
from moedist.moe.shared_lora import reset_shared_lora, shared_lora

# One tag for expert parameters, owned by moedist.distributed (which reduces them
# over the expert-data-parallel group only); re-exported here for the expert modules.
from moedist.distributed.grad_sync import EXPERT_ATTR, mark_expert_param as tag_expert_param  # noqa: E402


def _expert_normal(shape: Sequence[int], std: float, seed: int, expert: int, which: int) -> torch.Tensor:
    """Normal(0, std) draw for one expert's weight from its own CPU generator, fp32."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + expert * 101 + which)
    return torch.randn(tuple(shape), generator=g) * std


def _check_layout(num_experts: int, num_local: Optional[int], first_expert: int) -> int:
    L = num_experts if num_local is None else num_local
    if L < 1 or first_expert < 0 or first_expert + L > num_experts:
        raise ValueError(f"local experts [{first_expert}, {first_expert + L}) do not fit in num_experts={num_experts}")
    return L


class GroupedExperts(nn.Module, Experts, DeviceCountExperts, FusedLocalExperts):
    """L FFN experts stacked as w_gate/w_up [L, H, F] and w_down [L, F, H].

    Args:
        num_experts: E (global). hidden_size: H. ffn_size: F per expert.
        activation: "swiglu", "geglu" (gated) or "gelu", "relu", "silu".
        num_local: L (default E); first_expert: global id of local expert 0.
        init_std: weight std; seed: base seed; dtype/device: parameter placement.

    `kept_grads` (default None; set by `keep_expert_grads`): the fused kernel writes the weight
    gradients into the weights' existing `.grad` instead of allocating new [L, H, F] tensors
    (`kernels.slices.KeptGrads`; `grad_in_place` says whether it is set).

    `forward_tokens` (EP size 1, host counts) fuses the layer's gather and combine into the FFN
    (`ffn.grouped_ffn_tokens`): no [N, H] tensor is built or kept for backward.
    """

    kept_grads: Optional[KeptGrads] = None

    @property
    def grad_in_place(self) -> bool:
        return self.kept_grads is not None

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, activation: str = "swiglu",
                 num_local: Optional[int] = None, first_expert: int = 0, init_std: float = 0.02,
                 seed: int = 0, dtype=torch.float32, device=None):
        super().__init__()
        check_activation(activation)
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.num_local = _check_layout(num_experts, num_local, first_expert)
        self.first_expert, self.activation = first_expert, activation
        self.init_std, self.seed = init_std, seed
        L, H, F = self.num_local, hidden_size, ffn_size
        kw = dict(dtype=dtype, device=device)
        self.w_gate = tag_expert_param(nn.Parameter(torch.empty(L, H, F, **kw))) if activation in GATED else None
        self.w_up = tag_expert_param(nn.Parameter(torch.empty(L, H, F, **kw)))
        self.w_down = tag_expert_param(nn.Parameter(torch.empty(L, F, H, **kw)))
        if not is_meta(self.w_up):  # meta: drawn at materialization, after sharding (only local experts)
            self.reset_parameters()

    def global_ids(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_local)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for which, p in enumerate((self.w_gate, self.w_up, self.w_down)):
            if p is None:
                continue
            for l, e in enumerate(self.global_ids()):
                p[l].copy_(_expert_normal(p.shape[1:], self.init_std, self.seed, e, which))

    def init_weights(self) -> None:
        """Each local expert from its own generators seeded by (seed, global id): the same values at every
        EP layout, and a rank draws only the experts it holds."""
        self.reset_parameters()

    @torch.no_grad()
    def load_expert(self, local: int, w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down: torch.Tensor) -> None:
        """Copy one expert's weights ([H, F], [H, F], [F, H]) into local slot `local`."""
        if self.w_gate is not None:
            self.w_gate[local].copy_(w_gate)
        self.w_up[local].copy_(w_up)
        self.w_down[local].copy_(w_down)

    def takes_device_counts(self, x_NH: torch.Tensor) -> bool:
        """The grouped kernel runs these rows (bf16 on CPU, or a Hopper GPU): counts may stay on the device."""
        return choose_path("ffn", x_NH[:1].to(self.w_up.dtype), (self.w_up,)) is Path.GROUPED_MM  # one row: dtype, width

    def forward(self, x_NH: torch.Tensor, counts_L: Counts) -> torch.Tensor:
        x_NH = x_NH.to(self.w_up.dtype)
        return grouped_ffn(x_NH, self.w_gate, self.w_up, self.w_down, counts_L, self.activation,
                           self.kept_grads)  # [N, H]

    def _no_frozen_base(self, base_weight_T: Optional[torch.Tensor]) -> None:
        if base_weight_T is not None:
            raise ValueError(f"{type(self).__name__}.forward_tokens: these experts have no frozen base FFN "
                             "(base_weight_T)")

    def forward_tokens(self, x_TH: torch.Tensor, pair_token_N: torch.Tensor, weight_N: torch.Tensor,
                       counts_L: Sequence[int], base_weight_T: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Kept pairs sorted by expert (token ids, combine weights, host counts) -> [T, H] in at least
        float32: each token's weighted sum over its kept experts, gathered and combined inside the FFN."""
        self._no_frozen_base(base_weight_T)
        return grouped_ffn_tokens(x_TH.to(self.w_up.dtype), pair_token_N, weight_N, self.w_gate, self.w_up,
                                  self.w_down, counts_L, self.activation, self.kept_grads)  # [T, H]


def keeps_expert_grads(mode: str, device: torch.device) -> bool:
    """Whether a runner keeps the stacked expert gradients between steps (`train.expert_grads`):
    'kept' yes, 'fresh' no, 'auto' only on CPU (glibc serves each fresh [E, H, F] block with a new
    mmap that page-faults on every write; a GPU's caching allocator reuses it, so keeping them
    there would only raise peak memory by their size)."""
    if mode not in EXPERT_GRADS:
        raise ValueError(f"train.expert_grads={mode!r}: allowed {', '.join(EXPERT_GRADS)}")
    return mode == "kept" or (mode == "auto" and device.type == "cpu")


def keep_expert_grads(model: nn.Module) -> List[nn.Parameter]:
    """Switch every trainable `GroupedExperts` of `model` to in-place weight gradients and return
    those weights: between steps the caller keeps their `.grad` and calls `stale_expert_grads`
    instead of freeing or zeroing it (the first backward allocates it; the first of each later
    step overwrites it, the rest add, see `kernels.gated_ffn`). Only for a runner that reads `.grad`
    after backward: hooks on these weights no longer see their gradients."""
    kept: List[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            params = [w if w is not None and w.requires_grad else None for w in (m.w_gate, m.w_up, m.w_down)]
            ws = [w for w in params if w is not None]
            if ws:
                m.kept_grads = KeptGrads(params)
                kept += ws
    return kept


def stale_expert_grads(model: nn.Module) -> List[nn.Parameter]:
    """A step is over: the kept expert gradients (`keep_expert_grads`, not undone by
    `hook_expert_grads`) count as zero from now on (the next backward overwrites them; `.grad`
    still holds the last step's values until then). Returns those weights: the caller keeps
    their `.grad` and frees every other gradient."""
    kept: List[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, GroupedExperts) and m.kept_grads is not None:
            m.kept_grads.mark_stale()
            kept += [p for p in m.kept_grads.params if p is not None]
    return kept


def hook_expert_grads(model: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """Give `params` their gradients through autograd again (undoes `keep_expert_grads` for the
    experts holding them): call before registering a gradient hook on an expert weight."""
    ids = {id(p) for p in params}
    for m in model.modules():
        if isinstance(m, GroupedExperts) and any(id(w) in ids for w in (m.w_gate, m.w_up, m.w_down)):
            m.kept_grads = None


def _reset_expert_lora(st: LoRA, seed: int, first_expert: int, which: int) -> None:
    """A[l] of global expert first_expert + l from its own generator (seed, expert, projection); B = 0."""
    L, d_in, rank = st.lora_A.shape
    for l in range(L):
        g = torch.Generator().manual_seed(seed * 1_000_003 + (first_expert + l) * 101 + 50 + which)
        st.reset_(kaiming_uniform_a5((d_in, rank), d_in, g), expert=l)


class _LoRAMixin:
    """Shared LoRA bookkeeping: scale, dropout generator, adapter_params()."""

    def _init_lora(self, rank: int, alpha: Optional[float], dropout: float, targets: Iterable[str], seed: int):
        if rank < 1:
            raise ValueError(f"lora_rank={rank}: must be >= 1")
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not list(targets):
            raise ValueError(f"lora targets={list(targets)}: allowed a non-empty subset of {', '.join(LORA_TARGETS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout={dropout}: must be in [0, 1)")
        self.lora_rank, self.lora_alpha = rank, float(rank if alpha is None else alpha)
        self.scaling = lora_scale(rank, alpha)
        self.lora_dropout_rate = dropout
        self._drop_gen = torch.Generator().manual_seed(seed + 4099)
        self.targets = tuple(targets)

    def _lora_stacks(self, H: int, F: int, dtype, device) -> nn.ModuleDict:
        """One stacked, expert-tagged `LoRA` [L, ...] per targeted projection (gate only when the
        activation is gated), drawn unless on the meta device.

        Needs self.num_local, self.first_expert, self.seed and self.w_gate set."""
        dims = {"gate": (H, F), "up": (H, F), "down": (F, H)}
        stacks = nn.ModuleDict({t: LoRA(*dims[t], self.lora_rank, num_stacked=self.num_local, expert=True,
                                        dtype=dtype, device=device)
                                for t in LORA_TARGETS if t in self.targets and (t != "gate" or self.w_gate is not None)})
        if stacks and not is_meta(next(iter(stacks.values())).lora_A):  # meta: drawn at materialization
            self._reset_lora(stacks)
        return stacks

    def _reset_lora(self, stacks: nn.ModuleDict) -> None:
        """Each local expert's factors by global id; `which` is the projection's index in (gate, up, down),
        so a projection draws the same A whatever the other targets are."""
        for which, t in enumerate(LORA_TARGETS):
            if t in stacks:
                _reset_expert_lora(stacks[t], self.seed, self.first_expert, which)

    def named_generators(self) -> dict:
        """The private LoRA-dropout stream (`moedist.train.rng.OwnsGenerators`)."""
        return {"dropout": self._drop_gen}

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return lora_dropout(x, self.lora_dropout_rate, self.training, self._drop_gen)

    def adapter_params(self) -> list:
        """The parameters that train in LoRA fine-tuning: every `LoRA` primitive's lora_A / lora_B."""
        return [p for m in self.modules() if isinstance(m, LoRA) for p in m.adapter_params()]


class LoRAOnExperts(_LoRAMixin, GroupedExperts):
    """Real experts (frozen) with a LoRA adapter per expert on gate/up/down.

    Output per expert e: down_e'(phi(gate_e'(x)) * up_e'(x)) where
    W' x = x @ W + (alpha / r) * dropout(x) @ A[e] @ B[e]. B starts at zero, so
    at initialisation it equals the frozen experts.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, lora_rank: int, lora_alpha: Optional[float] = None,
                 lora_dropout: float = 0.0, targets: Iterable[str] = LORA_TARGETS, freeze_base: bool = True, **kw):
        super().__init__(num_experts, hidden_size, ffn_size, **kw)
        self._init_lora(lora_rank, lora_alpha, lora_dropout, targets, self.seed)
        self.lora = self._lora_stacks(hidden_size, ffn_size, self.w_up.dtype, self.w_up.device)
        if freeze_base:
            for p in (self.w_gate, self.w_up, self.w_down):
                if p is not None:
                    p.requires_grad_(False)

    def init_weights(self) -> None:
        """The frozen experts, then each local expert's LoRA factors (by global id)."""
        self.reset_parameters()
        self._reset_lora(self.lora)

    def takes_device_counts(self, x_NH: torch.Tensor) -> bool:
        """Host counts: the adapters' low-rank products are not checked for the grouped kernel here."""
        return False

    def forward_tokens(self, x_TH: torch.Tensor, pair_token_N: torch.Tensor, weight_N: torch.Tensor,
                       counts_L: Sequence[int], base_weight_T: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Not fused with the adapters: the layer's own gather, `forward` and combine, unchanged. [T, H]."""
        self._no_frozen_base(base_weight_T)
        return gather_combine(lambda x_NH: self(x_NH, counts_L), x_TH, pair_token_N, weight_N)  # [T, H]

    def _proj(self, name: str, x_NI: torch.Tensor, w: torch.Tensor, counts_L) -> torch.Tensor:
        y = grouped_mm(x_NI, w, counts_L)
        if name in self.lora:
            x_d = self._drop(x_NI)
            y = y + self.scaling * self.lora[name].delta(x_d, counts_L).to(x_d.dtype)
        return y

    def forward(self, x_NH: torch.Tensor, counts_L: Sequence[int]) -> torch.Tensor:
        x_NH = x_NH.to(self.w_up.dtype)
        gate = self._proj("gate", x_NH, self.w_gate, counts_L) if self.w_gate is not None else None  # [N, F]
        h = hidden_act(gate, self._proj("up", x_NH, self.w_up, counts_L), self.activation)  # [N, F]
        return self._proj("down", h, self.w_down, counts_L)  # [N, H]


class MoELoRAExperts(_LoRAMixin, nn.Module, Experts, FusedLocalExperts, FrozenBaseExperts):
    """MoE-LoRA / MixLoRA experts: one frozen FFN shared by all experts; expert e is
    a LoRA adapter (per projection) on it.

    Frozen weights w_gate/w_up [H, F], w_down [F, H] are replicated (not expert
    parameters); lora_A/lora_B per expert are expert-sharded. Expert e computes
    FFN_e(x) = down_e(phi(gate_e(x)) * up_e(x)) with W_e x = x @ W + s * x @ A_e @ B_e.
    `forward_tokens` (EP size 1) runs the frozen gate/up once per token and the
    frozen down once per token on the weight-combined hidden (down is linear),
    so the frozen FFN costs what it costs in the dense model.

    shared_rank > 0 adds a shared LoRA expert (`moedist.moe.shared_lora`): S = s_S * A_S B_S
    per targeted projection (s_S = alpha / shared_rank), replicated and untagged (averaged over
    the whole world, saved once as `lora_shared.<proj>.lora_A/B`). Every projection of the frozen
    FFN becomes W + S, so expert e is W + S + D_e and the frozen-FFN path (`base_forward`, the
    layer's weight for dropped pairs) is W + S. S's dropout mask is drawn on the rows it sees:
    per token on the once-per-token path (`forward_tokens`), per routed row otherwise.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, lora_rank: int, lora_alpha: Optional[float] = None,
                 lora_dropout: float = 0.0, targets: Iterable[str] = LORA_TARGETS, activation: str = "swiglu",
                 num_local: Optional[int] = None, first_expert: int = 0, init_std: float = 0.02, seed: int = 0,
                 dtype=torch.float32, device=None, base_seed: Optional[int] = None, shared_rank: int = 0):
        super().__init__()
        check_activation(activation)
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.num_local = _check_layout(num_experts, num_local, first_expert)
        self.first_expert, self.activation, self.seed, self.init_std = first_expert, activation, seed, init_std
        # base_seed: draw the frozen base as the dense FFN of that seed would (build_model's moe_lora layers)
        self.base_seed = seed if base_seed is None else base_seed
        self._init_lora(lora_rank, lora_alpha, lora_dropout, targets, seed)
        H, F = hidden_size, ffn_size
        kw = dict(dtype=dtype, device=device)
        self.w_gate = nn.Parameter(torch.empty(H, F, **kw), requires_grad=False) if activation in GATED else None
        self.w_up = nn.Parameter(torch.empty(H, F, **kw), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(F, H, **kw), requires_grad=False)
        self.lora = self._lora_stacks(H, F, dtype, self.w_up.device)
        # the shared LoRA expert (empty for shared_rank 0: no parameter, no state-dict key)
        self.shared_rank = shared_rank
        self.shared_scaling = lora_scale(shared_rank, lora_alpha) if shared_rank > 0 else 0.0
        dims = {"gate": (H, F), "up": (H, F), "down": (F, H)} if self.w_gate is not None else {"up": (H, F), "down": (F, H)}
        self.lora_shared = shared_lora(dims, self.targets, shared_rank, seed, dtype, self.w_up.device)
        if not is_meta(self.w_up):  # meta: drawn at materialization
            self._init_base()

    def _init_base(self) -> None:
        g = torch.Generator().manual_seed(self.base_seed)
        for w in (self.w_gate, self.w_up, self.w_down):
            normal_(w, g, self.init_std)

    def init_weights(self) -> None:
        """The frozen base (gate, up, down from `base_seed`), then each local expert's LoRA factors
        and the shared LoRA expert's."""
        self._init_base()
        self._reset_lora(self.lora)
        reset_shared_lora(self.lora_shared, self.seed)

    @torch.no_grad()
    def load_base(self, w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down: torch.Tensor) -> None:
        """Copy a dense FFN's weights ([H, F], [H, F], [F, H]) into the frozen base."""
        if self.w_gate is not None:
            self.w_gate.copy_(w_gate)
        self.w_up.copy_(w_up)
        self.w_down.copy_(w_down)

    @torch.no_grad()
    def base_weights(self) -> dict:
        """{"gate", "up", "down"}: the weights of the FFN every token takes, W + S (math orientation;
        gate None when not gated; dtype promoted to the adapter's). Routed expert e adds its adapter D_e."""
        ws = {"gate": self.w_gate, "up": self.w_up, "down": self.w_down}
        for t, sh in self.lora_shared.items():
            ws[t] = ws[t] + self.shared_scaling * sh.merged()
        return ws

    def _base_proj(self, name: str, x_NI: torch.Tensor, w_IO: torch.Tensor) -> torch.Tensor:
        """x @ W plus the shared LoRA expert's s_S * drop(x) @ A_S @ B_S on that projection. [N, O]."""
        y = x_NI @ w_IO
        if name in self.lora_shared:
            x_d = self._drop(x_NI)
            y = y + self.shared_scaling * self.lora_shared[name].delta(x_d).to(x_d.dtype)
        return y

    def _delta(self, name: str, x_NI: torch.Tensor, counts_L) -> Optional[torch.Tensor]:
        if name not in self.lora:
            return None
        x_d = self._drop(x_NI)
        return self.scaling * self.lora[name].delta(x_d, counts_L).to(x_d.dtype)

    def _hidden(self, gate_base: Optional[torch.Tensor], up_base: torch.Tensor, x_NH: torch.Tensor, counts_L) -> torch.Tensor:
        """phi(gate_base + dgate) * (up_base + dup) per routed row. [N, F]."""
        dg, du = self._delta("gate", x_NH, counts_L), self._delta("up", x_NH, counts_L)
        gate = None if gate_base is None else (gate_base if dg is None else gate_base + dg)
        up = up_base if du is None else up_base + du
        return hidden_act(gate, up, self.activation)

    def base_forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """The frozen FFN (W + S: no routed adapter) on every token. [T, H] -> [T, H]."""
        x_TH = x_TH.to(self.w_up.dtype)
        gate = self._base_proj("gate", x_TH, self.w_gate) if self.w_gate is not None else None  # [T, F]
        return self._base_proj("down", hidden_act(gate, self._base_proj("up", x_TH, self.w_up), self.activation),
                               self.w_down)  # [T, H]

    def forward(self, x_NH: torch.Tensor, counts_L: Sequence[int]) -> torch.Tensor:
        x_NH = x_NH.to(self.w_up.dtype)
        gate_base = self._base_proj("gate", x_NH, self.w_gate) if self.w_gate is not None else None  # [N, F]
        h_NF = self._hidden(gate_base, self._base_proj("up", x_NH, self.w_up), x_NH, counts_L)  # [N, F]
        y_NH = self._base_proj("down", h_NF, self.w_down)  # [N, H]
        dd = self._delta("down", h_NF, counts_L)
        return y_NH if dd is None else y_NH + dd

    def _fused_ok(self, x_NH: torch.Tensor) -> bool:
        """The per-expert fused kernel (ffn.moe_lora_hidden) applies: a gated FFN, no active
        dropout, and `choose_path("lora_hidden", ...)` says FUSED (see its table)."""
        if self.w_gate is None or (self.lora_dropout_rate != 0.0 and self.training):
            return False
        params = [st.lora_A for st in self.lora.values()] + [st.lora_B for st in self.lora.values()]
        return choose_path("lora_hidden", x_NH, params + [self.w_gate, self.w_up], None, self.activation) is Path.FUSED

    def forward_tokens(self, x_TH: torch.Tensor, pair_token_N: torch.Tensor, weight_N: torch.Tensor,
                       counts_L: Sequence[int], base_weight_T: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fused local path: routed pairs sorted by expert (token ids `pair_token_N`,
        combine weights `weight_N`). Frozen gate/up/down run once per token.

        Returns the weighted sum over each token's kept experts, [T, H], plus
        base_weight_T [T] (when given) times the frozen FFN alone.
        """
        x_TH = x_TH.to(self.w_up.dtype)
        tok = pair_token_N
        gate_T = self._base_proj("gate", x_TH, self.w_gate) if self.w_gate is not None else None  # [T, F] once per token
        up_T = self._base_proj("up", x_TH, self.w_up)  # [T, F] once per token (W + S)
        x_NH = x_TH.index_select(0, tok)  # [N, H]
        if self._fused_ok(x_NH):
            lora = {k: (st.lora_A, st.lora_B) for k, st in self.lora.items()}
            w_N = weight_N.to(x_NH.dtype)
            h_TF, z_Nr = moe_lora_hidden(gate_T, up_T, x_NH, tok, w_N, lora, counts_L, self.scaling, self.activation)
            h_TF = self._add_base(h_TF, gate_T, up_T, base_weight_T)
            y_TH = self._base_proj("down", h_TF, self.w_down)  # [T, H] frozen down (+ S) once per token
            if z_Nr is not None:  # down adapter: weight and scale applied at rank r
                y_TH = y_TH.index_add(0, tok, grouped_mm(z_Nr, self.lora["down"].lora_B, counts_L))
            return y_TH

        def routed(name: str, base_TF: torch.Tensor) -> torch.Tensor:  # [N, F] base rows + this pair's LoRA
            if name not in self.lora:
                return base_TF.index_select(0, tok)
            st = self.lora[name]
            return gather_lora_proj(base_TF, self._drop(x_NH), tok, st.lora_A, st.lora_B, counts_L, self.scaling)

        gate_N = routed("gate", gate_T) if gate_T is not None else None
        h_NF = hidden_act(gate_N, routed("up", up_T), self.activation)  # [N, F]
        w_N = weight_N.to(h_NF.dtype)  # [N]
        T = x_TH.shape[0]
        h_TF = weighted_scatter_add(h_NF, w_N, tok, T).to(h_NF.dtype)  # [T, F] combined hidden
        h_TF = self._add_base(h_TF, gate_T, up_T, base_weight_T)
        y_TH = self._base_proj("down", h_TF, self.w_down)  # [T, H] frozen down (+ S, linear) once per token
        if "down" in self.lora:
            st = self.lora["down"]
            h_lora = self._drop(h_NF).to(st.lora_A.dtype)  # adapter in its own dtype (fp32 under model.dtype=bf16)
            z_Nr = grouped_mm(h_lora, st.lora_A, counts_L) * (w_N.to(h_lora.dtype) * self.scaling).unsqueeze(1)  # [N, r]
            y_TH = y_TH.index_add(0, tok, grouped_mm(z_Nr, st.lora_B, counts_L).to(y_TH.dtype))  # weight at rank r, not H
        return y_TH

    def _add_base(self, h_TF: torch.Tensor, gate_T: Optional[torch.Tensor], up_T: torch.Tensor,
                  base_weight_T: Optional[torch.Tensor]) -> torch.Tensor:
        """h + b[t] * phi(gate) * up: the frozen FFN's hidden at weight b (down is linear, applied after)."""
        if base_weight_T is None:
            return h_TF
        return h_TF + base_weight_T.to(h_TF.dtype).unsqueeze(1) * hidden_act(gate_T, up_T, self.activation)
