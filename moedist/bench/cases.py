"""The (impl, mode) cases of `moedist bench layer`: each builds one implementation on the
shared inputs and weights and exposes forward / backward / clear (see layer.py).

Every case is built for one expert-FFN implementation (`ffn`: plain | recompute,
see ffns.py) and every impl of a run gets the same one:
    moedist       plain: per-expert plain autograd FFN (`_BenchExperts`); recompute: moedist's own
                  grouped FFN kernel (`moe.kernels.gated_ffn`, token mode: gather and combine fused;
                  keeps gate/up, recomputes h); both keep the expert gradients between steps as
                  moedist's runner does
    deepspeed, fairscale, floor, dense, dense-lora   their FFN built by `ffns.ffn_forward(..., ffn)`
    moedist-lora  fused: recompute = its fused kernel (`MoELoRAHidden`), plain = the same
                  once-per-token path with plain autograd hidden rows; naive: plain only
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from moedist.bench import peers
from moedist.bench.ffns import ffn_forward
from moedist.moe import GroupedExperts, MoELayer, MoELoRAExperts, Router
from moedist.moe.capacity import compute_capacity, select_tokens
from moedist.moe.experts import keep_expert_grads, keeps_expert_grads, stale_expert_grads
from moedist.moe.dispatcher import permute_pairs
from moedist.moe.ffn import GATED, GATED_GRAD
from moedist.moe.kernels.combine import gather_combine
from moedist.moe.kernels.gated_ffn import GroupedGatedFFN, GroupedGatedFFNTokens
from moedist.moe.kernels.slices import ExpertSlice
from moedist.moe.parts import Experts, FusedLocalExperts

if TYPE_CHECKING:
    from moedist.bench.layer import LayerBenchConfig


@dataclass
class Case:
    """One (impl, mode) ready to run: forward() -> output, backward(output), clear()."""

    impl: str
    mode: str
    forward: Callable[[], object]
    backward: Callable[[object], None]
    clear: Callable[[], None]
    a2a_bytes: Callable[[], int]
    rows_executed: Callable[[], int]
    capacity: Callable[[], Optional[int]] = lambda: None
    notes: dict = field(default_factory=dict)
    ffn: str = "plain"
    """the expert-FFN implementation this case runs (plain | recompute)."""
    resident_bytes: Callable[[], int] = lambda: 0
    """bytes the case keeps between steps that a step's own allocations do not show (moedist's kept
    expert gradients): added to its measured memory."""

    @property
    def name(self) -> str:
        return f"{self.impl}/{self.mode}/{self.ffn}"


class _BenchExperts(nn.Module, Experts, FusedLocalExperts):
    """moedist's GroupedExperts (same parameters) with the bench's chosen expert FFN.

    plain: each expert's slice through `ffns.ffn_forward(..., "plain")` (weights unbound once);
    recompute: moedist's `GroupedGatedFFN` for gated activations in any dtype (so also in bf16,
    where GroupedExperts itself would take `torch._grouped_mm`, which keeps its activations),
    else GroupedExperts as is. `path` says which one runs (the JSON's `expert_ffn`).
    `forward_tokens` (the layer's path at EP size 1) is what `GroupedExperts.forward_tokens` runs:
    recompute fuses the gather and the combine into the FFN (`GroupedGatedFFNTokens`); plain
    gathers, runs `forward` and combines.
    """

    def __init__(self, inner: GroupedExperts, ffn: str):
        super().__init__()
        self.inner, self.ffn = inner, ffn
        self.num_experts, self.num_local, self.first_expert = inner.num_experts, inner.num_local, inner.first_expert

    def path(self, x: torch.Tensor) -> str:
        e = self.inner
        if self.ffn == "plain":
            return "per-expert plain autograd (bench ffns.py)"
        if self._recompute_ok():  # the layer bench runs at EP size 1: the token kernel
            return "moedist GroupedGatedFFNTokens (recompute, gather and combine fused)"
        return "moedist GroupedExperts as is (not gated: no recompute kernel)"

    def _recompute_ok(self) -> bool:
        e = self.inner
        return e.activation in GATED and e.w_gate.dtype == e.w_up.dtype == e.w_down.dtype

    def _kernel_runs(self, rows: int, counts) -> bool:
        """The recompute kernel (row or token mode) takes these rows: recompute FFN, gated, rows, > 1 expert."""
        return self.ffn == "recompute" and self._recompute_ok() and rows > 0 and len(counts) > 1

    def forward_tokens(self, x_TH: torch.Tensor, pair_token_N: torch.Tensor, weight_N: torch.Tensor, counts_L,
                       base_weight_T: Optional[torch.Tensor] = None) -> torch.Tensor:
        e = self.inner
        x_TH = x_TH.to(e.w_up.dtype)
        counts = tuple(int(c) for c in counts_L)
        if self._kernel_runs(pair_token_N.shape[0], counts):
            return GroupedGatedFFNTokens.apply(x_TH, pair_token_N, weight_N, e.w_gate, e.w_up, e.w_down, counts,
                                               GATED[e.activation], GATED_GRAD[e.activation], e.kept_grads)
        return gather_combine(lambda x_NH: self(x_NH, counts), x_TH, pair_token_N, weight_N)  # [T, H]

    def forward(self, x_NH: torch.Tensor, counts_L) -> torch.Tensor:
        e = self.inner
        x_NH = x_NH.to(e.w_up.dtype)
        counts = [int(c) for c in counts_L]
        if self._kernel_runs(x_NH.shape[0], counts):
            return GroupedGatedFFN.apply(x_NH, e.w_gate, e.w_up, e.w_down, tuple(counts), GATED[e.activation],
                                         GATED_GRAD[e.activation], e.kept_grads)  # as GroupedExperts.forward
        if self.ffn == "recompute":
            return e(x_NH, counts)
        ws = (e.w_gate, e.w_up, e.w_down)
        if e.grad_in_place:  # each expert's slices made just before its FFN (see ExpertSlice)
            fresh = self._fresh_slots(counts)
            expert = lambda l: [None if w is None else ExpertSlice.apply(w, l, w, fresh.get(id(w)))  # noqa: E731
                                for w in ws]
        else:  # autograd stacks the L slice gradients into new [L, I, O] tensors
            per = [[None] * len(counts) if w is None else w.unbind(0) for w in ws]
            expert = lambda l: [p[l] for p in per]  # noqa: E731
        outs = [ffn_forward(xs, *expert(l), e.activation, "plain")
                for l, xs in enumerate(x_NH.split(counts)) if counts[l] > 0]
        return torch.cat(outs) if outs else x_NH.new_zeros(x_NH.shape) + 0.0 * e.w_up.sum()


    def _fresh_slots(self, counts: List[int]) -> Dict[int, set]:
        """Stale kept gradients (`KeptGrads`): the slots of experts without rows zeroed now, the rest
        left to their slice's backward to overwrite (per weight: id -> set of slots); else none."""
        kept = self.inner.kept_grads
        if not torch.is_grad_enabled():
            return {}
        if not kept.stale or any(p is not None and p.grad is None for p in kept.params):
            kept.zero_if_stale()
            return {}
        kept.take_stale()
        used = {l for l, c in enumerate(counts) if c > 0}
        unused = [l for l in range(len(counts)) if l not in used]
        params = [p for p in kept.params if p is not None]
        with torch.no_grad():
            for p in params:
                p.grad[unused] = 0.0
        return {id(p): set(used) for p in params}


class _UnfusedMoELoRAExperts(MoELoRAExperts):
    """MoELoRAExperts whose once-per-token path never takes the fused recompute kernel (the plain form)."""

    def _fused_ok(self, x_NH: torch.Tensor) -> bool:
        return False



def _params_clear(*mods) -> Callable[[], None]:
    params = [p for m in mods for p in m.parameters()]

    def clear():
        for p in params:
            p.grad = None

    return clear


def _tensor_backward(grad: torch.Tensor) -> Callable[[object], None]:
    def backward(out):
        out.backward(grad)

    return backward


def _moedist_case(mode, router_w, experts, x, grad, cfg, elem, ffn) -> Case:
    E, K = cfg.experts, cfg.topk
    router = Router(cfg.hidden, E, K, renormalize=K > 1).to(x.device)  # fp32 router whatever the dtype
    with torch.no_grad():
        router.weight.copy_(router_w)
    cf = cfg.capacity_factor if mode == "capacity" else None
    bench_experts = _BenchExperts(experts, ffn)
    layer = MoELayer(router, bench_experts, capacity_factor=cf, min_capacity=cfg.min_capacity, stats=cfg.stats)
    # as moedist's PyTorch runner trains (train.expert_grads): kept = expert gradients marked stale (inside
    # the timed step) and reused, with either FFN (plain: per-expert slices whose gradients go in place,
    # `ExpertSlice`); fresh = allocated by each backward and freed by clear, as for every other impl
    grads = "kept" if keeps_expert_grads(cfg.expert_grads, x.device) else "fresh"
    kept = keep_expert_grads(layer) if grads == "kept" else []
    kept_ids = {id(p) for p in kept}
    last = {}

    def forward():
        stale_expert_grads(layer)  # the runner's zero_grad, inside the timed step
        y, aux = layer(x)
        last["aux"] = aux
        return y

    def clear():
        x.grad = None
        for p in layer.parameters():
            if id(p) not in kept_ids:
                p.grad = None

    rows = lambda: int(last["aux"].tokens_per_expert.sum())  # noqa: E731
    return Case("moedist", mode, forward, _tensor_backward(grad), clear,
                a2a_bytes=lambda: rows() * cfg.hidden * elem, rows_executed=rows,
                capacity=lambda: last["aux"].capacity,
                notes=dict(layer=layer, expert_ffn=bench_experts.path(x), expert_grads=grads),
                ffn=ffn, resident_bytes=lambda: sum(p.grad.numel() * p.grad.element_size() for p in kept
                                                    if p.grad is not None))


def _deepspeed_case(mode, router_w, experts, x, grad, cfg, elem, dtype, ffn) -> Case:
    m = peers.DeepSpeedMoE(router_w, experts, cfg.topk, cfg.capacity_factor, drop_tokens=(mode == "capacity"),
                           min_capacity=cfg.min_capacity, ffn_impl=ffn).to(x.device)
    m.moe.deepspeed_moe.experts.to(dtype)
    m.moe.deepspeed_moe.gate.float()  # its gate computes in fp32 (it casts the input itself)

    def clear():
        x.grad = None
        for p in m.parameters():
            p.grad = None

    return Case("deepspeed", mode, lambda: m(x), _tensor_backward(grad), clear,
                a2a_bytes=lambda: m.a2a_bytes(elem), rows_executed=lambda: cfg.experts * m.capacity,
                capacity=lambda: m.capacity, notes=dict(module=m, expert_ffn=f"per-expert {ffn} (bench ffns.py)"),
                ffn=ffn)


def _fairscale_case(router_w, experts, x, grad, cfg, elem, dtype, ffn) -> Case:
    m = peers.FairscaleMoE(router_w, experts, ffn_impl=ffn).to(x.device)
    m.layer.experts.to(dtype)
    m.layer.gate.to(dtype)  # Top2Gate has no fp32 path: its Linear must match the input's dtype

    def clear():
        x.grad = None
        for p in m.parameters():
            p.grad = None

    T = cfg.tokens
    return Case("fairscale", "capacity", lambda: m(x), _tensor_backward(grad), clear,
                a2a_bytes=lambda: m.a2a_bytes(T, elem), rows_executed=lambda: cfg.experts * m.capacity(T),
                capacity=lambda: m.capacity(T),
                notes=dict(capacity_factor=1.0, routing="Top2Gate: 2nd expert sampled with Gumbel noise",
                           expert_ffn=f"per-expert {ffn} (bench ffns.py)"), ffn=ffn)


def _dense_case(x, grad, cfg, dtype, ffn) -> Case:
    m = peers.DenseFFN(cfg.hidden, cfg.topk * cfg.ffn, cfg.activation, seed=cfg.seed + 3, dtype=dtype, device=x.device,
                       ffn_impl=ffn)

    def clear():
        x.grad = None
        _params_clear(m)()

    return Case("dense", "-", lambda: m(x), _tensor_backward(grad), clear, a2a_bytes=lambda: 0,
                rows_executed=lambda: cfg.tokens * cfg.topk, notes=dict(ffn_size=cfg.topk * cfg.ffn), ffn=ffn)


def _floor_case(mode, router_w, experts, x, grad, cfg, ffn) -> Case:
    E, K = cfg.experts, cfg.topk
    r = Router(cfg.hidden, E, K, renormalize=K > 1).to(x.device)
    with torch.no_grad():
        r.weight.copy_(router_w)
        out = r(x)
        cap = compute_capacity(cfg.tokens, E, K, cfg.capacity_factor if mode == "capacity" else None, cfg.min_capacity)
        keep = select_tokens(out.idx_TK, out.weight_TK, E, cap).keep_TK
        perm = permute_pairs(out.idx_TK, keep, E)
        x_sorted = x.index_select(0, perm.token_N)
        g_sorted = grad.index_select(0, perm.token_N)
    counts = perm.counts_E.tolist()
    m = peers.FloorExperts(experts, counts, x_sorted, ffn_impl=ffn)
    grads = [gs for gs, c in zip(g_sorted.split(counts), counts) if c > 0]

    def backward(outs):
        torch.autograd.backward(outs, grads)

    def clear():
        m.clear_input_grads()
        _params_clear(m)()

    n = sum(counts)
    return Case("floor", mode, m, backward, clear, a2a_bytes=lambda: 0, rows_executed=lambda: n, ffn=ffn)


class _PerPairExperts(nn.Module, Experts):
    """MoELoRAExperts without the `FusedLocalExperts` capability (nor `FrozenBaseExperts`), so
    MoELayer takes the per-pair path (the naive form)."""

    def __init__(self, inner: MoELoRAExperts):
        super().__init__()
        self.inner = inner
        self.num_experts, self.num_local, self.first_expert = inner.num_experts, inner.num_local, inner.first_expert

    def forward(self, x_NH, counts_L):
        return self.inner(x_NH, counts_L)


def _lora_cases(router_w, x, grad, cfg, elem, dtype, ffn, skipped: Dict[str, str]) -> List[Case]:
    E, K, H, F, r = cfg.experts, cfg.topk, cfg.hidden, cfg.ffn, cfg.lora_rank
    base = peers.DenseFFN(H, F, cfg.activation, seed=cfg.seed + 5, dtype=dtype, device=x.device)
    ref = peers.DenseLoRA(base.w_gate, base.w_up, base.w_down, r, cfg.activation, seed=cfg.seed + 6, ffn_impl=ffn)
    cases = []
    forms = ("fused", "naive") if ffn == "plain" else ("fused",)
    if ffn != "plain":
        skipped[f"moedist-lora/naive/{ffn}"] = ("the per-pair (naive) LoRA path has plain autograd only; "
                                                "its plain row is the naive reference")
    for form in forms:
        cls = MoELoRAExperts if ffn == "recompute" else _UnfusedMoELoRAExperts
        lora_experts = cls(E, H, F, r, activation=cfg.activation, seed=cfg.seed + 7, dtype=dtype, device=x.device)
        lora_experts.load_base(base.w_gate, base.w_up, base.w_down)
        router = Router(H, E, K, renormalize=K > 1).to(x.device)
        with torch.no_grad():
            router.weight.copy_(router_w)
        experts = lora_experts if form == "fused" else _PerPairExperts(lora_experts)
        layer = MoELayer(router, experts, capacity_factor=None, stats=cfg.stats)
        last = {}

        def forward(layer=layer, last=last):
            y, aux = layer(x)
            last["aux"] = aux
            return y

        def clear(layer=layer):
            x.grad = None
            for p in layer.parameters():
                p.grad = None

        kept = lambda last=last: int(last["aux"].tokens_per_expert.sum())  # noqa: E731
        fused = ffn == "recompute" and lora_experts._fused_ok(x)
        path = ("per-pair plain autograd" if form == "naive" else
                "once per token, fused recompute kernel (MoELoRAHidden)" if fused else
                "once per token, unfused hidden rows (no recompute kernel for this dtype)" if ffn == "recompute" else
                "once per token, plain autograd hidden rows")
        cases.append(Case("moedist-lora", form, forward, _tensor_backward(grad), clear,
                          a2a_bytes=lambda kept=kept: kept() * H * elem, rows_executed=kept,
                          notes=dict(lora_rank=r, frozen_ffn=F, expert_ffn=path), ffn=ffn))

    def clear_ref():
        x.grad = None
        _params_clear(ref)()

    cases.append(Case("dense-lora", "-", lambda: ref(x), _tensor_backward(grad), clear_ref, a2a_bytes=lambda: 0,
                      rows_executed=lambda: cfg.tokens, notes=dict(lora_rank=r, frozen_ffn=F), ffn=ffn))
    return cases


def one_line(e: BaseException, limit: int = 240) -> str:
    """`Type: message` on one line (the reason recorded for a skipped impl)."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}"


def build_cases(cfg: LayerBenchConfig, device: torch.device, dtype: torch.dtype, x, grad, router_w,
                ffn: str = "plain") -> tuple:
    """All (impl, mode) cases of this config for one expert-FFN implementation, plus the reasons
    for any impl skipped (a peer that cannot be built for this setting is skipped, never fatal)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    experts = GroupedExperts(cfg.experts, cfg.hidden, cfg.ffn, activation=cfg.activation, seed=cfg.seed + 2,
                             dtype=dtype, device=device)
    cases: List[Case] = []
    skipped: Dict[str, str] = {}
    for impl in cfg.impls:
        try:
            if impl == "moedist":
                cases += [_moedist_case(m, router_w, experts, x, grad, cfg, elem, ffn) for m in cfg.modes]
            elif impl == "deepspeed":
                cases += [_deepspeed_case(m, router_w, experts, x, grad, cfg, elem, dtype, ffn) for m in cfg.modes]
            elif impl == "fairscale":
                why = peers.fairscale_supports(cfg.tokens, cfg.experts, cfg.topk)
                if why:
                    skipped["fairscale"] = why
                else:
                    cases.append(_fairscale_case(router_w, experts, x, grad, cfg, elem, dtype, ffn))
            elif impl == "dense":
                cases.append(_dense_case(x, grad, cfg, dtype, ffn))
            elif impl == "floor":
                cases += [_floor_case(m, router_w, experts, x, grad, cfg, ffn) for m in cfg.modes]
            elif impl == "lora":
                cases += _lora_cases(router_w, x, grad, cfg, elem, dtype, ffn, skipped)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this setting is reported, not fatal
            if impl == "moedist":
                raise
            skipped[f"{impl}/{ffn}"] = f"could not be built: {one_line(e)}"
    return cases, skipped


