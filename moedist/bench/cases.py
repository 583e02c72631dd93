"""The (impl, mode) cases of `moedist bench layer`: each builds one implementation on the
shared inputs and weights and exposes forward / backward / clear (see layer.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from moedist.bench import peers
from moedist.moe import GroupedExperts, MoELayer, MoELoRAExperts, Router
from moedist.moe.capacity import compute_capacity, select_tokens
from moedist.moe.dispatcher import permute_pairs

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

    @property
    def name(self) -> str:
        return f"{self.impl}/{self.mode}"



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


def _moedist_case(mode, router_w, experts, x, grad, cfg, elem) -> Case:
    E, K = cfg.experts, cfg.topk
    router = Router(cfg.hidden, E, K, renormalize=K > 1).to(x.device)
    with torch.no_grad():
        router.weight.copy_(router_w)
    cf = cfg.capacity_factor if mode == "capacity" else None
    layer = MoELayer(router, experts, capacity_factor=cf, min_capacity=cfg.min_capacity)
    last = {}

    def forward():
        y, aux = layer(x)
        last["aux"] = aux
        return y

    def clear():
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    kept = lambda: int(last["aux"].tokens_per_expert.sum())  # noqa: E731
    return Case("moedist", mode, forward, _tensor_backward(grad), clear,
                a2a_bytes=lambda: kept() * cfg.hidden * elem, rows_executed=kept,
                capacity=lambda: last["aux"].capacity, notes=dict(layer=layer))


def _deepspeed_case(mode, router_w, experts, x, grad, cfg, elem, dtype) -> Case:
    m = peers.DeepSpeedMoE(router_w, experts, cfg.topk, cfg.capacity_factor, drop_tokens=(mode == "capacity"),
                           min_capacity=cfg.min_capacity).to(x.device)
    m.moe.deepspeed_moe.experts.to(dtype)

    def clear():
        x.grad = None
        for p in m.parameters():
            p.grad = None

    return Case("deepspeed", mode, lambda: m(x), _tensor_backward(grad), clear,
                a2a_bytes=lambda: m.a2a_bytes(elem), rows_executed=lambda: cfg.experts * m.capacity,
                capacity=lambda: m.capacity, notes=dict(module=m))


def _fairscale_case(router_w, experts, x, grad, cfg, elem, dtype) -> Case:
    m = peers.FairscaleMoE(router_w, experts).to(x.device)
    m.layer.experts.to(dtype)

    def clear():
        x.grad = None
        for p in m.parameters():
            p.grad = None

    T = cfg.tokens
    return Case("fairscale", "capacity", lambda: m(x), _tensor_backward(grad), clear,
                a2a_bytes=lambda: m.a2a_bytes(T, elem), rows_executed=lambda: cfg.experts * m.capacity(T),
                capacity=lambda: m.capacity(T),
                notes=dict(capacity_factor=1.0, routing="Top2Gate: 2nd expert sampled with Gumbel noise"))


def _dense_case(x, grad, cfg, dtype) -> Case:
    m = peers.DenseFFN(cfg.hidden, cfg.topk * cfg.ffn, cfg.activation, seed=cfg.seed + 3, dtype=dtype, device=x.device)

    def clear():
        x.grad = None
        _params_clear(m)()

    return Case("dense", "-", lambda: m(x), _tensor_backward(grad), clear, a2a_bytes=lambda: 0,
                rows_executed=lambda: cfg.tokens * cfg.topk, notes=dict(ffn_size=cfg.topk * cfg.ffn))


def _floor_case(mode, router_w, experts, x, grad, cfg) -> Case:
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
    m = peers.FloorExperts(experts, counts, x_sorted)
    grads = [gs for gs, c in zip(g_sorted.split(counts), counts) if c > 0]

    def backward(outs):
        torch.autograd.backward(outs, grads)

    def clear():
        m.clear_input_grads()
        _params_clear(m)()

    n = sum(counts)
    return Case("floor", mode, m, backward, clear, a2a_bytes=lambda: 0, rows_executed=lambda: n)


class _PerPairExperts(nn.Module):
    """Hides MoELoRAExperts.forward_tokens so MoELayer takes the per-pair path (the naive form)."""

    def __init__(self, inner: MoELoRAExperts):
        super().__init__()
        self.inner, self.num_local = inner, inner.num_local

    def forward(self, x_NH, counts_L):
        return self.inner(x_NH, counts_L)


def _lora_cases(router_w, x, grad, cfg, elem, dtype) -> List[Case]:
    E, K, H, F, r = cfg.experts, cfg.topk, cfg.hidden, cfg.ffn, cfg.lora_rank
    base = peers.DenseFFN(H, F, cfg.activation, seed=cfg.seed + 5, dtype=dtype, device=x.device)
    ref = peers.DenseLoRA(base.w_gate, base.w_up, base.w_down, r, cfg.activation, seed=cfg.seed + 6)
    cases = []
    for form in ("fused", "naive"):
        lora_experts = MoELoRAExperts(E, H, F, r, activation=cfg.activation, seed=cfg.seed + 7, dtype=dtype,
                                      device=x.device)
        lora_experts.load_base(base.w_gate, base.w_up, base.w_down)
        router = Router(H, E, K, renormalize=K > 1).to(x.device)
        with torch.no_grad():
            router.weight.copy_(router_w)
        experts = lora_experts if form == "fused" else _PerPairExperts(lora_experts)
        layer = MoELayer(router, experts, capacity_factor=None)
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
        cases.append(Case("moedist-lora", form, forward, _tensor_backward(grad), clear,
                          a2a_bytes=lambda kept=kept: kept() * H * elem, rows_executed=kept,
                          notes=dict(lora_rank=r, frozen_ffn=F)))

    def clear_ref():
        x.grad = None
        _params_clear(ref)()

    cases.append(Case("dense-lora", "-", lambda: ref(x), _tensor_backward(grad), clear_ref, a2a_bytes=lambda: 0,
                      rows_executed=lambda: cfg.tokens, notes=dict(lora_rank=r, frozen_ffn=F)))
    return cases


def build_cases(cfg: LayerBenchConfig, device: torch.device, dtype: torch.dtype, x, grad, router_w) -> tuple:
    """All (impl, mode) cases of this config, plus the reasons for any impl skipped."""
    elem = torch.tensor([], dtype=dtype).element_size()
    experts = GroupedExperts(cfg.experts, cfg.hidden, cfg.ffn, activation=cfg.activation, seed=cfg.seed + 2,
                             dtype=dtype, device=device)
    cases: List[Case] = []
    skipped: Dict[str, str] = {}
    for impl in cfg.impls:
        if impl == "moedist":
            cases += [_moedist_case(m, router_w, experts, x, grad, cfg, elem) for m in cfg.modes]
        elif impl == "deepspeed":
            cases += [_deepspeed_case(m, router_w, experts, x, grad, cfg, elem, dtype) for m in cfg.modes]
        elif impl == "fairscale":
            why = peers.fairscale_supports(cfg.tokens, cfg.experts, cfg.topk)
            if why:
                skipped["fairscale"] = why
            else:
                cases.append(_fairscale_case(router_w, experts, x, grad, cfg, elem, dtype))
        elif impl == "dense":
            cases.append(_dense_case(x, grad, cfg, dtype))
        elif impl == "floor":
            cases += [_floor_case(m, router_w, experts, x, grad, cfg) for m in cfg.modes]
        elif impl == "lora":
            cases += _lora_cases(router_w, x, grad, cfg, elem, dtype)
    return cases, skipped


